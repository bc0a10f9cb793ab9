"""The one training loop. Each training job supplies a `TrainingTask` (its model, its step, its evaluation); the loop
does the rest the same way for every job: accelerate prepare, step-indexed data order, per-step seeding, progress bar,
TensorBoard, eval-every with the LR schedule and best-validation weights, checkpoint-every with resume from `latest`,
the multi-process weight check, export and the final metrics.

Exact resume: the data order is a function of (seed, step) (`StepBatchSampler`) and the global RNG is reseeded from
(seed, step, process) before every step, so a run killed at any moment and resumed from its last checkpoint takes
exactly the steps an uninterrupted run takes, whatever randomness the step uses (dropout, stochastic quantization)
and wherever epochs end. Outputs appear only when complete: checkpoints are folders renamed into place, exports are
written file by file atomically with the weights (the make target) last, after metrics.json.

Interruption keeps progress: on SIGINT or SIGTERM the loop finishes its step, writes a checkpoint of it and stops with
one line naming the step (exit status 130 or 143); every process stops at the same step. A second signal stops at
once, keeping the last complete checkpoint.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from configio.cli import InterruptRequest, Interrupted, deferred_interrupts, ignore_interruptions
from configio.config import incidental, incidental_settings, to_dict
from configio.errors import CheckpointError, ConfigError, NonFiniteValues, TrainingDiverged
from configio.files import (
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    load_state,
    remove_orphans,
    reporting_write_failures,
    save_state,
    write_directory_atomically,
)
from configio.hub import WEIGHTS_NAME

from .run_folder import claim_folder

LATEST = "latest"


class StepBatchSampler:
    """Yields this rank's batch indices for steps [start_step, max_steps).

    The order depends only on (seed, step): epoch e is a permutation drawn from seed + e, and each global batch of
    batch_size * world_size indices is split by rank. A resumed run therefore sees exactly the batches an
    uninterrupted run would, with no iterator state to save.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int, rank: int, seed: int, start_step: int, max_steps: int):
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {num_items} images, fewer than one global batch of {self.global_batch} "
                "(train.batch_size x processes); lower train.batch_size or use more data"
            )
        self.num_items, self.batch_size, self.rank, self.seed = num_items, batch_size, rank, seed
        self.start_step, self.max_steps = start_step, max_steps
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def batch_for_step(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=generator)
        start = i * self.global_batch + self.rank * self.batch_size
        return self._perm[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            yield self.batch_for_step(step)


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_items, world_size))


class CheckpointManager:
    """Checkpoints as folders `step_0000100/` written atomically, a `latest` pointer file, and pruning.

    Each folder holds model.safetensors, optimizer/scheduler/rng states as safetensors + JSON, and trainer.json.
    Nothing is ever unpickled on load.
    """

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:07d}"

    def save(self, step: int, model: nn.Module, states: dict[str, Any]) -> Path:
        name = self.path(step).name

        def fill(tmp: Path) -> None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            for key, value in states.items():
                save_state(value, tmp, key)

        write_directory_atomically(self.directory / name, fill)
        atomic_write_text(self.directory / LATEST, name + "\n")
        self._prune()
        return self.directory / name

    def _prune(self) -> None:
        folders = sorted(p for p in self.directory.glob("step_*") if p.is_dir())
        for old in folders[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """`latest` -> the newest checkpoint or None when there is none yet; otherwise an explicit folder."""
        if resume == LATEST:
            pointer = self.directory / LATEST
            if not pointer.is_file():
                return None
            name = pointer.read_bytes().decode("utf-8", "replace").strip()
            if not re.fullmatch(r"step_\d{7}", name):
                raise CheckpointError(f"'{pointer}' is corrupt (it should name a step_* folder); delete it to start "
                                      "from the newest step_* folder's settings, or choose another output")
            path = self.directory / name
            if not path.is_dir():
                raise CheckpointError(f"'{pointer}' names {path.name}, which is missing; delete the pointer to start over")
            return path
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder '{resume}' does not exist; pass train.resume=latest or a step_* folder")
        return path

    @staticmethod
    def load(path: Path, model: nn.Module, names: list[str]) -> dict[str, Any]:
        weights = load_safetensors(path / "model.safetensors")
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint '{path}' does not fit this model: {str(err).splitlines()[-1].strip()}") from None
        return {name: load_state(path, name) for name in names}


def accelerator_available() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def build_accelerator(mixed_precision: str, force_cpu: bool, output: Path):
    """One Accelerator per job. Without a GPU it runs on the CPU, which also lets processes started by torchrun
    (`accelerate launch --multi_gpu`) train together over gloo."""
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=force_cpu or not accelerator_available(),
        log_with="tensorboard",
        project_dir=str(Path(output) / "logs"),
    )


