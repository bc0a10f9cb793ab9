"""The evaluation layer: metrics against independent references, LPIPS availability, report and compare jobs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from eval import lpips_metric
from eval.fid import feature_statistics, fid_from_features, frechet_distance
from eval.image_metrics import psnr_per_image, ssim_per_image
from eval.report import fid_against_statistics
from pipelines.datasets import DataConfig, build_splits
from helpers import job, one_line_error
from configio.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.limit=48", "train.batch_size=16", "quantizer.codebook_size=16", "network.hidden_channels=8",
        "network.residual_channels=4", "train.max_steps=3", "train.eval_every=3", "train.eval_batch_size=48"]


def real_images(data_root, n=12):
    test = build_splits(DataConfig(root=str(data_root), limit=48), seed=0)["test"]
    return torch.stack([test[i][0] for i in range(n)])


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


@pytest.mark.filterwarnings("ignore")  # small-sample notes are expected with toy features
def test_fid_against_statistics_is_the_clean_fid_quantity():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 64))
    gen = rng.normal(0.3, 1.2, size=(25, 64))
    mu, sigma = feature_statistics(ref)
    value, method = fid_against_statistics(gen, mu, sigma)
    assert "low-rank" in method
    assert value == pytest.approx(fid_from_features(gen, ref, method="lowrank")["fid"], rel=1e-8)
    many = rng.normal(0.3, 1.2, size=(200, 16))
    ref16 = rng.normal(size=(300, 16))
    value, method = fid_against_statistics(many, *feature_statistics(ref16))
    assert value == pytest.approx(frechet_distance(*feature_statistics(many), *feature_statistics(ref16)), rel=1e-6)


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

@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("evalrun")
    job("pipelines.train_tokenizer", "--output", run / "tokenizer", f"data.root={data_root}", *TINY)
    # Stand-in samples: real test images written as PNG, the way pipelines.sample writes its images.
    samples = run / "samples" / "images"
    samples.mkdir(parents=True)
    for i, image in enumerate(real_images(data_root, 6)):
        Image.fromarray((image[0] * 255).round().byte().numpy()).save(samples / f"{i:06d}.png")
    return run


def test_report_job_writes_json_and_markdown(mini_run, data_root):
    proc = job("pipelines.evaluate", "--run", mini_run, "num_images=8", "fid_batch_size=8")
    assert "wrote" in proc.stdout
    report = json.loads((mini_run / "eval" / "report.json").read_text())
    section = report["tokenizer_eval"]
    assert report["protocol"] == "clean" and report["num_test_images"] == 8 and report["limited"]
    rfid = section["rfid"]
    assert rfid["available"] and rfid["fid"] > 0 and rfid["num_images"] == 8 and rfid["num_reference_images"] == 8
    assert len(rfid["feature_extractor_sha256"]) == 64 and rfid["feature_extractor"]
    samples = report["samples_fid"]
    assert samples["available"] and samples["num_images"] == 6 and samples["num_reference_images"] == 8
    assert samples["feature_extractor_sha256"] == rfid["feature_extractor_sha256"] and samples["reference_cached"] == rfid["reference_cached"]
    # The reference statistics use pipelines/sample.py's naming, so both jobs share one cache file.
    assert list((data_root / "fid_stats").glob("fashion_mnist-8_test_32_clean_*.npz"))
    assert section["lpips"]["available"] in (True, False)
    if not section["lpips"]["available"]:
        assert section["lpips"]["reason"]
    book = section["codebook"]
    assert 0 < book["usage"] <= 1 and book["dead_codes"] == 16 - round(book["usage"] * 16)
    assert len(book["per_position"]["codes_used_per_position"]["values"]) == 64
    assert len(book["per_position"]["learned_pi_perplexity"]["values"]) == 64
    assert sum(report["code_counts"]) == 8 * 64

    from stage1_tokenizer.model import Tokenizer

    images = real_images(data_root, 8)
    recon, _ = Tokenizer.from_pretrained(mini_run / "tokenizer").reconstruct(images)
    recon = recon.float().clamp(0, 1)
    expected = np.mean([reference_psnr(recon[i].double().numpy(), images[i].double().numpy()) for i in range(8)])
    assert section["psnr"] == pytest.approx(expected, rel=1e-4)
    markdown = (mini_run / "eval" / "report.md").read_text()
    assert "Protocol: clean" in markdown and rfid["feature_extractor_sha256"] in markdown
    assert "8 images vs 8 reference images" in markdown and "seconds per 1,000 images" in markdown


def test_paper_protocol_resizes_and_says_so(mini_run, data_root):
    from eval.report import evaluate_reconstructions
    from stage1_tokenizer.model import Tokenizer

    tokenizer = Tokenizer.from_pretrained(mini_run / "tokenizer")
    test = build_splits(DataConfig(root=str(data_root), limit=48), seed=0)["test"]
    subset = torch.utils.data.Subset(test, range(6))
    section, _ = evaluate_reconstructions(tokenizer, subset, protocol="paper", lpips=False)
    assert "256x256" in section["image_metrics"] and "paper" in section["image_metrics"]
    images = real_images(data_root, 6)
    recon = tokenizer.reconstruct(images)[0].float().clamp(0, 1)
    resize = lambda x: torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False).clamp(0, 1)
    assert section["psnr"] == pytest.approx(float(psnr_per_image(resize(recon), resize(images)).mean()), rel=1e-5)
    assert section["rfid"]["available"] is False


def test_compare_job_writes_table_and_histograms(tmp_path, data_root, mini_run, capsys):
    from pipelines import compare

    out = tmp_path / "compare"
    # mini_run is a finished VQ-WAE run with exactly these settings: compare must reuse it and train only VQ-VAE.
    shutil.copytree(mini_run / "tokenizer", out / "vqwae" / "tokenizer")
    args = ["--output", str(out), f"data.root={data_root}", *TINY, "models=[vqvae,vqwae]", "eval.num_images=8",
            "eval.rfid=false"]
    compare.main(args)
    assert "vqwae: reusing the finished run" in capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert "| vqvae |" in table and "| vqwae |" in table and "3 steps of batch 16" in table and "Protocol: clean" in table
    data = json.loads((out / "table.json").read_text())
    assert [row["model"] for row in data["models"]] == ["vqvae", "vqwae"]
    assert all(row["num_test_images"] == 8 and row["train_seconds"] is not None for row in data["models"])
    assert (out / "codebook_usage.png").stat().st_size > 1000
    for name in ("vqvae", "vqwae"):
        saved = (out / name / "tokenizer" / "job_config.yaml").read_text()
        assert f"name: {name}" in saved and "max_steps: 3" in saved and "seed: 0" in saved
        assert (out / name / "eval" / "report.md").is_file()
    compare.main(args)
    again = capsys.readouterr().out
    assert "vqvae: reusing the finished run" in again and "vqwae: reusing the evaluation" in again


# ---------------------------------------------------------------------------------------------- error paths

def test_missing_run_folder_is_one_line_error(tmp_path):
    one_line_error(job("pipelines.evaluate", "--run", tmp_path / "nope", check=False), "run folder")


def test_run_without_tokenizer_is_one_line_error(tmp_path, capsys):
    from pipelines import evaluate

    (tmp_path / "empty").mkdir()
    in_process_error(evaluate.main, ["--run", tmp_path / "empty"], capsys, "make tokenizer")


def in_process_error(main, argv, capsys, fragment):
    from pipelines.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(list(map(str, argv))))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-3:]


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    from pipelines import compare, evaluate

    in_process_error(evaluate.main, ["--run", tmp_path, "protocol=tiny"], capsys, "protocol")
    in_process_error(evaluate.main, ["--run", tmp_path, "num_images=1"], capsys, "num_images")
    in_process_error(compare.main, ["--output", tmp_path / "c", "quantizer.name=vqvae"], capsys, "models=")
    in_process_error(compare.main, ["--output", tmp_path / "c", "models=[sqvae]"], capsys, "sqvae")
    in_process_error(compare.main, ["--output", tmp_path / "c", "train.maxsteps=3"], capsys, "train.maxsteps")
    in_process_error(compare.main, ["--output", tmp_path / "c", "eval.protocol=tiny"], capsys, "protocol")
    assert not (tmp_path / "c").exists()
