"""The one training loop (pipelines/training.py) on a toy task: resume, schedules, best weights, validation."""
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from configio.config import from_dict
from configio.errors import ConfigError
from configio.hub import HubModel
from pipelines.training import (
    StepBatchSampler,
    TrainConfig,
    TrainingTask,
    check_same_settings,
    seed_step,
    train,
)


@dataclass
class ToyConfig:
    width: int = 8
    dropout: float = 0.3


class Toy(nn.Module, HubModel, library_name="vq-wae-tests"):
    what = "toy model"

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config if isinstance(config, ToyConfig) else ToyConfig(**config)
        self.net = nn.Sequential(nn.Linear(4, self.config.width), nn.Dropout(self.config.dropout), nn.Linear(self.config.width, 1))

    def forward(self, x):
        return self.net(x)


@dataclass
class ToyJob:
    seed: int = 0
    toy: ToyConfig = None
    train: TrainConfig = None


class ToyTask(TrainingTask):
    name = "toy"
    validation_metric = "val/mse"
    resume_keys = ("seed",)

    def __init__(self, fail_at_step=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)  # 40 items in batches of 8: an epoch every 5 steps
        self.data = TensorDataset(x, x.sum(1, keepdim=True))
        self.val = torch.randn(16, 4, generator=g)
        self.job_record = {}
        self.fail_at_step = fail_at_step

    def build_model(self):
        return Toy(ToyConfig())

    def train_set(self):
        return self.data

    def training_step(self, model, batch, step, accelerator):
        if step == self.fail_at_step:
            raise KeyboardInterrupt  # a kill: the process stops between checkpoints
        x, y = (t.to(accelerator.device) for t in batch)
        return (model(x) - y).pow(2).mean(), {}

    @torch.no_grad()
    def validate(self, model, accelerator):
        model.eval()
        return float((model(self.val) - self.val.sum(1, keepdim=True)).pow(2).mean())

    def load_export(self, directory, device):
        return Toy.from_pretrained(directory)

    def final_metrics(self, model, accelerator):
        return {"test_mse": self.validate(model, accelerator)}


def run(output, fail_at_step=None, **settings):
    base = {"batch_size": 8, "max_steps": 17, "eval_every": 3, "checkpoint_every": 4, "log_every": 1, "lr": 0.05,
            "resume": "latest", "cpu": True, **settings}
    cfg = from_dict(TrainConfig, base)
    return train(ToyTask(fail_at_step), cfg, seed=0, output=output, job_config=ToyJob(0, ToyConfig(), cfg))


@pytest.mark.parametrize("schedule", ["plateau", "cosine", "constant"])
def test_interrupted_run_resumes_bit_identical_across_epochs(tmp_path, schedule):
    reference = run(tmp_path / "a", lr_schedule=schedule, warmup_steps=2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at_step=10, lr_schedule=schedule, warmup_steps=2)  # last checkpoint: step 8
    assert not (tmp_path / "b" / "model.safetensors").exists() and not (tmp_path / "b" / "metrics.json").exists()
    resumed = run(tmp_path / "b", lr_schedule=schedule, warmup_steps=2)
    for name in ("model.safetensors", "checkpoints/step_0000017/optimizer.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    reference.pop("train_seconds"), resumed.pop("train_seconds")
    assert resumed == reference
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["steps"] == 17


def test_best_weights_are_exported_with_their_step(tmp_path):
    metrics = run(tmp_path / "a")
    assert metrics["weights"] == f"best validation (step {metrics['best_step']})"
    best = load_file(tmp_path / "a" / "best" / "model.safetensors")
    exported = load_file(tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(best[k], exported[k]) for k in best)
    last = run(tmp_path / "b", export="last")
    assert last["weights"] == "last (step 17)"


def test_a_run_is_not_started_over_or_resumed_with_other_settings(tmp_path):
    run(tmp_path / "a")
    with pytest.raises(ConfigError, match="train.resume=latest"):
        run(tmp_path / "a", resume=None)
    saved = {"seed": 0, "toy": {"width": 8}}
    with pytest.raises(ConfigError, match="'seed' differs"):
        check_same_settings(saved, ToyJob(1, ToyConfig(), TrainConfig()), ("seed",), tmp_path)


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(tmp_path / "file")


def test_orphaned_temporaries_are_removed_on_start(tmp_path):
    out = tmp_path / "a"
    (out / "checkpoints" / ".step_0000004.abc.tmp").mkdir(parents=True)
    (out / ".metrics.json.xyz.tmp").write_text("partial")
    run(out)
    assert not list(out.rglob(".*.tmp"))


def test_step_order_depends_only_on_seed_and_step():
    full = list(StepBatchSampler(20, 4, 1, 0, seed=3, start_step=0, max_steps=12))
    tail = list(StepBatchSampler(20, 4, 1, 0, seed=3, start_step=7, max_steps=12))
    assert tail == full[7:]
    assert sorted(sum(full[:5], [])) == list(range(20)) and full[:5] != full[5:10]  # each epoch a new permutation
    ranks = [list(StepBatchSampler(20, 2, 2, r, seed=3, start_step=0, max_steps=5)) for r in range(2)]
    assert all(not set(a) & set(b) for a, b in zip(*ranks))


def test_seeding_a_step_fixes_its_randomness():
    seed_step(0, 5, 0)
    a = torch.rand(3)
    torch.rand(10)
    seed_step(0, 5, 0)
    assert torch.equal(a, torch.rand(3))
    seed_step(0, 5, 1)
    assert not torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("override, fragment", [
    ({"lr": float("nan")}, "finite"), ({"lr": -1}, "train.lr"), ({"eval_images": 0}, "train.eval_images"),
    ({"num_workers": -1}, "train.num_workers"), ({"batch_size": 0}, "train.batch_size"),
    ({"lr_factor": 1.5}, "train.lr_factor"), ({"lr_schedule": "cosine", "warmup_steps": 10, "max_steps": 5}, "warmup"),
])
def test_bad_training_settings_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(TrainConfig, override, prefix="train.")
