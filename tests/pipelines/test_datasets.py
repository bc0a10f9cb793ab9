"""Tests for pipelines/datasets.py: Fashion-MNIST from Debian's package, offline failures, image folders."""
from __future__ import annotations

import gzip
import socket
import sys
import threading
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from configio.config import from_dict  # noqa: E402
from configio.errors import ConfigError
from pipelines import datasets as D  # noqa: E402
from pipelines.datasets import DataConfig, DatasetError, build_splits, dataset_info  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _fashion_source() -> Path | None:
    """Debian's gzipped files, or an already decompressed torchvision copy under the repo's data/."""
    if all((D.DEBIAN_FASHION_MNIST_DIR / f"{n}.gz").is_file() for n in D._MNIST_FILES):
        return D.DEBIAN_FASHION_MNIST_DIR
    cached = REPO / "data" / "FashionMNIST" / "raw"
    if all((cached / n).is_file() for n in D._MNIST_FILES):
        return cached
    return None


FASHION_SOURCE = _fashion_source()
needs_fashion = pytest.mark.skipif(
    FASHION_SOURCE is None,
    reason="Fashion-MNIST not available: /usr/share/datasets/fashion-mnist is absent (sudo apt-get install "
    "dataset-fashion-mnist) and there is no copy in data/FashionMNIST/raw",
)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fashion_root")


@pytest.fixture(scope="module")
def fashion32(fashion_root):
    if FASHION_SOURCE is None:
        pytest.skip("Fashion-MNIST not available")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "DEBIAN_FASHION_MNIST_DIR", FASHION_SOURCE)
        return build_splits(DataConfig(root=str(fashion_root), download=False), seed=0)


def _raw_test_images(source: Path) -> tuple[np.ndarray, np.ndarray]:
    def read(name: str) -> bytes:
        plain = source / name
        return plain.read_bytes() if plain.is_file() else gzip.open(source / f"{name}.gz").read()

    images = np.frombuffer(read("t10k-images-idx3-ubyte"), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(read("t10k-labels-idx1-ubyte"), dtype=np.uint8, offset=8)
    return images, labels


@needs_fashion
def test_fashion_mnist_splits_shapes_and_range(fashion32, fashion_root):
    assert {k: len(v) for k, v in fashion32.items()} == {"train": 50000, "val": 10000, "test": 10000}
    for split in fashion32.values():
        image, label = split[0]
        assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
        assert isinstance(label, int) and 0 <= label < 10
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 32, 32)
        assert 0.0 <= image.min() and image.max() <= 1.0
    # the decompressed files landed in torchvision's layout and the resized tensors were cached
    assert all((fashion_root / "FashionMNIST" / "raw" / n).is_file() for n in D._MNIST_FILES)
    assert sorted(p.name for p in (fashion_root / "cache").iterdir()) == [
        "fashion_mnist_test_32px_v1.safetensors",
        "fashion_mnist_train_32px_v1.safetensors",
    ]
    # every class is present in each split; train and val together are the official 60k
    assert torch.bincount(fashion32["val"].labels, minlength=10).min() > 800
    assert torch.bincount(fashion32["train"].labels, minlength=10).tolist() == [
        6000 - c for c in torch.bincount(fashion32["val"].labels, minlength=10).tolist()
    ]


