"""Image datasets for the tokenizer: the paper's train / validation / test splits, served fast.

`build_splits(cfg, seed)` returns {"train", "val", "test"} datasets whose items are
`(image, label)`: `image` a float32 tensor (C, S, S) with pixels in [0, 1] (no normalization, no
augmentation), `label` an int. `dataset_info(cfg)` gives channels / classes / size without reading data.

Splits (the paper's):
  * mnist, fashion_mnist: official 60k train -> 50k train / 10k val (`val_size`), official 10k test;
    1 channel, 28x28 resized to `image_size` (the paper: 32).
  * cifar10: 50k train -> 40k / 10k, official 10k test; 3 channels, native 32x32.
  * svhn: 73,257 train -> 63,257 / 10k, official 26,032 test (the "extra" set is not used); 3 channels.
  * celeba: official train / valid / test partitions; CenterCrop(140) then Resize(image_size) (PIL
    bilinear with antialiasing); label is always 0 (no class labels used, num_classes None).
  * folder: every image file under `path` (see `_FolderDataset`).
The train/val split of the official train set is a fixed permutation drawn from a `torch.Generator`
seeded with `seed`, so it is identical on every run and machine for that seed.

Speed: mnist / fashion_mnist / cifar10 / svhn are decoded once into an in-memory uint8 tensor already
resized to `image_size` and served from it (`TensorImageDataset`, float conversion per item, or per batch
via its `images` attribute). Resizing uses `torch.nn.functional.interpolate(mode="bilinear",
antialias=True, align_corners=False)`, rounded back to uint8 (antialiasing only matters when shrinking;
MNIST 28 -> 32 is a plain bilinear upsample). The tensors of each official split are cached under
`<root>/cache/<dataset>_<train|test>_<S>px_v1.safetensors` (no pickle), so a second start skips decoding,
resizing and even importing torchvision; delete `<root>/cache/` to rebuild it.

Fashion-MNIST (the default) is looked for, in order: (1) torchvision's layout `<root>/FashionMNIST/raw/`,
(2) Debian's `dataset-fashion-mnist` package in /usr/share/datasets/fashion-mnist (decompressed into
(1), atomically), (3) torchvision's download when `download` is true.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from configio.errors import ConfigError, DatasetError, WriteFailed
from configio.files import atomic_save_safetensors, atomic_write, socket_timeout

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "svhn", "celeba", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Where Debian's `dataset-fashion-mnist` package puts the gzipped IDX files (tests may monkeypatch this).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Seconds any single network operation of a torchvision download may block before it fails.
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
CACHE_VERSION = 1  # bump when the resize method or cache layout changes

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# channels, num_classes, size of the official train split (None: not split by val_size)
_INFO: dict[str, tuple[int, int | None]] = {
    "fashion_mnist": (1, 10),
    "mnist": (1, 10),
    "cifar10": (3, 10),
    "svhn": (3, 10),
    "celeba": (3, None),
}

_PRETTY = {
    "fashion_mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "svhn": "SVHN",
    "celeba": "CelebA",
}


@dataclass
class DataConfig:
    name: Literal["fashion_mnist", "mnist", "cifar10", "svhn", "celeba", "folder"] = "fashion_mnist"
    root: str = "data"  # where datasets / caches live (relative to cwd unless absolute)
    path: str | None = None  # image folder, for name="folder" (required then)
    image_size: int = 32  # images are resized (celeba: centre-cropped first) to this square size
    val_size: int = 10000  # images held out of the official train split for validation (fixed seed)
    test_fraction: float = 0.1  # name="folder": held-out test fraction
    val_fraction: float = 0.1  # name="folder": held-out validation fraction
    limit: int | None = None  # cap on images per split (quick runs, tests); None = all
    download: bool = True  # allow torchvision to download when the files are missing

    def validate(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ConfigError(f"data.name: {self.name!r} is not one of {', '.join(repr(n) for n in DATASET_NAMES)}")
        if not isinstance(self.root, str) or not self.root.strip():
            raise ConfigError("data.root must be a non-empty directory path (for example data.root=data)")
        if self.name == "folder":
            if not self.path:
                raise ConfigError("data.path is required when data.name=folder (set data.path=/path/to/images)")
        elif self.path is not None:
            raise ConfigError(
                f"data.path is only used when data.name=folder, but data.name={self.name}; "
                "set data.name=folder or remove data.path"
            )
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ConfigError(f"data.image_size must be a positive integer, got {self.image_size!r}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise ConfigError(f"data.val_size must be an integer >= 0, got {self.val_size!r}")
        for key in ("test_fraction", "val_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{key} must be a number in [0, 1), got {value!r}")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ConfigError(
                f"data.test_fraction + data.val_fraction must be < 1 so training images remain, "
                f"got {self.test_fraction} + {self.val_fraction}"
            )
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0):
            raise ConfigError(f"data.limit must be a positive integer or null, got {self.limit!r}")
        if not isinstance(self.download, bool):
            raise ConfigError(f"data.download must be true or false, got {self.download!r}")


# --------------------------------------------------------------------------------------------------
# Small datasets


class TensorImageDataset(Dataset):
    """Items from an in-memory uint8 tensor (N, C, S, S) and int64 labels (N,); float in [0, 1] per item.

    For fast batching a caller may index `images` directly and do `.float().div_(255)` per batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, S, S) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])