def is_finished(output: Path, max_steps: int) -> bool:
    """The export and its metrics of a run trained to `max_steps` are both there."""
    try:
        metrics = json.loads((Path(output) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (Path(output) / WEIGHTS_NAME).is_file() and isinstance(metrics, dict) and metrics.get("steps") == max_steps


def check_trainer_state(state: Any, path: Path, max_steps: int) -> dict[str, Any]:
    """The loop's own counters from a checkpoint, refused with one line when they are not what the loop wrote."""
    fields = {"step": int, "best_val": (int, float), "best_step": int, "train_seconds": (int, float)}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) or isinstance(state.get(k), bool)
                                          for k, t in fields.items()):
        raise CheckpointError(f"checkpoint '{path}' has a corrupt trainer state; delete that folder (the previous "
                              "checkpoint is kept) and run again")
    if not 0 <= state["step"] <= max_steps:
        raise CheckpointError(f"checkpoint '{path}' is at step {state['step']}, beyond train.max_steps={max_steps}; "
                              "raise train.max_steps or choose another output")
    return state


def ranks_max_difference(model: nn.Module, accelerator) -> float:
    """Largest difference of any parameter between processes (0.0 when all ranks hold the same weights)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    gathered = accelerator.gather(flat[None]).view(accelerator.num_processes, -1)
    return float((gathered - gathered[0]).abs().max())


@dataclass
class TrainConfig:
    """Settings of the one training loop; each job changes only the defaults (see its job config)."""

    batch_size: int = 32  # per process
    max_steps: int = 6000
    lr: float = 1e-3  # the peak learning rate
    lr_schedule: Literal["plateau", "constant", "cosine"] = "plateau"
    lr_factor: float = 0.5  # plateau: ReduceLROnPlateau on the validation metric, cut by this factor...
    lr_patience: int = 3  # ...after this many evaluations without improvement
    warmup_steps: int = 0  # cosine: linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # AdamW, on weight matrices only (dim >= 2)
    adam_beta2: float = 0.999
    grad_clip: float = 0.0  # max gradient norm; 0: off
    eval_every: int = 1000
    eval_images: int | None = 2000  # validation items per evaluation; null: the whole validation split
    eval_batch_size: int = 256
    checkpoint_every: int = incidental(500)
    keep_checkpoints: int = incidental(2)
    log_every: int = incidental(25)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = incidental(False)  # force the CPU even when an accelerator is present
    num_workers: int = incidental(0)
    export: Literal["best", "last"] = "best"  # which weights become model.safetensors (and are tested)
    resume: str | None = incidental(None)  # null or "latest": the newest checkpoint of this folder (the run-folder rule); or a step_* folder

    def validate(self) -> None:
        for key in ("batch_size", "max_steps", "eval_every", "checkpoint_every", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        for key in ("keep_checkpoints", "num_workers", "lr_patience", "warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ConfigError(
                f"train.eval_images must be >= 1 or null (the whole validation split), got {self.eval_images}; the "
                "validation metric picks the best weights and drives the LR schedule, so it cannot be empty"
            )
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"train.lr_factor must lie in (0, 1), got {self.lr_factor}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.adam_beta2 < 1:
            raise ConfigError(f"train.adam_beta2 must lie in [0, 1), got {self.adam_beta2}")
        if self.lr_schedule == "cosine" and self.warmup_steps >= self.max_steps:
            raise ConfigError(f"train.warmup_steps must be below train.max_steps ({self.max_steps}), got {self.warmup_steps}")


def check_seed(seed: int) -> None:
    """Seeds feed numpy's and torch's generators, which take 0 .. 2**32 - 1."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must lie in [0, 2**32), got {seed}")


