"""The machine failing under a job, at each kind of output: a write that fails (a full disk, injected; a real
file-size limit) ends in one `error:` line naming the file and the OS's reason, exit status 2, no traceback, with
the earlier complete outputs intact and nothing half-written where a complete file is expected; an interrupted job
that is not a training stops with one line and exit status 143, leaving nothing finished-looking.

The jobs run in this process (their `main` under `run_cli`, as `python -m` runs them) wherever a patched writer
is enough; a real `ulimit -f` and signals passed from a parent job to its child need processes of their own.
"""
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, TINY_PRIOR_ARGS, TINY_TOKENIZER_ARGS, fail_writes, write_code_set

from configio.cli import STOPPED_AT_ONCE, run_cli
from pipelines import evaluate, extract_codes, sample, train_prior, train_tokenizer
from pipelines.runs import load_codes
from stage2_prior.model import CodePrior

NO_SPACE = "No space left on device; free space on that disk or choose another output"


def ends_in_one_error_line(capsys, main, argv, named):
    """Run a job's main as `python -m` does; it must end with status 2 and one line naming `named`."""
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write '{named}"), last
    return last


def no_temporaries(folder):
    return not [p for p in folder.rglob(".*.tmp")]


def prior_args(tiny_run, out):
    return ["--codes", tiny_run / "codes", "--output", out, "--config", "configs/prior.yaml", *TINY_PRIOR_ARGS]


@pytest.mark.parametrize("kind", ["checkpoint", "best weights", "export"])
def test_a_full_disk_during_training(tiny_run, tmp_path, monkeypatch, capsys, kind):
    out = tmp_path / "prior"  # 12 steps: evaluations and checkpoints at steps 6 and 12, then the export
    fragment, named = {"checkpoint": ("step_0000012", out / "checkpoints" / "step_0000012"),
                       "best weights": (f"{out.name}/best/.export.", out / "best"),
                       "export": (f"{out.name}/.export.", out)}[kind]
    fail_writes(monkeypatch, fragment)
    last = ends_in_one_error_line(capsys, train_prior.main, prior_args(tiny_run, out), named)
    assert last == f"error: cannot write '{named}': {NO_SPACE}"
    monkeypatch.undo()
    assert not (out / "model.safetensors").exists() and no_temporaries(out)
    if kind != "best weights":  # the complete checkpoint of step 6 is what a run resumes from
        assert (out / "checkpoints" / "latest").read_text().strip() == ("step_0000012" if kind == "export" else "step_0000006")
        CodePrior.from_pretrained(out / "best")
    run_cli(lambda: train_prior.main([str(a) for a in prior_args(tiny_run, out)]))  # with room, it finishes the run
    CodePrior.from_pretrained(out)


