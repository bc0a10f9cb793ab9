"""Running the project's jobs as users do (subprocesses) and checking their one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(module, *args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stderr[-3000:]}")
    return proc


def one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr


def in_process_error(main, argv, capsys, fragment, *, alone=False):
    """`main(argv)` run as its job's command line runs it (configio.cli.run_cli), in this process: exit status 2 and
    one last line naming the problem (with `alone`, the only line on stderr). For settings errors, where a
    subprocess would only add its start-up."""
    import pytest

    from configio.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(list(map(str, argv))))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert not alone or len(lines) == 1, lines
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-3:]
    assert "Traceback" not in err


# A tiny run: tokenizer, codes and prior in about half a minute on 2 CPU cores.
TINY_TOKENIZER_ARGS = ["data.limit=96", "train.batch_size=16", "quantizer.codebook_size=32", "network.hidden_channels=16",
                       "network.residual_channels=4", "train.max_steps=6", "train.eval_every=6", "train.eval_batch_size=96"]
TINY_PRIOR_ARGS = ["prior.num_layers=1", "prior.hidden_size=32", "prior.num_heads=2", "train.batch_size=16",
                   "train.max_steps=12", "train.warmup_steps=2", "train.eval_every=6", "train.checkpoint_every=6"]
# Smaller still, a tokenizer alone (evaluation, compare, sweep): a few seconds.
MINI_TOKENIZER_ARGS = ["data.limit=48", "train.batch_size=16", "quantizer.codebook_size=16", "network.hidden_channels=8",
                       "network.residual_channels=4", "train.max_steps=3", "train.eval_every=3", "train.eval_batch_size=48"]
TINY_SAMPLE_ARGS = ["num_samples=8", "batch_size=4", "fid_reference_images=16", "fid_batch_size=8"]


def train_tiny_run(run, data_root):
    """`run`/tokenizer, codes and prior, made by the jobs as `make prior` makes them."""
    job("pipelines.train_tokenizer", "--output", run / "tokenizer", f"data.root={data_root}", *TINY_TOKENIZER_ARGS)
    job("pipelines.extract_codes", "--tokenizer", run / "tokenizer", "--output", run / "codes")
    job("pipelines.train_prior", "--codes", run / "codes", "--output", run / "prior", "--config", "configs/prior.yaml",
        *TINY_PRIOR_ARGS)
    return run


def write_code_set(folder, num_train=64, num_eval=32, codebook_size=16, side=4, num_classes=3, seed=0):
    """A small random code set in the format pipelines.extract_codes writes (train/val/test.safetensors)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, n in (("train", num_train), ("val", num_eval), ("test", num_eval)):
        codes = torch.randint(0, codebook_size, (n, side * side), generator=generator).to(torch.int16)
        labels = torch.randint(0, max(1, num_classes), (n,), generator=generator)
        metadata = {"codebook_size": str(codebook_size), "grid": json.dumps([side, side]), "tokenizer_sha256": "synthetic",
                    "num_classes": str(num_classes), "split": split, "order": "raster"}
        save_file({"codes": codes, "labels": labels}, str(folder / f"{split}.safetensors"), metadata=metadata)
    return folder


def real_images(data_root, n=12):
    """The first n Fashion-MNIST test images of a 48-image-per-split subset, (n, 1, 32, 32) in [0, 1]."""
    import torch

    from pipelines.datasets import DataConfig, build_splits

    test = build_splits(DataConfig(root=str(data_root), limit=48), seed=0)["test"]
    return torch.stack([test[i][0] for i in range(n)])


def fail_writes(monkeypatch, fragment, number=None):
    """Make every write to a path containing `fragment` fail as the OS fails it (default: a full disk, ENOSPC),
    after writing half its data. The project's writers all end in these calls: Path.write_bytes / write_text, and
    safetensors' save_file, which reports the OS's error in its own exception type."""
    import errno
    import pathlib

    import safetensors.torch
    from safetensors import SafetensorError

    import configio.files

    number = errno.ENOSPC if number is None else number
    real_write_bytes, real_save_file = pathlib.Path.write_bytes, safetensors.torch.save_file

    def write_bytes(self, data):
        if fragment not in str(self):
            return real_write_bytes(self, data)
        real_write_bytes(self, bytes(data)[: len(data) // 2])
        raise OSError(number, os.strerror(number))

    def write_text(self, text, encoding=None, errors=None, newline=None):
        return write_bytes(self, text.encode(encoding or "utf-8", errors or "strict"))

    def save_file(tensors, filename, metadata=None):
        if fragment not in str(filename):
            return real_save_file(tensors, filename, metadata=metadata)
        real_write_bytes(Path(filename), b"\0" * 64)
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(number)} (os error {number})")

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(configio.files, "save_file", save_file)
