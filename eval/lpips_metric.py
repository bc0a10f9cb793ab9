"""LPIPS (AlexNet, v0.1) through the `lpips` package, or an explicit "unavailable" with the reason.

LPIPS has two sets of weights: the linear calibration layers, which ship inside the `lpips` wheel, and the AlexNet
trunk, ImageNet weights that torchvision downloads into the torch hub cache on first use. A random trunk still
produces numbers, which look plausible and mean nothing, so the trunk file is looked for first and verified against
the hash prefix torchvision puts in its name; when it is missing or does not match, LPIPS is reported as unavailable
with the reason, and no download is attempted (offline it would hang or fail half-way inside the `lpips`
constructor).

Inputs are images in [0, 1] (as the tokenizer works); they are mapped to [-1, 1] as LPIPS expects, and grayscale is
repeated to 3 channels. The dataset figure is the mean of the per-image distances.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from configio.files import file_sha256

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
# torchvision names its checkpoints <name>-<first 8 hex digits of the file's sha256>.pth and checks that on download.
ALEXNET_SHA256_PREFIX = "7be5be79"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
NAME = "LPIPS v0.1, AlexNet trunk (lpips package)"


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot be computed faithfully here; the message says why and how to fix it."""


def alexnet_weights_path() -> Path:
    """Where torchvision keeps (and would download) the AlexNet ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def check_weights() -> tuple[Path, str]:
    """(path, sha256) of verified AlexNet weights, else LPIPSUnavailable naming the remedy."""
    if importlib.util.find_spec("lpips") is None:
        raise LPIPSUnavailable("the lpips package is not installed; pip install lpips")
    path = alexnet_weights_path()
    if not path.is_file():
        raise LPIPSUnavailable(
            f"AlexNet ImageNet weights for the LPIPS trunk are not at {path} and are not downloaded here; "
            f"fetch {ALEXNET_URL} into that folder (or set TORCH_HOME) to get LPIPS"
        )
    sha = file_sha256(path)
    if not sha.startswith(ALEXNET_SHA256_PREFIX):
        raise LPIPSUnavailable(
            f"{path} does not match torchvision's AlexNet weights (sha256 {sha[:16]}..., expected {ALEXNET_SHA256_PREFIX}...); "
            f"delete it and fetch {ALEXNET_URL} again"
        )
    return path, sha


def build_lpips(device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The LPIPS module with the verified trunk loaded by hand, plus its provenance."""
    import lpips

    path, sha = check_weights()
    # pnet_rand=True keeps torchvision from fetching anything; the trunk is filled from the verified file below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about lpips' legacy `pretrained=` argument
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    loaded = set()
    for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for index, module in slice_.named_children():
            own = {n: features[f"{index}.{n}"] for n, _ in module.named_parameters()}
            if own:
                module.load_state_dict(own)
                loaded.update(f"{index}.{n}" for n in own)
    if loaded != set(features):
        raise LPIPSUnavailable(f"{path} does not hold a torchvision AlexNet feature stack; delete it and fetch {ALEXNET_URL}")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    provenance = {"metric": NAME, "trunk_weights": str(path), "trunk_sha256": sha, "input_range": "[-1, 1]"}
    return model, provenance


def _prepare(images: torch.Tensor) -> torch.Tensor:
    images = images.float()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.clamp(0, 1) * 2 - 1


class LPIPSMetric:
    """Accumulates per-image LPIPS over batches; `result()` is the mean, or unavailable with the reason."""

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True):
        self.device = torch.device(device)
        self.model = None
        self.provenance: dict[str, Any] = {"metric": NAME}
        self.reason: str | None = None if enabled else "disabled (lpips=false)"
        self.total, self.count = 0.0, 0
        if enabled:
            try:
                self.model, self.provenance = build_lpips(self.device)
            except LPIPSUnavailable as err:
                self.reason = str(err)

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def per_image(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise LPIPSUnavailable(self.reason or "LPIPS is unavailable")
        a, b = _prepare(prediction).to(self.device), _prepare(target).to(self.device)
        return self.model(a, b).flatten().cpu()

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if self.model is not None:
            values = self.per_image(prediction, target)
            self.total += float(values.double().sum())
            self.count += len(values)

    def result(self) -> dict[str, Any]:
        if self.model is None:
            return {"available": False, "reason": self.reason, **self.provenance}
        if self.count == 0:
            return {"available": False, "reason": "no images were scored", **self.provenance}
        return {"available": True, "lpips": self.total / self.count, "num_images": self.count,
                "reduction": "mean of per-image distances", **self.provenance}


def lpips_per_image(prediction: torch.Tensor, target: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, Any]:
    """One-shot LPIPS of two image batches in [0, 1]: {"available": True, "lpips", ...} or {"available": False, "reason"}."""
    metric = LPIPSMetric(device)
    metric.update(prediction, target)
    return metric.result()


__all__ = ["LPIPSMetric", "LPIPSUnavailable", "alexnet_weights_path", "build_lpips", "check_weights", "lpips_per_image"]
