"""End-to-end: the training job as users run it (a subprocess), on a small Fashion-MNIST subset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stage1_tokenizer.model import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.limit=256", "train.batch_size=16", "quantizer.codebook_size=64", "network.hidden_channels=32",
    "network.residual_channels=8", "train.eval_images=64", "train.eval_batch_size=64", "train.log_every=2",
]


def run_job(output, *overrides, data_root, launcher=None, timeout=300, check=True):
    cmd = (launcher or [sys.executable]) + ["-m", "pipelines.train_tokenizer", "--output", str(output),
                                            f"data.root={data_root}", *SMALL, *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("run") / "tokenizer"
    run_job(out, "train.max_steps=60", "train.eval_every=20", "train.checkpoint_every=20", data_root=data_root)
    return out


def test_training_writes_every_artifact_and_learns(trained_run, data_root):
    out = trained_run
    for name in ["model.safetensors", "config.json", "metrics.json", "reconstructions.png", "codebook_usage.png",
                 "job_config.yaml", "best/model.safetensors", "checkpoints/latest"]:
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["mse", "psnr", "ssim", "perplexity", "usage", "codebook_size", "num_images", "split"]:
        assert key in metrics, key
    assert metrics["split"] == "test" and metrics["num_images"] == 256 and metrics["codebook_size"] == 64
    assert 1 <= metrics["perplexity"] <= 64 and 0 < metrics["usage"] <= 1
    # The reconstruction error fell: the trained model beats the same architecture at initialisation by far.
    tokenizer = Tokenizer.from_pretrained(out)
    untrained = Tokenizer(tokenizer.config).eval()
    from pipelines.datasets import DataConfig, build_splits
    test = build_splits(DataConfig(root=str(data_root), limit=256), seed=0)["test"]
    images = torch.stack([test[i][0] for i in range(64)])
    with torch.no_grad():
        before = float(((untrained.reconstruct(images)[0] - images) ** 2).mean())
    assert metrics["mse"] < 0.5 * before, (metrics["mse"], before)
    assert metrics["psnr"] > 12


def test_two_processes_keep_identical_weights(tmp_path, data_root):
    out = tmp_path / "tokenizer"
    # accelerate's `--cpu --num_processes 2` starts one process unless MPI is set up; `--multi_gpu` starts two
    # through torchrun, and the job falls back to gloo on a machine without an accelerator.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_job(out, "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", launcher=launcher, data_root=data_root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["max_param_difference_across_processes"] == 0.0


def test_vqvae_flag_trains_the_baseline(tmp_path, data_root):
    out = tmp_path / "tokenizer"
    run_job(out, "quantizer.name=vqvae", "train.max_steps=4", "train.eval_every=4", data_root=data_root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantizer"] == "vqvae"
    assert "logits" not in " ".join(load_file(out / "model.safetensors"))