@needs_fashion
def test_fashion_mnist_28_matches_raw_files(fashion_root, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", FASHION_SOURCE)
    splits = build_splits(DataConfig(root=str(fashion_root), image_size=28, download=False))
    assert {k: len(v) for k, v in splits.items()} == {"train": 50000, "val": 10000, "test": 10000}
    images, labels = _raw_test_images(FASHION_SOURCE)
    image, label = splits["test"][3]
    assert image.shape == (1, 28, 28)
    assert torch.equal(image[0], torch.from_numpy(images[3].astype(np.float32) / 255.0))
    assert label == int(labels[3])
    assert torch.equal(splits["test"].labels, torch.from_numpy(labels.astype(np.int64)))


@needs_fashion
def test_fashion_mnist_deterministic_for_seed_and_limit(fashion32, fashion_root, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", Path("/nonexistent"))  # must come from root/ now
    again = build_splits(DataConfig(root=str(fashion_root), download=False), seed=0)
    for name in ("train", "val", "test"):
        assert torch.equal(again[name].images, fashion32[name].images)
        assert torch.equal(again[name].labels, fashion32[name].labels)
    other = build_splits(DataConfig(root=str(fashion_root), download=False), seed=1)
    assert not torch.equal(other["val"].labels, fashion32["val"].labels)
    assert torch.equal(other["test"].images, fashion32["test"].images)  # the official test set never moves

    small = build_splits(DataConfig(root=str(fashion_root), download=False, limit=100), seed=0)
    assert {k: len(v) for k, v in small.items()} == {"train": 100, "val": 100, "test": 100}
    for name in ("train", "val", "test"):
        assert torch.equal(small[name].images, fashion32[name].images[:100])


@needs_fashion
def test_val_size_larger_than_train_is_config_error(fashion32, fashion_root):
    with pytest.raises(ConfigError, match="data.val_size"):
        build_splits(DataConfig(root=str(fashion_root), val_size=60000, download=False))


def test_dataset_info_touches_no_files(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("dataset_info must not load data")

    for name in D._TENSOR_LOADERS:
        monkeypatch.setitem(D._TENSOR_LOADERS, name, boom)
    monkeypatch.setattr(D, "_read_cache", boom)
    root = tmp_path / "nothing_here"
    expected = {
        "fashion_mnist": (1, 10), "mnist": (1, 10), "cifar10": (3, 10), "svhn": (3, 10), "celeba": (3, None),
    }
    for name, (channels, classes) in expected.items():
        info = dataset_info(DataConfig(name=name, root=str(root), image_size=28))
        assert info == {"channels": channels, "num_classes": classes, "image_size": 28}
    assert not root.exists()


# --------------------------------------------------------------------------------------------------
# Missing data / offline


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(name="mnist", root=str(tmp_path), download=False))
    text = _one_line(info.value)
    assert "MNIST not found in" in text and str(tmp_path) in text and "data.download=true" in text


@pytest.mark.parametrize("name, pretty", [("cifar10", "CIFAR-10"), ("svhn", "SVHN"), ("celeba", "CelebA")])
def test_missing_named_datasets_without_download(tmp_path, name, pretty):
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(name=name, root=str(tmp_path), download=False, image_size=64))
    text = _one_line(info.value)
    assert text.startswith(f"{pretty} not found in {tmp_path}") and "data.download=true" in text


def test_missing_fashion_mnist_without_download_names_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no_debian_package")
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(root=str(tmp_path), download=False))
    text = _one_line(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in text and "data.download=true" in text


def test_fashion_mnist_failed_download_names_both_remedies(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x, got:\n<urlopen error>\n")

    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no_debian_package")
    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(root=str(tmp_path), download=True))
    text = _one_line(info.value)
    assert text.startswith(f"Fashion-MNIST not found in {tmp_path} and the download failed (Error downloading")
    assert "sudo apt-get install dataset-fashion-mnist" in text and "connect to the internet" in text


def test_cifar10_failed_download_is_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    text = _one_line(info.value)
    assert "CIFAR-10 not found in" in text and "download failed" in text and "connect to the internet" in text


def _network_unreachable(host: str = "www.cs.toronto.edu", timeout: float = 3.0) -> bool:
    result: list[bool] = []

    def resolve():
        try:
            socket.getaddrinfo(host, 443)
            result.append(False)
        except OSError:
            result.append(True)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def test_cifar10_real_download_fails_fast_offline(tmp_path):
    if not _network_unreachable():
        pytest.skip("the network is reachable here; this test would download 170 MB of CIFAR-10")
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    text = _one_line(info.value)
    assert "CIFAR-10 not found in" in text and "connect to the internet" in text


# --------------------------------------------------------------------------------------------------
# Image folders


def _save(path: Path, size=(20, 16), mode="RGB", value=128, fmt=None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else tuple([value] * len(mode))
    Image.new(mode, size, color).save(path, format=fmt)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for i in range(10):
        _save(root / "dog" / f"d{i}.png", mode="L", value=10 * i)
        _save(root / "cat" / "sub" / f"c{i}.{'jpg' if i % 2 else 'png'}", size=(40, 30), mode="RGB", value=200)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_folder_splits_labels_and_channels(class_folder):
    cfg = DataConfig(name="folder", path=str(class_folder), image_size=8, test_fraction=0.2, val_fraction=0.1)
    splits = build_splits(cfg, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 14, "val": 2, "test": 4}
    seen = [f for s in splits.values() for f in s.files]
    assert len(seen) == len(set(seen)) == 20
    for split in splits.values():
        for index in range(len(split)):
            image, label = split[index]
            assert image.shape == (3, 8, 8) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert label == (0 if "cat" in split.files[index].parts else 1)  # classes sorted: cat, dog
    assert dataset_info(cfg) == {"channels": 3, "num_classes": 2, "image_size": 8}
    again = build_splits(cfg, seed=3)
    assert all(again[k].files == splits[k].files for k in splits)
    assert build_splits(cfg, seed=4)["test"].files != splits["test"].files
    limited = build_splits(DataConfig(name="folder", path=str(class_folder), limit=1), seed=3)
    assert [len(v) for v in limited.values()] == [1, 1, 1]


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    for i in range(5):
        _save(tmp_path / f"x{i}.png", mode="RGBA")
    cfg = DataConfig(name="folder", path=str(tmp_path), image_size=4, val_fraction=0.2, test_fraction=0.2)
    splits = build_splits(cfg)
    assert [len(v) for v in splits.values()] == [3, 1, 1]
    image, label = splits["train"][0]
    assert image.shape == (3, 4, 4) and label == 0
    assert torch.allclose(image, torch.full((3, 4, 4), 128 / 255))
    assert dataset_info(cfg)["num_classes"] is None


def test_folder_corrupt_file_names_the_file(class_folder):
    bad = class_folder / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DatasetError) as info:
        build_splits(DataConfig(name="folder", path=str(class_folder)))
    assert str(bad) in _one_line(info.value)


def test_folder_file_corrupted_after_build_names_the_file(class_folder):
    splits = build_splits(DataConfig(name="folder", path=str(class_folder), image_size=8))
    victim = splits["train"].files[0]
    victim.write_bytes(b"garbage")
    with pytest.raises(DatasetError) as info:
        splits["train"][0]
    assert str(victim) in _one_line(info.value)


def test_folder_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match="holds no image files"):
        build_splits(DataConfig(name="folder", path=str(tmp_path / "empty")))
    with pytest.raises(DatasetError, match="does not exist"):
        build_splits(DataConfig(name="folder", path=str(tmp_path / "missing")))
    _save(tmp_path / "classes" / "a" / "1.png")
    (tmp_path / "classes" / "b").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        build_splits(DataConfig(name="folder", path=str(tmp_path / "classes")))


