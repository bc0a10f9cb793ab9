"""The stage-1 -> codes -> stage-2 -> samples chain in miniature, as `make sample` runs it."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_PRIOR_ARGS, TINY_SAMPLE_ARGS, TINY_TOKENIZER_ARGS, in_process_error, job, one_line_error

from pipelines.datasets import DataConfig, build_splits
from pipelines.runs import load_codes
from stage1_tokenizer.model import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_ARGS, PRIOR_ARGS = TINY_TOKENIZER_ARGS, TINY_PRIOR_ARGS


@pytest.fixture
def chain(tiny_run):
    return tiny_run


def test_every_artifact(chain):
    for name in ["codes/train.safetensors", "codes/val.safetensors", "codes/test.safetensors", "prior/model.safetensors",
                 "prior/config.json", "prior/metrics.json", "samples/grid.png",
                 "samples/metrics.json"]:
        assert (chain / name).is_file(), name
    assert len(list((chain / "samples" / "images").glob("*.png"))) == 8
    prior = json.loads((chain / "prior" / "metrics.json").read_text())
    assert 0 < prior["val_bits_per_code"] < 2 * prior["uniform_bits_per_code"] and "test_bits_per_code" in prior
    samples = json.loads((chain / "samples" / "metrics.json").read_text())
    fid = samples["fid"]
    assert fid["fid"] > 0 and fid["num_samples"] == 8 and fid["num_reference_images"] == 16
    assert fid["feature_extractor_sha256"] and samples["sampling_seconds"] > 0
    assert samples["settings"]["top_p"] == 1.0


def test_codes_round_trip_and_reuse(chain, data_root):
    codes = load_codes(chain / "codes" / "test.safetensors")
    tokenizer = Tokenizer.from_pretrained(chain / "tokenizer")
    test = build_splits(DataConfig(root=str(data_root), limit=96), seed=0)["test"]
    images = torch.stack([test[i][0] for i in range(10)])
    side = tokenizer.config.latent_size
    stored = tokenizer.decode(codes.codes[:10].view(10, side, side))
    direct, _ = tokenizer.reconstruct(images)
    torch.testing.assert_close(stored, direct)
    assert torch.equal(codes.labels[:10], torch.tensor([test[i][1] for i in range(10)]))
    before = (chain / "codes" / "train.safetensors").stat().st_mtime_ns
    out = job("pipelines.extract_codes", "--tokenizer", chain / "tokenizer", "--output", chain / "codes")
    assert "reused: train, val, test" in out.stdout
    assert (chain / "codes" / "train.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("setting, fragment", [
    ("top_p=1.5", "top_p must lie in (0, 1]"),
    ("temperature=-1", "temperature must be > 0"),
    ("label=12", "label=12 is not a class"),
])
def test_bad_sampling_settings(chain, tmp_path, capsys, setting, fragment):
    from pipelines import sample

    in_process_error(sample.main, ["--tokenizer", chain / "tokenizer", "--prior", chain / "prior", "--output",
                                   tmp_path / "s", "num_samples=2", setting], capsys, fragment)
    assert not (tmp_path / "s" / "images").exists()


def test_prior_paired_with_another_tokenizer(chain, tmp_path, data_root, capsys):
    from pipelines import sample, train_tokenizer

    other = tmp_path / "other"
    train_tokenizer.main(["--output", str(other), f"data.root={data_root}", *TOKENIZER_ARGS,
                          "quantizer.codebook_size=16", "train.max_steps=1", "train.eval_every=1"])
    in_process_error(sample.main, ["--tokenizer", other, "--prior", chain / "prior", "--output", tmp_path / "s",
                                   "num_samples=2"], capsys, "pair a prior with the tokenizer")


def test_interrupted_sampling_leaves_no_scored_partial_set(chain, tmp_path, monkeypatch):
    from pipelines import sample

    written = []

    def failing_png(image):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(1)
        return b"png"

    monkeypatch.setattr(sample, "png_bytes", failing_png)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--tokenizer", str(chain / "tokenizer"), "--prior", str(chain / "prior"), "--output", str(out),
                     "num_samples=6", "fid=false"])
    assert not (out / "images").exists() and not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".images")]


def test_prior_trains_in_two_processes(chain, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*launcher, "-m", "pipelines.train_prior", "--codes", str(chain / "codes"), "--output",
                           str(tmp_path / "prior"), "--config", "configs/prior.yaml", *PRIOR_ARGS, "train.max_steps=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "prior" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["max_param_difference_across_processes"] == 0.0


# ------------------------------------------------------------------ the run-folder rule, job by job



def test_the_same_settings_do_nothing_in_every_step(chain, data_root):
    before = {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file() and "logs" not in p.parts and p.name != ".lock"}
    out = [job("pipelines.train_tokenizer", "--output", chain / "tokenizer", f"data.root={data_root}", *TOKENIZER_ARGS),
           job("pipelines.extract_codes", "--tokenizer", chain / "tokenizer", "--output", chain / "codes"),
           job("pipelines.train_prior", "--codes", chain / "codes", "--output", chain / "prior", "--config",
               "configs/prior.yaml", *PRIOR_ARGS),
           job("pipelines.sample", "--tokenizer", chain / "tokenizer", "--prior", chain / "prior", "--output",
               chain / "samples", *TINY_SAMPLE_ARGS)]
    assert all("nothing to do" in proc.stdout or "reused: train, val, test" in proc.stdout for proc in out)
    after = {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file() and "logs" not in p.parts and p.name != ".lock"}
    assert after == before


def test_changed_data_settings_redo_the_codes_and_keep_the_old_ones(chain, tmp_path):
    job("pipelines.extract_codes", "--tokenizer", chain / "tokenizer", "--output", tmp_path / "codes", "data.limit=48")
    first = load_codes(tmp_path / "codes" / "test.safetensors").codes
    job("pipelines.extract_codes", "--tokenizer", chain / "tokenizer", "--output", tmp_path / "codes", "data.limit=32")
    assert len(load_codes(tmp_path / "codes" / "test.safetensors").codes) == 32
    (previous,) = (tmp_path / "codes.previous").iterdir()
    assert torch.equal(load_codes(previous / "test.safetensors").codes, first)


def test_no_job_writes_into_another_jobs_folder(chain, capsys):
    from pipelines import extract_codes, sample

    before = (chain / "prior" / "metrics.json").read_bytes()
    in_process_error(sample.main, ["--tokenizer", chain / "tokenizer", "--prior", chain / "prior", "--output",
                                   chain / "prior", "num_samples=2"], capsys, "overlaps the input")
    in_process_error(extract_codes.main, ["--tokenizer", chain / "tokenizer", "--output", chain / "prior"], capsys,
                     "output of train_prior")
    assert (chain / "prior" / "metrics.json").read_bytes() == before


def test_a_changed_prior_setting_retrains_and_keeps_the_old_prior(chain, tmp_path):
    shutil.copytree(chain / "prior", tmp_path / "prior")
    old = (tmp_path / "prior" / "model.safetensors").read_bytes()
    job("pipelines.train_prior", "--codes", chain / "codes", "--output", tmp_path / "prior", "--config",
        "configs/prior.yaml", *PRIOR_ARGS, "train.lr=3e-4")
    assert "lr: 0.0003" in (tmp_path / "prior" / "job_config.yaml").read_text()
    assert (tmp_path / "prior" / "model.safetensors").read_bytes() != old
    (previous,) = (tmp_path / "prior.previous").iterdir()
    assert (previous / "model.safetensors").read_bytes() == old


def test_evaluate_refuses_an_empty_samples_folder(chain, tmp_path, capsys):
    from pipelines import evaluate

    (tmp_path / "empty").mkdir()
    in_process_error(evaluate.main, ["--run", chain, f"samples={tmp_path / 'empty'}", "num_images=8"], capsys,
                     "fewer than 2 images")


def _killed_then_resumed(command, output, finished, check_partial, seed):
    """Kill `command` with SIGKILL at a random moment, check what it left, then run it again to the end."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    rng = random.Random(seed)
    proc = subprocess.Popen([sys.executable, "-m", *map(str, command)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(2.0, 8.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (output / finished).exists():
        check_partial()
    rerun = subprocess.run([sys.executable, "-m", *map(str, command)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (output / finished).is_file()


@pytest.mark.parametrize("seed", [1])
def test_extract_codes_killed_resumes_to_the_same_codes(chain, tmp_path, seed):
    out = tmp_path / "codes"

    def complete():
        for split in ("train", "val", "test"):
            assert load_codes(out / f"{split}.safetensors").codes.numel()

    _killed_then_resumed(["pipelines.extract_codes", "--tokenizer", chain / "tokenizer", "--output", out], out,
                         "summary.json", complete, seed)
    for split in ("train", "val", "test"):
        assert torch.equal(load_codes(out / f"{split}.safetensors").codes, load_codes(chain / "codes" / f"{split}.safetensors").codes)


@pytest.mark.parametrize("seed", [3])
def test_sample_killed_resumes_to_the_same_images(chain, tmp_path, seed):
    out = tmp_path / "samples"

    def complete():
        assert len(list((out / "images").glob("*.png"))) == 8 and json.loads((out / "metrics.json").read_text())["fid"]

    _killed_then_resumed(["pipelines.sample", "--tokenizer", chain / "tokenizer", "--prior", chain / "prior", "--output",
                          out, *TINY_SAMPLE_ARGS], out, "metrics.json", complete, seed)
    for image in (chain / "samples" / "images").glob("*.png"):
        assert (out / "images" / image.name).read_bytes() == image.read_bytes()
    ours, theirs = (json.loads((d / "metrics.json").read_text())["fid"]["fid"] for d in (out, chain / "samples"))
    assert ours == theirs


def test_compare_killed_resumes_to_the_same_table(chain, tmp_path, data_root):
    args = ["--output", tmp_path / "cmp", f"data.root={data_root}", *TOKENIZER_ARGS, "models=[vqvae]", "generation=false",
            "eval.num_images=8", "eval.rfid=false"]
    job("pipelines.compare", *args[:1], tmp_path / "whole", *args[2:])
    out = tmp_path / "cmp"
    _killed_then_resumed(["pipelines.compare", *args], out, "table.json", lambda: (out / "table.md").is_file(), 5)
    ours, whole = (json.loads((d / "table.json").read_text())["models"][0] for d in (out, tmp_path / "whole"))
    for key in ("psnr", "ssim", "perplexity", "usage", "dead_codes", "steps"):
        assert ours[key] == whole[key], key


def test_two_trainings_into_one_folder_the_second_stops_at_once(tmp_path, data_root):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "tokenizer"
    first = subprocess.Popen([sys.executable, "-m", "pipelines.train_tokenizer", "--output", str(out),
                              f"data.root={data_root}", *TOKENIZER_ARGS, "train.max_steps=100000"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "job_config.yaml").is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = job("pipelines.train_tokenizer", "--output", out, f"data.root={data_root}", *TOKENIZER_ARGS,
                     "train.max_steps=100000", check=False)
        one_line_error(second, f"is in use by train_tokenizer (pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_sampling_at_extreme_temperature_and_guidance_draws_codes(chain, tmp_path):
    from pipelines import sample

    sample.main(["--tokenizer", str(chain / "tokenizer"), "--prior", str(chain / "prior"), "--output", str(tmp_path / "s"),
                 "num_samples=4", "fid=false", "temperature=1e-300", "guidance_scale=1e300"])
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 4


@pytest.mark.parametrize("settings", [["num_samples=1e12"], ["num_samples=1000000", "batch_size=1000000"]])
def test_sampling_sizes_that_cannot_fit_are_refused_before_sampling(chain, tmp_path, capsys, settings):
    from pipelines import sample

    in_process_error(sample.main, ["--tokenizer", chain / "tokenizer", "--prior", chain / "prior", "--output",
                                   tmp_path / "s", "fid=false", *settings], capsys, "does not fit in memory")
    assert not (tmp_path / "s").exists()
