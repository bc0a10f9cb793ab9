"""The evaluation layer: metrics against independent references, LPIPS availability, report and compare jobs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import real_images
from numpy.lib.stride_tricks import sliding_window_view

from configio.files import file_sha256
from eval import lpips_metric
from eval.image_metrics import psnr_per_image, ssim_per_image

# ---------------------------------------------------------------------------------------------- independent references

def reference_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def reference_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. SSIM, Gaussian window, at every pixel of the image reflect-padded by half a window (torchmetrics'
    border rule; skimage instead drops the border), averaged over pixels and channels."""
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ca, cb in zip(a, b):
        def filt(img):
            return np.einsum("ijkl,kl->ij", sliding_window_view(img, (size, size)), window)

        ca, cb = np.pad(ca, size // 2, mode="reflect"), np.pad(cb, size // 2, mode="reflect")
        mu_a, mu_b = filt(ca), filt(cb)
        var_a, var_b = filt(ca * ca) - mu_a**2, filt(cb * cb) - mu_b**2
        cov = filt(ca * cb) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def test_psnr_ssim_equal_independent_reference_on_real_images(data_root):
    images = real_images(data_root)
    generator = torch.Generator().manual_seed(0)
    noisy = (images + 0.08 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    for degraded in (noisy, blurred):
        psnr, ssim = psnr_per_image(degraded, images), ssim_per_image(degraded, images)
        for i in range(len(images)):
            a, b = degraded[i].double().numpy(), images[i].double().numpy()
            assert psnr[i].item() == pytest.approx(reference_psnr(a, b), rel=1e-5)
            assert ssim[i].item() == pytest.approx(reference_ssim(a, b), abs=2e-5)


# ---------------------------------------------------------------------------------------------- LPIPS

def test_lpips_without_trunk_weights_reports_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    result = lpips_metric.lpips_per_image(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32))
    assert result["available"] is False and "lpips" not in result
    assert lpips_metric.ALEXNET_FILE in result["reason"] and str(tmp_path / "hub") in result["reason"]
    assert not (tmp_path / "hub").exists()  # nothing was downloaded or created


def _fake_alexnet(hub: Path) -> Path:
    from torchvision.models import alexnet

    torch.manual_seed(0)
    path = hub / "checkpoints" / lpips_metric.ALEXNET_FILE
    path.parent.mkdir(parents=True)
    torch.save(alexnet(weights=None).state_dict(), path)
    return path


def test_lpips_refuses_weights_that_are_not_torchvisions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    _fake_alexnet(tmp_path)
    result = lpips_metric.lpips_per_image(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert result["available"] is False and "does not match" in result["reason"]


def test_lpips_with_weights_present(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = _fake_alexnet(tmp_path)
    # Stand-in weights pass the check only because the expected hash is patched to theirs.
    monkeypatch.setattr(lpips_metric, "ALEXNET_SHA256_PREFIX", file_sha256(path)[:8])
    model, provenance = lpips_metric.build_lpips()
    state = torch.load(path, weights_only=True)
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "10").weight, state["features.10.weight"])
    assert provenance["trunk_sha256"].startswith(lpips_metric.ALEXNET_SHA256_PREFIX)
    gray, other = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    metric = lpips_metric.LPIPSMetric()
    values = metric.per_image(gray, other)
    assert values.shape == (3,) and bool((values > 0).all())
    torch.testing.assert_close(values, metric.per_image(gray.repeat(1, 3, 1, 1), other.repeat(1, 3, 1, 1)))
    assert float(metric.per_image(gray, gray).abs().max()) < 1e-6
    metric.update(gray, other)
    result = metric.result()
    assert result["available"] and result["num_images"] == 3 and result["lpips"] == pytest.approx(float(values.mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------------- report job