def test_folder_loose_images_next_to_class_folders(tmp_path):
    _save(tmp_path / "a" / "1.png")
    _save(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="loose.png"):
        build_splits(DataConfig(name="folder", path=str(tmp_path)))


# --------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "folder"}, "data.path is required when data.name=folder"),
        ({"image_size": 0}, "data.image_size"),
        ({"image_size": -32}, "data.image_size"),
        ({"val_size": -1}, "data.val_size"),
        ({"test_fraction": 1.0}, "data.test_fraction"),
        ({"val_fraction": -0.1}, "data.val_fraction"),
        ({"test_fraction": 0.5, "val_fraction": 0.5}, "data.test_fraction \\+ data.val_fraction"),
        ({"limit": 0}, "data.limit"),
        ({"name": "mnist", "path": "/some/images"}, "data.path is only used when data.name=folder"),
        ({"name": "imagenet"}, "data.name"),
    ],
)
def test_validate_rejects_bad_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DataConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=key):
        build_splits(DataConfig(**kwargs))


def test_validate_via_config_loader():
    cfg = from_dict(DataConfig, {"name": "folder", "path": "x", "image_size": 28, "limit": None})
    assert cfg.image_size == 28 and cfg.limit is None
    with pytest.raises(ConfigError, match="data.path is required"):
        from_dict(DataConfig, {"name": "folder"})
    DataConfig().validate()