def test_a_full_disk_while_writing_codes(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "codes"
    fail_writes(monkeypatch, ".train.safetensors.")  # the last split: val and test are written before it
    ends_in_one_error_line(capsys, extract_codes.main, ["--tokenizer", tiny_run / "tokenizer", "--output", out],
                           out / "train.safetensors")
    monkeypatch.undo()
    assert load_codes(out / "val.safetensors") and load_codes(out / "test.safetensors")
    assert not (out / "train.safetensors").exists() and not (out / "summary.json").exists() and no_temporaries(out)


def sample_args(tiny_run, out, *settings):
    return ["--tokenizer", tiny_run / "tokenizer", "--prior", tiny_run / "prior", "--output", out, "num_samples=6",
            "batch_size=6", *settings]


@pytest.mark.parametrize("kind", ["images", "metrics", "FID cache"])
def test_a_full_disk_while_sampling(tiny_run, tmp_path, monkeypatch, capsys, data_root, kind):
    out = tmp_path / "samples"
    if kind == "FID cache":  # a reference size no other test uses, so its statistics are computed and cached here
        fail_writes(monkeypatch, ".npz")
        ends_in_one_error_line(capsys, sample.main, sample_args(tiny_run, out, "fid_reference_images=13",
                                                                "fid_batch_size=13"), data_root / "fid_stats")
        assert not list((data_root / "fid_stats").glob("*-13_*")) and no_temporaries(data_root / "fid_stats")
    else:
        fragment, named = {"images": (".images.", out / "images"), "metrics": (".metrics.json.", out / "metrics.json")}[kind]
        fail_writes(monkeypatch, fragment)
        ends_in_one_error_line(capsys, sample.main, sample_args(tiny_run, out, "fid=false"), named)
    assert not (out / "metrics.json").exists() and no_temporaries(out)
    assert (kind == "images") != (len(list((out / "images").glob("*.png"))) == 6)  # images are whole or absent


def test_a_full_disk_while_writing_the_report(tiny_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "tokenizer", run / "tokenizer")
    fail_writes(monkeypatch, ".report.json.")  # the report is read as complete once report.json is there
    ends_in_one_error_line(capsys, evaluate.main, ["--run", run, "rfid=false", "fid=false", "lpips=false"],
                           run / "eval" / "report.json")
    assert (run / "eval" / "report.md").is_file() and not (run / "eval" / "report.json").exists()
    assert no_temporaries(run)


def test_a_folder_that_vanishes_during_a_checkpoint_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "prior"
    real_save_file = safetensors.torch.save_file

    def removed_meanwhile(tensors, filename, metadata=None):
        if "step_0000006" in str(filename):
            shutil.rmtree(out / "checkpoints")  # as `rm -r` by hand while the job runs
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", removed_meanwhile)
    named = out / "checkpoints" / "step_0000006"
    last = ends_in_one_error_line(capsys, train_prior.main, prior_args(tiny_run, out), named)
    assert last == (f"error: cannot write '{named}': No such file or directory; a folder on its way is missing "
                    "(removed while the job ran?): run the same command again")


def test_a_real_file_size_limit_while_continuing_a_training(tiny_run, tmp_path, data_root):
    """The issue's own trial: `ulimit -f`, then raising train.max_steps on a finished tiny run. The optimizer state
    of the next checkpoint is the first file larger than the limit."""
    out = tmp_path / "tokenizer"
    shutil.copytree(tiny_run / "tokenizer", out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_0000006").iterdir()}
    limit = 150_000  # bytes: above every file but the optimizer state (about 200 kB)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cmd = [sys.executable, "-m", "pipelines.train_tokenizer", "--output", str(out), f"data.root={data_root}",
           *TINY_TOKENIZER_ARGS, "train.max_steps=8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot write '{out / 'checkpoints' / 'step_0000008'}': File too large; the file-size limit "
        "(ulimit -f) is below what it needs: raise the limit or choose another output")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_0000006").iterdir()} == before
    assert not (out / "checkpoints" / "step_0000008").exists() and no_temporaries(out)
    run_cli(lambda: train_tokenizer.main(cmd[3:]))  # without the limit, the same command continues to the end
    assert (out / "model.safetensors").is_file()


def test_interrupted_sampling_stops_at_once_with_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    real_png = sample.png_bytes
    written = []

    def interrupted_png(image):
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        written.append(1)
        return real_png(image)

    monkeypatch.setattr(sample, "png_bytes", interrupted_png)
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: sample.main([str(a) for a in sample_args(tiny_run, out, "fid=false")]))
    assert exited.value.code == 143 and len(written) == 3  # stopped inside the fourth image
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted (SIGTERM); {STOPPED_AT_ONCE}"
    assert not (out / "images").exists() and not (out / "metrics.json").exists() and no_temporaries(out)


PARENT_JOB = """
import sys
from configio.cli import run_cli
from pipelines.chain import run_job
run_cli(lambda: run_job("pipelines.train_prior", sys.argv[1:], "training the prior"))
"""


def test_a_parent_job_passes_one_signal_to_its_training_child(tmp_path):
    """compare and sweep run each step as a child job: SIGTERM to the parent reaches the child once, which finishes
    its step, checkpoints it and says so; the parent adds no line of its own."""
    codes = write_code_set(tmp_path / "codes")
    out = tmp_path / "prior"
    args = ["--codes", str(codes), "--output", str(out), "prior.num_layers=1", "prior.hidden_size=32",
            "prior.num_heads=2", "train.batch_size=16", "train.max_steps=2000", "train.checkpoint_every=1000",
            "train.eval_every=1000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", PARENT_JOB, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")))
    reader.start()
    while proc.poll() is None and not re.search(rb"\b[1-9]\d*/2000\b", b"".join(chunks)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    reader.join()
    lines = b"".join(chunks).decode(errors="replace").strip().splitlines()
    found = re.fullmatch(r"prior: interrupted \(SIGTERM\) at step (\d+) of 2000; wrote (\S+); run the same command "
                         r"again to resume from step \d+", lines[-1])
    assert found, lines[-3:]
    assert found[2] == str(out / "checkpoints" / f"step_{int(found[1]):07d}") and os.path.isdir(found[2])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{int(found[1]):07d}"
