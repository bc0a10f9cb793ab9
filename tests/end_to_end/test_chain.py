"""The stage-1 -> codes -> stage-2 -> samples chain in miniature, as `make sample` runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import job, one_line_error

from pipelines.datasets import DataConfig, build_splits
from pipelines.runs import load_codes
from stage1_tokenizer.model import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_ARGS = ["data.limit=96", "train.batch_size=16", "quantizer.codebook_size=32", "network.hidden_channels=16",
                  "network.residual_channels=4", "train.max_steps=6", "train.eval_every=6", "train.eval_batch_size=96"]
PRIOR_ARGS = ["prior.num_layers=1", "prior.hidden_size=32", "prior.num_heads=2", "train.batch_size=16",
              "train.max_steps=12", "train.warmup_steps=2", "train.eval_every=6", "train.checkpoint_every=6"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("chain")
    job("pipelines.train_tokenizer", "--output", run / "tokenizer", f"data.root={data_root}", *TOKENIZER_ARGS)
    job("pipelines.extract_codes", "--tokenizer", run / "tokenizer", "--output", run / "codes")
    job("pipelines.train_prior", "--codes", run / "codes", "--output", run / "prior", "--config", "configs/prior.yaml", *PRIOR_ARGS)
    job("pipelines.sample", "--tokenizer", run / "tokenizer", "--prior", run / "prior", "--output", run / "samples",
        "num_samples=8", "batch_size=4", "fid_reference_images=16", "fid_batch_size=8")
    return run


def test_every_artifact(chain):
    for name in ["codes/train.safetensors", "codes/val.safetensors", "codes/test.safetensors", "prior/model.safetensors",
                 "prior/config.json", "prior/metrics.json", "samples/grid.png",
                 "samples/metrics.json"]:
        assert (chain / name).is_file(), name
    assert len(list((chain / "samples" / "images").glob("*.png"))) == 8
    prior = json.loads((chain / "prior" / "metrics.json").read_text())
    assert 0 < prior["val_bits_per_token"] < 2 * prior["uniform_bits_per_token"] and "test_bits_per_token" in prior
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
def test_bad_sampling_settings(chain, tmp_path, setting, fragment):
    proc = job("pipelines.sample", "--tokenizer", chain / "tokenizer", "--prior", chain / "prior", "--output",
               tmp_path / "s", "num_samples=2", setting, check=False)
    one_line_error(proc, fragment)
    assert not (tmp_path / "s" / "images").exists()


def test_prior_paired_with_another_tokenizer(chain, tmp_path, data_root):
    other = tmp_path / "other"
    job("pipelines.train_tokenizer", "--output", other, f"data.root={data_root}", *TOKENIZER_ARGS,
        "quantizer.codebook_size=16", "train.max_steps=1", "train.eval_every=1")
    proc = job("pipelines.sample", "--tokenizer", other, "--prior", chain / "prior", "--output", tmp_path / "s",
               "num_samples=2", check=False)
    one_line_error(proc, "pair a prior with the tokenizer")


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
