"""End-to-end: the training job as users run it (a subprocess), on a small Fashion-MNIST subset."""
import json
import os
import signal
import subprocess
import sys
import time
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


def test_interrupted_run_resumes_to_the_same_state(tmp_path, data_root, trained_run):
    """Kill a run at an arbitrary moment (possibly mid-checkpoint), resume it: it ends where the uninterrupted one did."""
    out = tmp_path / "tokenizer"
    args = ["train.max_steps=60", "train.eval_every=20", "train.checkpoint_every=20"]
    cmd = [sys.executable, "-m", "pipelines.train_tokenizer", "--output", str(out), f"data.root={data_root}",
           *SMALL, *args, "train.checkpoint_every=7", "train.resume=latest"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be interrupted"
    run_job(out, *args, "train.checkpoint_every=7", "train.resume=latest", data_root=data_root)
    resumed = load_file(out / "checkpoints" / "step_0000060" / "model.safetensors")
    reference = load_file(trained_run / "checkpoints" / "step_0000060" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)
    opt_a = load_file(out / "checkpoints" / "step_0000060" / "optimizer.safetensors")
    opt_b = load_file(trained_run / "checkpoints" / "step_0000060" / "optimizer.safetensors")
    for key in opt_b:
        torch.testing.assert_close(opt_a[key], opt_b[key], rtol=0, atol=0, msg=key)
    assert json.loads((out / "metrics.json").read_text())["mse"] == json.loads((trained_run / "metrics.json").read_text())["mse"]


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