class TrainingTask:
    """What a training job supplies to the loop. Subclass it and fill in the methods below.

    The loop calls, in order: `load_data()`, `build_model()` (after seeding), `training_step()` once per step on batches of
    `train_data`, `validate()` every train.eval_every steps, and at the end `final_metrics()` with the exported
    weights; it owns everything else.
    The model is a HubModel (configio.hub): the loop saves and reloads it by its own save/from_pretrained.
    """

    name: str = "model"  # progress bar, TensorBoard project and messages
    job: str = "train"  # the job recorded in job_config.yaml (the run-folder rule refuses a folder of another job)
    validation_metric: str = "val/loss"  # lower is better; picks the best weights and drives a plateau schedule
    job_record: dict[str, Any]  # what defines the run besides the config (e.g. the code files used)
    inputs: tuple[Path, ...] = ()  # folders the job reads; its output may not overlap them
    incidental: tuple[str, ...] = ()  # settings of this run that do not change its result (never compared)
    # What the task itself carries from step to step (tensors, numbers): saved in every checkpoint and restored on
    # resume, so that a resumed run logs exactly what an uninterrupted one would. A task with state assigns its own
    # dict; the shared default is read-only so that no task can write into another's.
    state: Mapping[str, Any] = MappingProxyType({})
    train_data: Dataset  # the training split; batches of it go to training_step
    progress_format: Mapping[str, str] = MappingProxyType({"loss": "{loss:.4f}"})  # bar label -> format of the logs
    summary_format: str = "done"  # the last line printed, formatted with the final metrics

    def load_data(self) -> None:
        """Load the data (sets train_data and what validate/final_metrics read). Called once the folder is claimed
        and the run is not finished, so "nothing to do" and "in use" never wait for the data."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any, step: int, accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise for one batch and what to log (scalars) at log steps."""
        raise NotImplementedError

    def validate(self, model: nn.Module, accelerator) -> float:
        """The validation metric, reduced over every process (lower is better)."""
        raise NotImplementedError

    def final_metrics(self, model: nn.Module, accelerator) -> dict[str, Any]:
        """Test-split metrics of the exported model, called on every process (the main one's are written)."""
        raise NotImplementedError


def kept_checkpoint(checkpoints: CheckpointManager) -> str | None:
    """The name of the checkpoint a resumed run starts from (None: none was written yet)."""
    latest = checkpoints.directory / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def diverged(task: TrainingTask, step: int, checkpoints: CheckpointManager, what: str) -> TrainingDiverged:
    latest = kept_checkpoint(checkpoints)
    kept = f"the last good checkpoint ({latest}) is kept" if latest else "no checkpoint was written yet"
    return TrainingDiverged(f"the {task.name} training diverged at step {step + 1} ({what}); {kept}; lower train.lr "
                            "(or check the data for NaN/inf values) and run again")


def agreed_stop(request: InterruptRequest, accelerator) -> int | None:
    """The signal that stops every process after this step, or None to go on: a signal to any process stops them
    all at the same step. Under several processes that takes one all-reduce of one integer per step, next to the
    step's gradient all-reduce."""
    if accelerator.num_processes == 1:
        return request.signum
    flag = torch.tensor([request.signum or 0], device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="max")) or None


def interrupted(task: TrainingTask, checkpoints: CheckpointManager, signum: int, step: int, max_steps: int,
                checkpointed: bool, is_main: bool) -> Interrupted:
    """The interruption that ends the job, with its one line on the main process: the checkpoint of `step` when it
    was written, otherwise the last complete one (a second signal stopped the job at once)."""
    name = signal.Signals(signum).name
    if checkpointed:
        message = (f"{task.name}: interrupted ({name}) at step {step} of {max_steps}; wrote {checkpoints.path(step)}; "
                   f"run the same command again to resume from step {step}")
    else:
        latest = kept_checkpoint(checkpoints)
        kept = (f"the last complete checkpoint ({checkpoints.directory / latest}) is kept; run the same command again "
                "to resume from it") if latest else "no checkpoint was written yet; run the same command again to start over"
        message = f"{task.name}: interrupted again ({name}) after step {step} of {max_steps}, stopped at once; {kept}"
    return Interrupted(signum, message if is_main else None)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's global generators (CPU and every accelerator) for one step of one process."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % 2**63)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, cfg.adam_beta2))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.lr_factor, patience=cfg.lr_patience)
    if cfg.lr_schedule == "cosine":
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                           min_lr_rate=cfg.min_lr_ratio)
    return None


