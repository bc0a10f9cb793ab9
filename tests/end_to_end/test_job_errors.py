"""Bad input ends with one clear line, a non-zero exit, and nothing already written damaged."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from configio.errors import CheckpointError
from stage1_tokenizer.model import Tokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ["network.hidden_channels=16", "network.residual_channels=4", "quantizer.codebook_size=16",
        "train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "train.eval_batch_size=8"]


def run(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipelines.train_tokenizer", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-3:]
    assert "Traceback" not in proc.stderr


def test_unknown_key_fails_before_any_work(tmp_path):
    proc = run("--output", str(tmp_path / "out"), "train.maxsteps=3")
    assert_one_line_error(proc, "unknown config key 'train.maxsteps'")
    assert not (tmp_path / "out").exists()


def test_config_that_does_not_fit_the_data(tmp_path):
    proc = run("--config", "configs/celeba.yaml", "--output", str(tmp_path / "out"), "data.image_size=32")
    assert_one_line_error(proc, "64x64")
    assert not (tmp_path / "out").exists()


def _folder(tmp_path, corrupt):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(24):
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / f"{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_unreadable_image(tmp_path):
    folder = _folder(tmp_path, corrupt=True)
    proc = run("--output", str(tmp_path / "out"), "data.name=folder", f"data.path={folder}", f"data.root={tmp_path}", *TINY)
    assert_one_line_error(proc, "broken.png")


def test_missing_dataset_offline(tmp_path):
    proc = run("--output", str(tmp_path / "out"), "data.name=mnist", f"data.root={tmp_path}", "data.download=false", *TINY)
    assert_one_line_error(proc, "MNIST")


def test_corrupt_checkpoint_on_resume_leaves_files_alone(tmp_path):
    folder = _folder(tmp_path, corrupt=False)
    out = tmp_path / "out"
    common = ["--output", str(out), "data.name=folder", f"data.path={folder}", f"data.root={tmp_path}", *TINY,
              "train.checkpoint_every=1"]
    first = run(*common)
    assert first.returncode == 0, first.stderr[-2000:]
    step = out / "checkpoints" / "step_0000002"
    (step / "model.safetensors").write_bytes(b"\x00" * 100)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = run(*common, "train.resume=latest", "train.max_steps=4")
    assert_one_line_error(proc, "corrupt")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts and p.name != ".lock"}
    assert all(before[p] == data for p, data in after.items())
    # The same settings find the run finished and touch nothing.
    proc = run(*common)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert all(before[p] == p.read_bytes() for p in before if "logs" not in p.parts and p.exists())


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="make tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "nothing")
    model = Tokenizer(TokenizerConfig(image_size=32, channels=1))
    model.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Tokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt"):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_failed_test_evaluation_leaves_no_finished_looking_export(tmp_path):
    """A truncated JPEG that only the test split holds passes the header check and breaks the final evaluation: the
    job must end in one line with neither the export (the make target) nor metrics.json written, on every re-run."""
    import torch

    folder = tmp_path / "images"
    folder.mkdir()
    n = 24
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 10, 50, 0)).save(folder / f"{i:02d}.jpg", quality=95)
    # The folder split's own rule (test first, seed 0): truncate a file that lands in the test split.
    first_test = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()[0]
    path = folder / f"{first_test:02d}.jpg"
    path.write_bytes(path.read_bytes()[:400])
    out = tmp_path / "out"
    args = ["--output", str(out), "data.name=folder", f"data.path={folder}", f"data.root={tmp_path}", *TINY,
            "train.resume=latest"]
    for _ in range(2):
        proc = run(*args)
        assert_one_line_error(proc, path.name)
        assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def test_training_that_diverges_stops_at_the_first_non_finite_value(tmp_path):
    folder = _folder(tmp_path, corrupt=False)
    out = tmp_path / "out"
    proc = run("--output", str(out), "data.name=folder", f"data.path={folder}", f"data.root={tmp_path}", *TINY,
               "train.lr=1e30", "train.max_steps=8", "train.checkpoint_every=1")
    assert_one_line_error(proc, "diverged at step")
    assert "lower train.lr" in proc.stderr and not (out / "model.safetensors").exists()


def test_a_tokenizer_config_that_is_a_list_is_one_error(tmp_path):
    model = Tokenizer(TokenizerConfig(image_size=32, channels=1))
    model.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="config"):
        Tokenizer.from_pretrained(tmp_path / "tok")