class _CelebAImages(Dataset):
    """Wraps torchvision's CelebA so an unreadable image raises DatasetError naming the file; label 0."""

    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image, _ = self.base[index]
        except (OSError, SyntaxError, ValueError) as err:
            path = Path(self.base.root) / self.base.base_folder / "img_align_celeba" / self.base.filename[index]
            raise DatasetError(f"cannot read CelebA image '{path}' ({_short(err)}); re-extract img_align_celeba.zip") from None
        return image, 0


def _load_folder_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2  # floored; TF.center_crop rounds instead
            image = image.crop((left, top, left + side, top + side))
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return TF.to_tensor(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image file '{path}' ({_short(err)}); replace or delete that file") from None


class _FolderDataset(Dataset):
    """Images from a folder, read lazily: converted to RGB (always 3 channels, grayscale is replicated),
    centre-cropped to a square and resized to `size` with PIL bilinear (antialiased when shrinking)."""

    def __init__(self, files: list[Path], labels: list[int], size: int):
        self.files = files
        self.labels = labels
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _load_folder_image(self.files[index], self.size), self.labels[index]


# --------------------------------------------------------------------------------------------------
# Helpers


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser()


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8 by bilinear interpolation with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].float()
        block = F.interpolate(block, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = block.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _cache_path(root: Path, name: str, split: str, size: int) -> Path:
    return root / "cache" / f"{name}_{split}_{size}px_v{CACHE_VERSION}.safetensors"


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        images, labels = tensors["images"], tensors["labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            return None
        return images, labels
    except Exception:  # a corrupt or foreign cache is just rebuilt
        return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Best effort: an unwritable root only costs the resize on the next start."""
    try:
        atomic_save_safetensors({"images": images, "labels": labels}, path)
    except OSError:
        pass


def validation_is_empty(cfg: DataConfig) -> bool:
    """Whether the settings alone leave the validation split empty (known before any image is read)."""
    if cfg.name == "celeba":  # its own official partition
        return False
    return cfg.val_fraction == 0 if cfg.name == "folder" else cfg.val_size == 0


def _first(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _train_val_split(
    images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset]:
    n = images.shape[0]
    if cfg.val_size >= n:
        raise ConfigError(
            f"data.val_size={cfg.val_size} must be smaller than the {n} images of the {cfg.name} train split"
        )
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    val_idx = perm[: cfg.val_size][: _first(cfg.val_size, cfg.limit)]
    train_idx = perm[cfg.val_size :][: _first(n - cfg.val_size, cfg.limit)]
    return (
        TensorImageDataset(images[train_idx], labels[train_idx]),
        TensorImageDataset(images[val_idx], labels[val_idx]),
    )


def _limited(images: torch.Tensor, labels: torch.Tensor, limit: int | None) -> TensorImageDataset:
    k = _first(images.shape[0], limit)
    return TensorImageDataset(images[:k].contiguous(), labels[:k].contiguous())


def _missing_error(cfg: DataConfig, reason: str, remedy: str) -> DatasetError:
    return DatasetError(f"{_PRETTY[cfg.name]} not found in {_root(cfg)} {reason}; {remedy}")


def _open_torchvision(cfg: DataConfig, make: Callable[[bool], Any], manual: str) -> Any:
    """Call `make(download)` and turn torchvision's not-found / download failures into one-line DatasetErrors."""
    try:
        return make(False)
    except (RuntimeError, OSError):
        pass
    if not cfg.download:
        raise _missing_error(
            cfg, "and data.download=false",
            f"set data.download=true to let torchvision download it, or {manual}",
        ) from None
    try:
        with socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            return make(True)
    except Exception as err:  # urllib/http/gdown errors, md5 mismatch, ...
        raise _missing_error(
            cfg, f"and the download failed ({_short(err, 120)})",
            f"connect to the internet so torchvision can download it, or {manual}",
        ) from None


# --------------------------------------------------------------------------------------------------
# Per-dataset loaders: each returns the official (train, test) splits as uint8 tensors


def _decompress_gz_into(sources: list[Path], raw: Path) -> bool:
    """Make the four decompressed IDX files exist in `raw`, from `<name>.gz` in the first source that has all."""
    if all((raw / name).is_file() for name in _MNIST_FILES):
        return True
    for source in sources:
        if not all((source / name).is_file() or (source / f"{name}.gz").is_file() for name in _MNIST_FILES):
            continue
        raw.mkdir(parents=True, exist_ok=True)
        for name in _MNIST_FILES:
            target = raw / name
            if target.is_file():
                continue
            plain = source / name

            def decompress(tmp: str, plain: Path = plain, name: str = name) -> None:
                with open(tmp, "wb") as out, (open(plain, "rb") if plain.is_file()
                                              else gzip.open(source / f"{name}.gz", "rb")) as src:
                    shutil.copyfileobj(src, out, 1 << 20)

            try:
                atomic_write(target, decompress)
            except WriteFailed:  # a full disk or a read-only folder: not the source file's fault
                raise
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                raise DatasetError(
                    f"cannot decompress '{source / (name + '.gz')}' into {raw} ({_short(err, 100)}); "
                    f"reinstall or re-download that file"
                ) from None
        return True
    return False


def _load_mnist_family(cfg: DataConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from torchvision import datasets as tvd

    root = _root(cfg)
    cls = tvd.FashionMNIST if cfg.name == "fashion_mnist" else tvd.MNIST
    raw = root / cls.__name__ / "raw"
    sources = [raw]
    if cfg.name == "fashion_mnist":
        sources.append(DEBIAN_FASHION_MNIST_DIR)
    have_files = _decompress_gz_into(sources, raw)

    def make(download: bool) -> tuple[Any, Any]:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=False)

    if have_files:
        try:
            train, test = make(False)
        except (RuntimeError, OSError, ValueError, AssertionError) as err:
            raise DatasetError(
                f"{_PRETTY[cfg.name]} files in {raw} are unreadable ({_short(err, 100)}); delete that folder and retry"
            ) from None
    else:
        manual = ("install it with 'sudo apt-get install dataset-fashion-mnist'" if cfg.name == "fashion_mnist"
                  else f"put the four *-ubyte files in {raw}")
        train, test = _open_torchvision(cfg, make, manual)
    return (train.data.unsqueeze(1), train.targets), (test.data.unsqueeze(1), test.targets)


def _load_cifar10(cfg: DataConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from torchvision import datasets as tvd

    root = _root(cfg)
    train, test = _open_torchvision(
        cfg,
        lambda d: (tvd.CIFAR10(str(root), train=True, download=d), tvd.CIFAR10(str(root), train=False, download=False)),
        f"extract cifar-10-python.tar.gz into {root} (giving {root / 'cifar-10-batches-py'})",
    )

    def convert(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)

    return convert(train), convert(test)


def _load_svhn(cfg: DataConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from torchvision import datasets as tvd

    root = _root(cfg) / "svhn"
    if importlib.util.find_spec("scipy") is None:  # torchvision's SVHN reads its .mat files with scipy
        raise DatasetError("SVHN needs scipy to read its .mat files; install it with 'pip install scipy'") from None
    train, test = _open_torchvision(
        cfg,
        lambda d: (tvd.SVHN(str(root), split="train", download=d), tvd.SVHN(str(root), split="test", download=d)),
        f"put train_32x32.mat and test_32x32.mat in {root}",
    )

    def convert(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels.astype("int64"))

    return convert(train), convert(test)


_TENSOR_LOADERS = {"fashion_mnist": _load_mnist_family, "mnist": _load_mnist_family, "cifar10": _load_cifar10, "svhn": _load_svhn}


def _tensor_splits(cfg: DataConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Official train/test splits as uint8 (N, C, S, S) tensors at cfg.image_size, via the on-disk cache."""
    root = _root(cfg)
    size = cfg.image_size
    cached = {split: _read_cache(_cache_path(root, cfg.name, split, size)) for split in ("train", "test")}
    if all(v is not None for v in cached.values()):
        return cached  # type: ignore[return-value]
    (train_x, train_y), (test_x, test_y) = _TENSOR_LOADERS[cfg.name](cfg)
    out = {}
    for split, (x, y) in {"train": (train_x, train_y), "test": (test_x, test_y)}.items():
        y = torch.as_tensor(y, dtype=torch.int64)
        x = resize_uint8(x, size)  # cached even at native size: skips importing torchvision (~1 s) next time
        _write_cache(_cache_path(root, cfg.name, split, size), x, y)
        out[split] = (x, y)
    return out


def _celeba_splits(cfg: DataConfig) -> dict[str, Dataset]:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    root = _root(cfg)
    transform = T.Compose([T.CenterCrop(140), T.Resize((cfg.image_size, cfg.image_size), antialias=True), T.ToTensor()])
    manual = f"put img_align_celeba/ and the list_*.txt / identity_CelebA.txt files in {root / 'celeba'}"
    out: dict[str, Dataset] = {}
    for ours, theirs in (("train", "train"), ("val", "valid"), ("test", "test")):
        base = _open_torchvision(
            cfg, lambda d, s=theirs: tvd.CelebA(str(root), split=s, target_type=[], transform=transform, download=d), manual
        )
        wrapped = _CelebAImages(base)
        out[ours] = wrapped if cfg.limit is None or cfg.limit >= len(wrapped) else Subset(wrapped, range(cfg.limit))
    return out


# --------------------------------------------------------------------------------------------------
# Folder datasets


def _folder_layout(path: Path) -> list[str]:
    """Sorted class names: the non-hidden top-level subfolders of `path` (empty list: unlabelled folder)."""
    if not path.is_dir():
        raise DatasetError(f"image folder '{path}' does not exist or is not a directory; fix data.path")
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files.extend(
            Path(directory) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(files)


def _check_header(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for broken files
        raise DatasetError(f"cannot read image file '{path}' ({_short(err, 100)}); replace or delete that file") from None


def _folder_splits(cfg: DataConfig, seed: int) -> dict[str, Dataset]:
    path = Path(cfg.path or "").expanduser()
    classes = _folder_layout(path)
    files: list[Path] = []
    labels: list[int] = []
    if classes:
        loose = [p for p in _image_files(path) if p.parent == path]
        if loose:
            raise DatasetError(
                f"image folder '{path}' has {len(loose)} image(s) directly inside it (e.g. '{loose[0].name}') next to "
                f"class subfolders; move them into a class subfolder or remove them"
            )
        for index, name in enumerate(classes):
            found = _image_files(path / name)
            if not found:
                raise DatasetError(
                    f"class subfolder '{path / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
                )
            files.extend(found)
            labels.extend([index] * len(found))
    else:
        files = _image_files(path)
        labels = [0] * len(files)
    if not files:
        raise DatasetError(
            f"image folder '{path}' holds no image files ({', '.join(IMAGE_EXTENSIONS)}); fix data.path or add images"
        )
    for file in files:
        _check_header(file)

    n = len(files)
    n_test = int(round(n * cfg.test_fraction))
    n_val = int(round(n * cfg.val_fraction))
    if n - n_test - n_val < 1:
        raise DatasetError(
            f"image folder '{path}' has only {n} images, too few for test_fraction={cfg.test_fraction} and "
            f"val_fraction={cfg.val_fraction}; add images or lower the fractions"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    parts = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    out: dict[str, Dataset] = {}
    for split in ("train", "val", "test"):
        idx = sorted(parts[split])[: _first(len(parts[split]), cfg.limit)]
        out[split] = _FolderDataset([files[i] for i in idx], [labels[i] for i in idx], cfg.image_size)
    return out


# --------------------------------------------------------------------------------------------------
# Public API


def build_splits(cfg: DataConfig, seed: int = 0) -> dict[str, Dataset]:
    """Return {"train", "val", "test"} datasets of `(float image (C, S, S) in [0, 1], int label)`.

    Deterministic for a given `seed`. Raises DatasetError (one line, with the fix) when the data are missing,
    cannot be downloaded or a file is unreadable, and ConfigError for invalid settings.
    Folder datasets are always RGB (3 channels; grayscale images are replicated to 3 channels).
    """
    cfg.validate()
    if cfg.name == "folder":
        return _folder_splits(cfg, seed)
    if cfg.name == "celeba":
        return _celeba_splits(cfg)
    splits = _tensor_splits(cfg)
    train, val = _train_val_split(*splits["train"], cfg, seed)
    return {"train": train, "val": val, "test": _limited(*splits["test"], cfg.limit)}


def dataset_info(cfg: DataConfig) -> dict[str, Any]:
    """{"channels", "num_classes", "image_size"} without loading any data.

    For name="folder" only the names of the top-level subfolders of `path` are listed (no image is read):
    channels is always 3 and num_classes is the number of class subfolders, or None when there are none.
    """
    cfg.validate()
    if cfg.name == "folder":
        classes = _folder_layout(Path(cfg.path or "").expanduser())
        return {"channels": 3, "num_classes": len(classes) or None, "image_size": cfg.image_size}
    channels, num_classes = _INFO[cfg.name]
    return {"channels": channels, "num_classes": num_classes, "image_size": cfg.image_size}
