"""Machinery every training job shares: step-indexed data order, pickle-free checkpoints with resume, clean exits."""
from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from configio.errors import CheckpointError, ConfigError
from configio.files import (
    atomic_write_text,
    load_safetensors,
    load_state,
    save_state,
    write_directory_atomically,
)

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


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class CheckpointManager:
    """Checkpoints as folders `step_0000100/` written atomically, a `latest` pointer file, and pruning.

    Each folder holds model.safetensors, optimizer/scheduler/rng states as safetensors + JSON, and trainer.json.
    Nothing is ever unpickled on load.
    """

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, step: int, model: nn.Module, states: dict[str, Any]) -> Path:
        name = f"step_{step:07d}"

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
            path = self.directory / pointer.read_text().strip()
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


def resume_point(output: Path, resume: str | None, keep: int) -> tuple[CheckpointManager, Path | None]:
    """The job's checkpoint manager and the checkpoint to resume from, refusing to start over on top of a run."""
    checkpoints = CheckpointManager(Path(output) / "checkpoints", keep=keep)
    resume_from = checkpoints.resolve(resume) if resume else None
    if resume_from is None and (checkpoints.directory / LATEST).exists():
        raise ConfigError(
            f"'{output}' already holds a training run; pass train.resume=latest to continue it or choose another output"
        )
    return checkpoints, resume_from


def check_same_settings(job_path: Path, current: Any, keys: tuple[str, ...], extra: dict[str, Any] | None = None) -> None:
    """A run may only be resumed with the settings that define what it learns (the step budget may change).

    The saved settings are read back through the job's config class, so a setting added since the run started
    compares at its default instead of blocking the resume."""
    import yaml

    from configio.config import from_dict, to_dict

    saved = (yaml.safe_load(job_path.read_text()) or {}) if job_path.is_file() else {}
    known = {f: saved[f] for f in to_dict(current) if f in saved}
    try:
        saved_settings = {**to_dict(from_dict(type(current), known)), **{k: saved.get(k) for k in (extra or {})}}
    except ConfigError as err:
        raise ConfigError(f"cannot resume: the settings saved in {job_path} no longer load ({err})") from None
    current_settings = {**to_dict(current), **(extra or {})}
    for key in keys:
        if key not in known and key not in (extra or {}) or saved_settings.get(key) != current_settings.get(key):
            raise ConfigError(
                f"cannot resume: '{key}' differs from the run in {job_path.parent}; use the same settings or another output"
            )


def ranks_max_difference(model: nn.Module, accelerator) -> float:
    """Largest difference of any parameter between processes (0.0 when all ranks hold the same weights)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    gathered = accelerator.gather(flat[None]).view(accelerator.num_processes, -1)
    return float((gathered - gathered[0]).abs().max())
