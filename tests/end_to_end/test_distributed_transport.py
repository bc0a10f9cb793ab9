"""Two CPU processes (gloo): transport_scope=global_batch reproduces the single-process loss on the global batch, and
training with it or with the semi-discrete form keeps every process's weights equal."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stage1_tokenizer.quantizers import VQWAEQuantizer

ROOT = Path(__file__).resolve().parents[2]
WORLD, B, D, SIDE, K = 2, 6, 4, 3, 16  # 9 positions: an uneven split between the two processes


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(WORLD * B, D, SIDE, SIDE, generator=g)
    quantizer = VQWAEQuantizer(K, D, SIDE * SIDE, beta=0.5, transport_scope="global_batch")
    with torch.no_grad():
        quantizer.codebook.copy_(torch.randn(K, D, generator=g))
        quantizer.logits.copy_(torch.randn(SIDE * SIDE, K, generator=g))
    return z, quantizer


def _grads(quantizer, z):
    z = z.clone().requires_grad_()
    loss = quantizer(z).losses["wasserstein"]
    loss.backward()
    return float(loss.detach()), z.grad, quantizer.codebook.grad, quantizer.logits.grad


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z, quantizer = _inputs()
        loss, gz, gc, gw = _grads(quantizer, z[rank * B : (rank + 1) * B])
        torch.save({"loss": loss, "z": gz, "codebook": gc, "logits": gw}, Path(out_dir) / f"rank{rank}.pt")
        # Without it, one rank may tear gloo down while the other is still using it (an intermittent SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_global_batch_loss_and_gradients_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z, quantizer = _inputs()
    loss, gz, gc, gw = _grads(quantizer, z)  # one process, the concatenated batch, no process group

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))

    # What DDP optimises: the mean of the per-process losses, with gradients averaged over processes.
    close(torch.tensor(sum(r["loss"] for r in ranks) / WORLD), torch.tensor(loss))
    close(sum(r["codebook"] for r in ranks) / WORLD, gc)
    close(sum(r["logits"] for r in ranks) / WORLD, gw)
    # Each latent's gradient lands on its own process; the encoder's parameter gradients are then averaged.
    close(torch.cat([r["z"] for r in ranks]) / WORLD, gz)


@pytest.mark.parametrize("transport", [
    ["quantizer.transport_scope=global_batch"],
    # Potentials stepped on both processes' loads, codewords drawn and moved by process 0: codebooks stay equal.
    ["quantizer.form=global", "quantizer.solver=semidiscrete", "quantizer.codebook_size=256"],
], ids=["global_batch", "semidiscrete"])
def test_two_processes_train_with_one_transport(tmp_path, data_root, transport):
    out = tmp_path / "tokenizer"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = launcher + [
        "-m", "pipelines.train_tokenizer", "--output", str(out), f"data.root={data_root}", "data.limit=256",
        "train.batch_size=8", "quantizer.codebook_size=32", "network.hidden_channels=16", "network.residual_channels=8",
        "train.eval_images=32", "train.eval_batch_size=32", "train.log_every=2", "train.max_steps=4",
        "train.eval_every=4", "train.checkpoint_every=4", *transport,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["max_param_difference_across_processes"] == 0.0
