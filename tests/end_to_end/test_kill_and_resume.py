"""Exact resume under SIGKILL at random moments, for both training jobs, across several epoch boundaries.

Each job trains 24 steps on a split of 64 items in batches of 16 (4 steps an epoch, so six epochs), with randomness in
the step (the prior's dropout and label dropout; the tokenizer's stochastic SQ-VAE quantization), a checkpoint every
other step and an evaluation every fourth. A run killed at random moments (during steps, checkpoint writes,
evaluations and the export) and resumed each time must end bit-identical to the uninterrupted run: weights,
optimizer state, exported model and metrics. After every kill, nothing that looks finished may be partial.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import ROOT, write_code_set
from safetensors.torch import load_file

from stage1_tokenizer.model import Tokenizer
from stage2_prior.model import CodePrior

pytestmark = pytest.mark.slow

STEPS = 24
COMMON = [f"train.max_steps={STEPS}", "train.batch_size=16", "train.checkpoint_every=2", "train.eval_every=4",
          "train.log_every=1"]
JOBS = {
    "prior": (CodePrior, ["-m", "pipelines.train_prior", "prior.num_layers=1", "prior.hidden_size=32", "prior.num_heads=2",
                          "prior.dropout=0.1", "prior.label_dropout=0.2", "train.warmup_steps=3"]),
    "tokenizer": (Tokenizer, ["-m", "pipelines.train_tokenizer", "data.limit=64", "quantizer.name=sqvae",
                              "quantizer.codebook_size=32", "network.hidden_channels=16", "network.residual_channels=4",
                              "network.num_residual_layers=1", "train.eval_images=32", "train.eval_batch_size=32"]),
}


# Seconds after the target step shows before the kill, at most: steps take 10-25 ms on 2 cores here (the job is
# tiny), and a run that has finished is left alone by the run-folder rule, so each kill must land while it runs.
MAX_DELAY = {"prior": 0.05, "tokenizer": 0.05}


def command(job, out, data_root, codes):
    _, args = JOBS[job]
    inputs = ["--codes", str(codes)] if job == "prior" else [f"data.root={data_root}"]
    return [sys.executable, *args[:2], "--output", str(out), *inputs, *args[2:], *COMMON, "train.resume=latest"]


def start(cmd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_and_kill(cmd, target_step, delay):
    """Start the job and SIGKILL it `delay` seconds after its progress bar reaches `target_step` (or shows a later
    step). Returns (killed, stderr); a job that ends first is not killed."""
    proc = start(cmd)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")))
    reader.start()
    while proc.poll() is None:
        steps = [int(m) for m in re.findall(rf"(\d+)/{STEPS}\b", b"".join(chunks).decode(errors="replace"))]
        if steps and max(steps) >= target_step:
            time.sleep(delay)
            proc.kill()
            break
        time.sleep(0.005)
    killed = proc.wait(timeout=300) == -signal.SIGKILL
    reader.join()
    return killed, b"".join(chunks).decode(errors="replace")


def check_nothing_partial(out, model_cls):
    """What looks finished is complete: `latest`, the best weights and the exported model all load."""
    pointer = out / "checkpoints" / "latest"
    if pointer.is_file():
        folder = out / "checkpoints" / pointer.read_text().strip()
        for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json"):
            assert (folder / name).is_file(), f"latest names {folder.name}, which lacks {name}"
        load_file(folder / "model.safetensors")
    for folder in (out / "best", out):
        if (folder / "model.safetensors").is_file():
            model_cls.from_pretrained(folder)
    if (out / "model.safetensors").is_file():
        assert (out / "metrics.json").is_file(), "the export (make target) exists without its metrics"


def comparable_metrics(out):
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


@pytest.mark.parametrize("job", ["prior", "tokenizer"])
def test_killed_at_random_moments_resumes_bit_identical(job, tmp_path, data_root):
    model_cls, _ = JOBS[job]
    codes = write_code_set(tmp_path / "codes") if job == "prior" else None
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"

    proc = start(command(job, reference, data_root, codes))
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]

    # Kills land at random steps (up to the last, so also during the final evaluation and export), each a random
    # fraction of a second after the step shows, so some fall inside checkpoint writes and evaluations.
    rng = random.Random(f"{job}-kills")
    targets = sorted(rng.sample(range(1, STEPS + 1), 5)) + [STEPS]
    kills = 0
    for target in targets:
        killed, _ = run_and_kill(command(job, interrupted, data_root, codes), target, rng.uniform(0.0, MAX_DELAY[job]))
        kills += killed
        check_nothing_partial(interrupted, model_cls)
    proc = start(command(job, interrupted, data_root, codes))
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert kills >= 4, f"only {kills} kills landed before the run finished"
    assert not list(interrupted.rglob(".*.tmp")), "temporaries of killed writers were left behind"

    final = f"checkpoints/step_{STEPS:07d}"
    for name in (f"{final}/model.safetensors", f"{final}/optimizer.safetensors", "model.safetensors"):
        a, b = load_file(interrupted / name), load_file(reference / name)
        assert a.keys() == b.keys(), name
        for key in b:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after {kills} kills"
    assert comparable_metrics(interrupted) == comparable_metrics(reference)
