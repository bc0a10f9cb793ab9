"""Exact resume under SIGKILL at random moments and after SIGTERM at a random step, for both training jobs (and in
two processes), across several epoch boundaries.

Each job trains 24 steps on a split of 64 items in batches of 16 (4 steps an epoch, so six epochs), with randomness in
the step (the prior's dropout and label dropout; the tokenizer's stochastic SQ-VAE quantization), a checkpoint every
other step and an evaluation every fourth. A run killed at random moments (during steps, checkpoint writes,
evaluations and the export) and resumed each time must end bit-identical to the uninterrupted run: weights,
optimizer state, exported model and metrics. After every kill, nothing that looks finished may be partial. A run
sent SIGTERM, with no periodic checkpoint to fall back on, must write the checkpoint of the step it was on, say so
in one line, exit with 143, and resume from there to the same end.
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


TWO_PROCESSES = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]


def command(job, out, data_root, codes, *extra, processes=1):
    _, args = JOBS[job]
    inputs = ["--codes", str(codes)] if job == "prior" else [f"data.root={data_root}"]
    launcher = [sys.executable, *(TWO_PROCESSES if processes == 2 else [])]
    return [*launcher, *args[:2], "--output", str(out), *inputs, *args[2:], *COMMON, "train.resume=latest", *extra]


def start(cmd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_and_signal(cmd, target_step, delay, signum=signal.SIGKILL):
    """Start the job and send it `signum` `delay` seconds after its progress bar reaches `target_step` (or shows a
    later step). Returns (exit status, stderr); a job that ends first gets no signal."""
    proc = start(cmd)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")))
    reader.start()
    while proc.poll() is None:
        steps = [int(m) for m in re.findall(rf"(\d+)/{STEPS}\b", b"".join(chunks).decode(errors="replace"))]
        if steps and max(steps) >= target_step:
            time.sleep(delay)
            proc.send_signal(signum)
            break
        time.sleep(0.005)
    status = proc.wait(timeout=300)
    reader.join()
    return status, b"".join(chunks).decode(errors="replace")


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


def assert_bit_identical(interrupted, reference, what):
    final = f"checkpoints/step_{STEPS:07d}"
    for name in (f"{final}/model.safetensors", f"{final}/optimizer.safetensors", "model.safetensors"):
        a, b = load_file(interrupted / name), load_file(reference / name)
        assert a.keys() == b.keys(), name
        for key in b:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after {what}"
    assert comparable_metrics(interrupted) == comparable_metrics(reference)


def finish(cmd):
    proc = start(cmd)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return write_code_set(tmp_path_factory.mktemp("codes") / "codes")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root, codes):
    """reference(job, processes): the uninterrupted run, made once per module."""
    made = {}

    def make(job, processes=1):
        if (job, processes) not in made:
            out = tmp_path_factory.mktemp("reference") / job
            finish(command(job, out, data_root, codes, processes=processes))
            made[job, processes] = out
        return made[job, processes]

    return make


@pytest.mark.parametrize("job", ["prior", "tokenizer"])
def test_killed_at_random_moments_resumes_bit_identical(job, tmp_path, data_root, codes, reference):
    model_cls, _ = JOBS[job]
    interrupted = tmp_path / "interrupted"

    # Kills land at random steps (up to the last, so also during the final evaluation and export), each a random
    # fraction of a second after the step shows, so some fall inside checkpoint writes and evaluations.
    rng = random.Random(f"{job}-kills")
    targets = sorted(rng.sample(range(1, STEPS + 1), 5)) + [STEPS]
    kills = 0
    for target in targets:
        status, _ = run_and_signal(command(job, interrupted, data_root, codes), target, rng.uniform(0.0, MAX_DELAY[job]))
        kills += status == -signal.SIGKILL
        check_nothing_partial(interrupted, model_cls)
    finish(command(job, interrupted, data_root, codes))
    assert kills >= 4, f"only {kills} kills landed before the run finished"
    assert not list(interrupted.rglob(".*.tmp")), "temporaries of killed writers were left behind"
    assert_bit_identical(interrupted, reference(job), f"{kills} kills")


# The prior in one process is the two-process case without its agreement between processes.
@pytest.mark.parametrize("job, processes", [("tokenizer", 1), ("prior", 2)])
def test_sigterm_at_a_random_step_checkpoints_that_step_and_resumes_bit_identical(job, processes, tmp_path, data_root,
                                                                                  codes, reference):
    interrupted = tmp_path / "interrupted"
    # No periodic checkpoint before the end: only the interruption's own can keep the steps done.
    cmd = command(job, interrupted, data_root, codes, "train.checkpoint_every=1000", processes=processes)
    target = random.Random(f"{job}-{processes}-sigterm").randrange(2, STEPS - 6)
    status, stderr = run_and_signal(cmd, target, 0.0, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    found = re.fullmatch(rf"{job}: interrupted \(SIGTERM\) at step (\d+) of {STEPS}; wrote (\S+); run the same command "
                         r"again to resume from step (\d+)", last)
    assert found and found[1] == found[3] and int(found[1]) >= target, last
    step = int(found[1])
    assert found[2] == str(interrupted / "checkpoints" / f"step_{step:07d}")
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["latest", f"step_{step:07d}"]
    assert "Traceback" not in stderr and not (interrupted / "model.safetensors").exists()
    check_nothing_partial(interrupted, JOBS[job][0])
    finish(cmd)
    assert_bit_identical(interrupted, reference(job, processes), f"SIGTERM at step {step}")