def train(task: TrainingTask, job_config: Any, output: Path) -> dict[str, Any] | None:
    """Run `task` to cfg.max_steps under the run-folder rule (pipelines/run_folder.py), export, evaluate, write
    metrics.json.

    The same settings resume from the newest checkpoint or, when the run is finished, do nothing; a raised
    train.max_steps continues; other changes start over with the earlier result set aside. Returns the metrics on the
    main process (None on the others). `job_config` is the job's whole config dataclass (its `train` and `seed` drive
    the loop); with `task.job_record` it is the folder's record (job_config.yaml).
    """
    cfg, seed = job_config.train, job_config.seed
    check_seed(seed)
    output = Path(output)
    accelerator = build_accelerator(cfg.mixed_precision, cfg.cpu, output)
    with claim_folder(output, task.job, {**to_dict(job_config), **task.job_record}, inputs=task.inputs,
                      ignore=incidental_settings(type(job_config)) + task.incidental, continuable=("train.max_steps",),
                      defaults=to_dict(type(job_config)()), main=accelerator.is_main_process):
        accelerator.wait_for_everyone()
        if is_finished(output, cfg.max_steps) and cfg.resume in (None, LATEST):
            accelerator.print(f"{task.name}: {output} is finished with these settings ({cfg.max_steps} steps); nothing "
                              "to do (raise train.max_steps to continue it)")
            return json.loads((output / "metrics.json").read_text()) if accelerator.is_main_process else None
        return _train(task, cfg, seed, output, job_config, accelerator)


