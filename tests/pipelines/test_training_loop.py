"""The one training loop (pipelines/training.py) on a toy task: resume, schedules, best weights, validation."""
import json
import os
import signal
import time
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset, get_worker_info

from configio.cli import SAME_INTERRUPTION_S, Interrupted
from configio.config import from_dict
from configio.errors import CheckpointError, ConfigError, TrainingDiverged
from configio.hub import HubModel
from pipelines.training import (
    StepBatchSampler,
    TrainConfig,
    TrainingTask,
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
    job = "train_toy"
    validation_metric = "val/mse"

    def __init__(self, fail_at_step=None, diverge_at_step=None, signals_at_step=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)  # 40 items in batches of 8: an epoch every 5 steps
        self.train_data = TensorDataset(x, x.sum(1, keepdim=True))
        self.val = torch.randn(16, 4, generator=g)
        self.job_record = {}
        self.fail_at_step, self.diverge_at_step = fail_at_step, diverge_at_step
        self.signals_at_step = signals_at_step or (None, ())  # (step, signals this process sends itself during it)
        self.state = {"steps_seen": torch.zeros((), dtype=torch.int64)}  # task state: must survive a resume

    def build_model(self):
        return Toy(ToyConfig())

    def training_step(self, model, batch, step, accelerator):
        if step == self.fail_at_step:
            raise KeyboardInterrupt  # a kill: the process stops between checkpoints
        if step == self.signals_at_step[0]:
            for signum in self.signals_at_step[1]:
                os.kill(os.getpid(), signum)
                time.sleep(SAME_INTERRUPTION_S * 1.2)  # a second signal, not the first one arriving twice
        self.state["steps_seen"] += 1
        x, y = (t.to(accelerator.device) for t in batch)
        loss = (model(x) - y).pow(2).mean()
        return (loss * float("nan") if step == self.diverge_at_step else loss), {}

    @torch.no_grad()
    def validate(self, model, accelerator):
        model.eval()
        return float((model(self.val) - self.val.sum(1, keepdim=True)).pow(2).mean())

    def final_metrics(self, model, accelerator):
        return {"test_mse": self.validate(model, accelerator), "steps_seen": int(self.state["steps_seen"])}


class SignalledInWorkers(Dataset):
    """The toy's data read by loader workers that each get SIGTERM, as when a whole job is signalled: they must
    outlive it, for the main process to finish its step."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.data[index]


def run(output, fail_at_step=None, diverge_at_step=None, signals_at_step=None, **settings):
    base = {"batch_size": 8, "max_steps": 17, "eval_every": 3, "checkpoint_every": 4, "log_every": 1, "lr": 0.05,
            "resume": "latest", "cpu": True, **settings}
    cfg = from_dict(TrainConfig, base)
    task = ToyTask(fail_at_step, diverge_at_step, signals_at_step)
    if cfg.num_workers:
        task.train_data = SignalledInWorkers(task.train_data)
    return train(task, ToyJob(0, ToyConfig(), cfg), output)


def assert_same_result(a, b, metrics_a, metrics_b):
    for name in ("model.safetensors", "checkpoints/step_0000017/optimizer.safetensors"):
        weights_a, weights_b = load_file(a / name), load_file(b / name)
        assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), name
    metrics_a.pop("train_seconds"), metrics_b.pop("train_seconds")
    assert metrics_a == metrics_b


@pytest.mark.parametrize("schedule", ["plateau", "cosine", "constant"])
def test_interrupted_run_resumes_bit_identical_across_epochs(tmp_path, schedule):
    reference = run(tmp_path / "a", lr_schedule=schedule, warmup_steps=2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at_step=10, lr_schedule=schedule, warmup_steps=2)  # last checkpoint: step 8
    assert not (tmp_path / "b" / "model.safetensors").exists() and not (tmp_path / "b" / "metrics.json").exists()
    resumed = run(tmp_path / "b", lr_schedule=schedule, warmup_steps=2)
    assert_same_result(tmp_path / "a", tmp_path / "b", reference, resumed)
    assert resumed["steps_seen"] == 17  # the task's own state came back from step 8
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["steps"] == 17


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGTERM, 2)])
def test_a_signal_finishes_the_step_checkpoints_it_and_resumes_bit_identical(tmp_path, signum, workers):
    reference = run(tmp_path / "a", lr_schedule="cosine", warmup_steps=2)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # During step index 9 (the 10th step), between the periodic checkpoints of steps 8 and 12.
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "b", signals_at_step=(9, [signum]), lr_schedule="cosine", warmup_steps=2, num_workers=workers)
    assert stopped.value.exit_status == 128 + signum
    assert stopped.value.message == (f"toy: interrupted ({signal.Signals(signum).name}) at step 10 of 17; wrote "
                                     f"{tmp_path / 'b' / 'checkpoints' / 'step_0000010'}; run the same command again to "
                                     "resume from step 10")
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert not (tmp_path / "b" / "model.safetensors").exists() and not (tmp_path / "b" / "metrics.json").exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the loop's own handlers are gone
    resumed = run(tmp_path / "b", lr_schedule="cosine", warmup_steps=2)
    assert_same_result(tmp_path / "a", tmp_path / "b", reference, resumed)


def test_a_second_signal_stops_at_once_keeping_the_last_complete_checkpoint(tmp_path):
    reference = run(tmp_path / "a")
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "b", signals_at_step=(9, [signal.SIGTERM, signal.SIGTERM]))
    assert stopped.value.exit_status == 143
    kept = tmp_path / "b" / "checkpoints" / "step_0000008"
    assert stopped.value.message == (f"toy: interrupted again (SIGTERM) after step 9 of 17, stopped at once; the last "
                                     f"complete checkpoint ({kept}) is kept; run the same command again to resume from it")
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    resumed = run(tmp_path / "b")
    assert_same_result(tmp_path / "a", tmp_path / "b", reference, resumed)


def test_best_weights_are_exported_with_their_step(tmp_path):
    metrics = run(tmp_path / "a")
    assert metrics["weights"] == f"best validation (step {metrics['best_step']})"
    best = load_file(tmp_path / "a" / "best" / "model.safetensors")
    exported = load_file(tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(best[k], exported[k]) for k in best)
    last = run(tmp_path / "b", export="last")
    assert last["weights"] == "last (step 17)"


def test_same_settings_do_nothing_once_finished(tmp_path):
    first = run(tmp_path / "a")
    before = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    again = run(tmp_path / "a", resume=None, checkpoint_every=5)  # incidental settings are not compared
    assert again == first and (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == before


def test_a_changed_setting_starts_over_and_keeps_the_previous_result(tmp_path):
    run(tmp_path / "a")
    old = load_file(tmp_path / "a" / "model.safetensors")
    run(tmp_path / "a", lr=0.01)
    previous = list((tmp_path / "a.previous").iterdir())
    assert len(previous) == 1
    kept = load_file(previous[0] / "model.safetensors")
    assert all(torch.equal(old[k], kept[k]) for k in old)
    assert "lr: 0.01" in (tmp_path / "a" / "job_config.yaml").read_text()
    assert not all(torch.equal(old[k], v) for k, v in load_file(tmp_path / "a" / "model.safetensors").items())


def test_raising_max_steps_continues_the_run(tmp_path):
    run(tmp_path / "a", max_steps=8, lr_schedule="constant")
    longer = run(tmp_path / "a", max_steps=17, lr_schedule="constant")
    run(tmp_path / "b", max_steps=17, lr_schedule="constant")
    assert not (tmp_path / "a.previous").exists()
    assert longer["steps"] == 17
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged at step 7.*step_0000004"):
        run(tmp_path / "a", diverge_at_step=6)
    assert (tmp_path / "a" / "checkpoints" / "step_0000004").is_dir()
    assert not (tmp_path / "a" / "model.safetensors").exists()


@pytest.mark.parametrize("pointer, fragment", [(b"step_9999999", "missing"), (b"../../etc", "corrupt"),
                                                (b"\xff\xfe", "corrupt")])
def test_a_corrupt_checkpoint_pointer_is_one_error(tmp_path, pointer, fragment):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a", fail_at_step=6)
    (tmp_path / "a" / "checkpoints" / "latest").write_bytes(pointer)
    with pytest.raises(CheckpointError, match=fragment):
        run(tmp_path / "a")


def test_a_corrupt_trainer_state_is_one_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a", fail_at_step=6)
    (tmp_path / "a" / "checkpoints" / "step_0000004" / "trainer.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="trainer state"):
        run(tmp_path / "a")


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(tmp_path / "file")


def test_orphaned_temporaries_are_removed_on_start(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        run(out, fail_at_step=2)
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
