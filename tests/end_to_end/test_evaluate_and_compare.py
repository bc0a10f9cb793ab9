"""The evaluation layer: metrics against independent references, LPIPS availability, report and compare jobs."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MINI_TOKENIZER_ARGS, in_process_error, job, real_images
from PIL import Image

from eval.image_metrics import psnr_per_image
from pipelines.datasets import DataConfig, build_splits

ROOT = Path(__file__).resolve().parents[2]
TINY = MINI_TOKENIZER_ARGS



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
    assert rfid["available"] and math.isfinite(rfid["fid"]) and rfid["num_images"] == 8 and rfid["num_reference_images"] == 8
    assert len(rfid["feature_extractor_sha256"]) == 64 and rfid["feature_extractor"]
    samples = report["samples_fid"]
    assert samples["available"] and samples["num_images"] == 6 and samples["num_reference_images"] == 8
    assert samples["feature_extractor_sha256"] == rfid["feature_extractor_sha256"] and samples["reference_cached"] == rfid["reference_cached"]
    # The reference statistics use pipelines/sample.py's naming, so both jobs share one cache file.
    assert list((data_root / "fid_stats").glob("fashion_mnist-8_test_32_clean_*.npz"))
    from eval.lpips_metric import alexnet_weights_path

    # LPIPS is computed exactly when its AlexNet trunk is on disk, and otherwise says why it is not
    assert section["lpips"]["available"] == alexnet_weights_path().is_file()
    if not section["lpips"]["available"]:
        assert "alexnet" in section["lpips"]["reason"].lower()
    book = section["codebook"]
    assert 0 < book["usage"] <= 1 and book["dead_codes"] == 16 - round(book["usage"] * 16)
    assert len(book["per_position"]["codes_used_per_position"]["values"]) == 64
    assert len(book["per_position"]["learned_pi_perplexity"]["values"]) == 64
    assert sum(report["code_counts"]) == 8 * 64

    from stage1_tokenizer.model import Tokenizer

    images = real_images(data_root, 8)
    recon, _ = Tokenizer.from_pretrained(mini_run / "tokenizer").reconstruct(images)
    recon = recon.float().clamp(0, 1)
    expected = np.mean([10 * np.log10(1.0 / np.mean((recon[i].double().numpy() - images[i].double().numpy()) ** 2)) for i in range(8)])
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


def test_compare_job_writes_both_tables(tmp_path, data_root, mini_run, capfd):
    from pipelines import compare

    out = tmp_path / "compare"
    # mini_run is a finished VQ-WAE run with exactly these settings: compare must reuse it and train only VQ-VAE.
    shutil.copytree(mini_run / "tokenizer", out / "vqwae" / "tokenizer")
    args = ["--output", str(out), f"data.root={data_root}", *TINY, "models=[vqvae,vqwae]", "eval.num_images=8",
            "eval.rfid=false", "prior.train.max_steps=4", "prior.train.warmup_steps=1", "prior.train.batch_size=16",
            "prior.prior.num_layers=1", "prior.prior.hidden_size=32", "sample.num_samples=20",
            "sample.fid_reference_images=8", "sample.batch_size=10"]
    compare.main(args)
    assert "vqwae/tokenizer is finished with these settings (3 steps); nothing to do" in capfd.readouterr().out
    table = (out / "table.md").read_text()
    assert "| vqvae |" in table and "| vqwae |" in table and "3 tokenizer steps of batch 16" in table
    assert "Protocol: clean" in table and "20 samples each" in table
    data = json.loads((out / "table.json").read_text())
    assert [row["model"] for row in data["models"]] == ["vqvae", "vqwae"]
    for row in data["models"]:
        assert row["num_test_images"] == 8 and row["train_seconds"] is not None
        assert math.isfinite(row["generation_fid"]) and row["generation_fid_num_samples"] == 20
        assert row["generation_fid_num_reference_images"] == 8
        assert 0 < row["prior_test_bits_per_code"] < 8 and row["sampling_seconds"] > 0
    assert (out / "codebook_usage.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
    for name in ("vqvae", "vqwae"):
        saved = (out / name / "tokenizer" / "job_config.yaml").read_text()
        assert f"name: {name}" in saved and "max_steps: 3" in saved and "seed: 0" in saved
        assert (out / name / "eval" / "report.md").is_file() and (out / name / "prior" / "model.safetensors").is_file()


def test_rfid_on_fewer_images_than_the_other_metrics(mini_run):
    job("pipelines.evaluate", "--run", mini_run, "num_images=8", "rfid_images=4", "fid=false", "fid_batch_size=8")
    report = json.loads((mini_run / "eval" / "report.json").read_text())
    rfid = report["tokenizer_eval"]["rfid"]
    assert report["num_test_images"] == 8 and sum(report["code_counts"]) == 8 * 64
    assert rfid["num_images"] == 4 and rfid["num_reference_images"] == 4


# ---------------------------------------------------------------------------------------------- error paths

def test_missing_run_folder_is_one_line_error(tmp_path, capsys):
    from pipelines import evaluate

    in_process_error(evaluate.main, ["--run", tmp_path / "nope"], capsys, "run folder")


def test_run_without_tokenizer_is_one_line_error(tmp_path, capsys):
    from pipelines import evaluate

    (tmp_path / "empty").mkdir()
    in_process_error(evaluate.main, ["--run", tmp_path / "empty"], capsys, "make tokenizer")


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    from pipelines import compare, evaluate, sweep

    in_process_error(evaluate.main, ["--run", tmp_path, "protocol=tiny"], capsys, "protocol")
    in_process_error(evaluate.main, ["--run", tmp_path, "num_images=1"], capsys, "num_images")
    in_process_error(evaluate.main, ["--run", tmp_path, "rfid_images=1"], capsys, "rfid_images")
    in_process_error(compare.main, ["--output", tmp_path / "c", "quantizer.name=vqvae"], capsys, "models=")
    in_process_error(compare.main, ["--output", tmp_path / "c", "models=[nope]"], capsys, "nope")
    in_process_error(compare.main, ["--output", tmp_path / "c", "train.maxsteps=3"], capsys, "train.maxsteps")
    in_process_error(compare.main, ["--output", tmp_path / "c", "eval.protocol=tiny"], capsys, "protocol")
    in_process_error(sweep.main, ["--output", tmp_path / "c", "sizes=[0]"], capsys, "sizes")
    in_process_error(sweep.main, ["--output", tmp_path / "c", "models=[vqvae]"], capsys, "include it")
    in_process_error(sweep.main, ["--output", tmp_path / "c", "rivals=9"], capsys, "rivals")
    assert not (tmp_path / "c").exists()