def _train(task: TrainingTask, cfg: TrainConfig, seed: int, output: Path, job_config: Any, accelerator) -> dict[str, Any] | None:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    is_main = accelerator.is_main_process
    for folder in (output / "best", output / "checkpoints"):
        remove_orphans(folder)
    checkpoints = CheckpointManager(output / "checkpoints", keep=cfg.keep_checkpoints)
    resume_from = checkpoints.resolve(cfg.resume or LATEST)
    task.load_data()

    set_seed(seed)
    model = task.build_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    state = {"step": 0, "best_val": math.inf, "best_step": -1, "train_seconds": 0.0}
    if resume_from is not None:
        names = ["optimizer", "trainer"] + (["scheduler"] if scheduler is not None else [])
        names += ["task"] if (resume_from / "task.json").is_file() else []  # checkpoints of before task state
        loaded = checkpoints.load(resume_from, model, names)
        try:
            optimizer.load_state_dict(loaded["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(loaded["scheduler"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint '{resume_from}' is corrupt or does not fit these settings "
                                  f"({' '.join(str(err).split())[:200]}); delete that folder or choose another output") from None
        state.update(check_trainer_state(loaded["trainer"], resume_from, cfg.max_steps))
        for key, value in loaded.get("task", {}).items():
            if key in task.state:
                task.state[key] = value
        accelerator.print(f"resuming from {resume_from} at step {state['step']}")
    # Stale results must not outlive the run that replaces them; the export (the make target) goes first, so a
    # present export always comes with its metrics. Both are written again at the end.
    if is_main:
        (output / WEIGHTS_NAME).unlink(missing_ok=True)
        (output / "metrics.json").unlink(missing_ok=True)

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    start = int(state["step"])
    sampler = StepBatchSampler(len(task.train_data), cfg.batch_size, accelerator.num_processes, accelerator.process_index,
                               seed, start, cfg.max_steps)
    loader = DataLoader(task.train_data, batch_sampler=sampler, num_workers=cfg.num_workers,
                        worker_init_fn=ignore_interruptions)
    # TensorBoard writes its event files from a thread of its own; a failure shows at the next call, without a path.
    with reporting_write_failures(output / "logs"):
        accelerator.init_trackers(task.name, config={k: str(v) for k, v in to_dict(job_config).items()})
    progress = tqdm(total=cfg.max_steps, initial=start, desc=task.name, disable=not is_main, dynamic_ncols=True)
    step, started, seconds_before = start, time.perf_counter(), float(state["train_seconds"])
    stop: Interrupted | None = None

    def log(values: dict[str, float]) -> None:
        with reporting_write_failures(output / "logs"):
            accelerator.log(values, step=step)

    def save_checkpoint() -> None:
        state.update(step=step, train_seconds=seconds_before + time.perf_counter() - started)
        if is_main:
            states = {"optimizer": optimizer.state_dict(), "trainer": dict(state), "task": dict(task.state)}
            if scheduler is not None:
                states["scheduler"] = scheduler.state_dict()
            checkpoints.save(step, raw_model, states)
        accelerator.wait_for_everyone()

    try:
        model.train()
        with deferred_interrupts() as interrupt:
            for batch in loader:
                seed_step(seed, step, accelerator.process_index)
                try:
                    with accelerator.autocast():
                        loss, logs = task.training_step(model, batch, step, accelerator)
                except NonFiniteValues as err:
                    raise diverged(task, step, checkpoints, str(err)) from None
                if not torch.isfinite(loss.detach()):
                    raise diverged(task, step, checkpoints, f"the loss became {float(loss.detach())}")
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                if scheduler is not None and cfg.lr_schedule != "plateau":
                    scheduler.step()
                step += 1
                progress.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    logs = {"loss": float(loss.detach()), **logs, "lr": optimizer.param_groups[0]["lr"]}
                    log({f"train/{k}": v for k, v in logs.items()})
                    progress.set_postfix({label: form.format(**logs) for label, form in task.progress_format.items()})
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    value = task.validate(raw_model, accelerator)
                    raw_model.train()
                    log({task.validation_metric: value})
                    if scheduler is not None and cfg.lr_schedule == "plateau":
                        scheduler.step(value)
                    if value < state["best_val"]:
                        state.update(best_val=value, best_step=step)
                        if is_main:
                            raw_model.save_pretrained(output / "best")
                checkpointed = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
                if checkpointed:
                    save_checkpoint()
                signum = agreed_stop(interrupt, accelerator)
                if signum is not None:
                    if not checkpointed:
                        save_checkpoint()
                    stop = interrupted(task, checkpoints, signum, step, cfg.max_steps, True, is_main)
                    raise stop
    except Interrupted as err:
        if err is stop:
            raise
        # A second signal stopped the step (or the checkpoint of the first) at once.
        raise interrupted(task, checkpoints, err.signum, step, cfg.max_steps, False, is_main) from None
    finally:
        # Closed before any error line is printed, so that the error stays the last line of the output.
        progress.close()
    if step < cfg.max_steps:
        raise CheckpointError(f"the data loader ended early at step {step} of {cfg.max_steps}")
    train_seconds = seconds_before + time.perf_counter() - started
    sync = ranks_max_difference(model, accelerator)
    accelerator.wait_for_everyone()

    export_best = cfg.export == "best" and (output / "best" / WEIGHTS_NAME).is_file()
    # The model is a HubModel: its best weights come back the way any user loads them.
    final = type(raw_model).from_pretrained(output / "best", map_location=accelerator.device) if export_best else raw_model.eval()
    metrics = task.final_metrics(final, accelerator)
    with reporting_write_failures(output / "logs"):
        accelerator.end_training()
    if not is_main:
        return None
    metrics.update(
        weights=f"best validation (step {state['best_step']})" if export_best else f"last (step {step})",
        best_step=state["best_step"],
        best_validation={"metric": task.validation_metric, "value": state["best_val"]},
        steps=step,
        train_seconds=round(train_seconds, 1),
        processes=accelerator.num_processes,
        max_param_difference_across_processes=sync,
    )
    # metrics.json first, the weights (the make target) last: a present target always comes with its metrics.
    atomic_write_json(output / "metrics.json", metrics)
    final.save_pretrained(output)
    print(f"{task.name}: {task.summary_format.format(**metrics)}; wrote metrics.json")
    return metrics
