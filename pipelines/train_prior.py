"""Train the stage-2 prior (a `transformers` causal LM) on code sequences extracted from the train split.

    python -m pipelines.train_prior --codes runs/default/codes --output runs/default/prior [--config configs/prior.yaml] key=value ...
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.train_prior ...   (same flags)

Vocabulary size, sequence length and classes come from the code files. Validation NLL (bits per token) is
measured on the val codes at every evaluation; the best weights are exported with `save_pretrained`
(model.safetensors + config.json + prior_config.json) into the output folder, with metrics.json holding the
final validation and test NLL. The test codes are only ever scored, never trained on.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from configio.config import load_config, to_dict
from configio.errors import CheckpointError, ConfigError
from configio.files import atomic_write_json, atomic_write_text
from stage2_prior.model import CodePrior, PriorConfig

from .cli import run_cli
from .runs import CodeSet, load_codes
from .training import (
    StepBatchSampler,
    build_accelerator,
    capture_rng_state,
    check_same_settings,
    ranks_max_difference,
    restore_rng_state,
    resume_point,
    shard_indices,
)


@dataclass
class PriorTrainConfig:
    batch_size: int = 64  # per process
    max_steps: int = 3000
    lr: float = 1e-3  # peak, after warm-up
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_batch_size: int = 512
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    num_workers: int = 0
    resume: str | None = None

    def validate(self) -> None:
        for key in ("batch_size", "max_steps", "eval_every", "checkpoint_every", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ConfigError(f"train.warmup_steps must lie in [0, train.max_steps), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class PriorJobConfig:
    seed: int = 0
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


def prior_config_for(codes: CodeSet, cfg: PriorConfig) -> PriorConfig:
    """The architecture from the config; vocabulary, length and classes from the codes they will model."""
    h, w = codes.grid
    num_classes = int(codes.metadata.get("num_classes", "0") or 0)
    if cfg.class_conditional and num_classes < 1:
        raise ConfigError(
            "prior.class_conditional=true but the dataset has no class labels; set prior.class_conditional=false"
        )
    filled = replace(cfg, codebook_size=codes.codebook_size, sequence_length=h * w,
                     num_classes=num_classes if cfg.class_conditional else 0)
    filled.check_complete()
    return filled


@torch.no_grad()
def bits_per_token(prior: CodePrior, codes: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator: Accelerator) -> float:
    """Mean negative log-likelihood of `codes` in bits per code, sharded across processes."""
    prior.eval()
    idx = shard_indices(len(codes), accelerator.process_index, accelerator.num_processes)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        batch = codes[rows].to(accelerator.device)
        cond = labels[rows].to(accelerator.device) if prior.config.class_conditional else None
        with accelerator.autocast():
            total[0] += prior.nll_sum(batch, cond).double().sum()
        total[1] += batch.numel()
    total = accelerator.reduce(total, reduction="sum")
    prior.train()
    return float(total[0] / total[1].clamp_min(1) / math.log(2))


def parse_args(argv: list[str] | None = None) -> tuple[PriorJobConfig, Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", required=True, help="folder with train/val/test.safetensors from pipelines.extract_codes")
    parser.add_argument("--output", required=True, help="output folder, e.g. runs/default/prior")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in settings)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100 prior.num_layers=6")
    args = parser.parse_args(argv)
    return load_config(PriorJobConfig, args.config, args.overrides), Path(args.codes), Path(args.output)


def main(argv: list[str] | None = None) -> None:
    cfg, codes_dir, output = parse_args(argv)
    tcfg = cfg.train
    train_codes, val_codes = load_codes(codes_dir / "train.safetensors"), load_codes(codes_dir / "val.safetensors")
    if val_codes.metadata["tokenizer_sha256"] != train_codes.metadata["tokenizer_sha256"]:
        raise CheckpointError(f"the code files in {codes_dir} come from different tokenizers; extract them again")
    prior_cfg = prior_config_for(train_codes, cfg.prior)
    accelerator = build_accelerator(tcfg.mixed_precision, tcfg.cpu, output)
    is_main = accelerator.is_main_process
    checkpoints, resume_from = resume_point(output, tcfg.resume, tcfg.keep_checkpoints)
    job_path = output / "job_config.yaml"
    codes_record = {"dir": str(codes_dir), "tokenizer_sha256": train_codes.metadata["tokenizer_sha256"]}
    job_record = {**to_dict(cfg), "codes": codes_record}
    if resume_from is not None:
        check_same_settings(job_path, cfg, ("prior", "seed", "codes"), extra={"codes": codes_record})

    set_seed(cfg.seed)
    prior = CodePrior(prior_cfg)
    decay = [p for n, p in prior.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in prior.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(0.9, 0.95),
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, tcfg.warmup_steps, tcfg.max_steps, min_lr_rate=tcfg.min_lr_ratio
    )
    trainer_state = {"step": 0, "best_val_bpt": math.inf, "best_step": -1, "train_seconds": 0.0}
    if resume_from is not None:
        loaded = checkpoints.load(resume_from, prior, ["optimizer", "scheduler", "trainer", "rng"])
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        trainer_state.update(loaded["trainer"])
        restore_rng_state(loaded["rng"])
        accelerator.print(f"resuming from {resume_from} at step {trainer_state['step']}")
    elif is_main:
        atomic_write_text(job_path, yaml.safe_dump(job_record, sort_keys=False))

    prior, optimizer = accelerator.prepare(prior, optimizer)
    raw_prior = accelerator.unwrap_model(prior)
    start_step = int(trainer_state["step"])
    dataset = TensorDataset(train_codes.codes, train_codes.labels)
    sampler = StepBatchSampler(len(dataset), tcfg.batch_size, accelerator.num_processes, accelerator.process_index,
                               cfg.seed, start_step, tcfg.max_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=tcfg.num_workers)
    accelerator.init_trackers("prior", config={k: str(v) for k, v in to_dict(cfg).items()})
    # Label dropout draws from its own generator so the data order and the dropout pattern both resume exactly.
    dropout_rng = torch.Generator(device=accelerator.device)

    progress = tqdm(total=tcfg.max_steps, initial=start_step, desc="prior", disable=not is_main, dynamic_ncols=True)
    step = start_step
    started = time.perf_counter()
    seconds_before = float(trainer_state["train_seconds"])
    prior.train()
    for codes, labels in loader:
        codes = codes.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device) if prior_cfg.class_conditional else None
        dropout_rng.manual_seed(cfg.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
        with accelerator.autocast():
            loss = prior(codes, labels, generator=dropout_rng)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if tcfg.grad_clip > 0:
            accelerator.clip_grad_norm_(prior.parameters(), tcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        if is_main:
            progress.update(1)
        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            bpt = float(loss.detach()) / math.log(2)
            accelerator.log({"train/bits_per_token": bpt, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            progress.set_postfix(bits=f"{bpt:.3f}")
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val = bits_per_token(raw_prior, val_codes.codes, val_codes.labels, tcfg.eval_batch_size, accelerator)
            accelerator.log({"val/bits_per_token": val}, step=step)
            if val < trainer_state["best_val_bpt"]:
                trainer_state.update(best_val_bpt=val, best_step=step)
                if is_main:
                    raw_prior.save_pretrained(output / "best")
        if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
            trainer_state.update(step=step, train_seconds=seconds_before + time.perf_counter() - started)
            if is_main:
                checkpoints.save(step, raw_prior, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "trainer": dict(trainer_state), "rng": capture_rng_state(),
                })
            accelerator.wait_for_everyone()
    progress.close()
    train_seconds = seconds_before + time.perf_counter() - started
    sync = ranks_max_difference(prior, accelerator)
    accelerator.wait_for_everyone()
    final = CodePrior.from_pretrained(output / "best", map_location=accelerator.device)
    test_codes = load_codes(codes_dir / "test.safetensors")
    val_bpt = bits_per_token(final, val_codes.codes, val_codes.labels, tcfg.eval_batch_size, accelerator)
    test_bpt = bits_per_token(final, test_codes.codes, test_codes.labels, tcfg.eval_batch_size, accelerator)
    accelerator.end_training()
    if not is_main:
        return
    final.save_pretrained(output)
    metrics = {
        "val_bits_per_token": val_bpt,
        "test_bits_per_token": test_bpt,
        "best_step": trainer_state["best_step"],
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "processes": accelerator.num_processes,
        "max_param_difference_across_processes": sync,
        "num_train_sequences": len(train_codes.codes),
        "sequence_length": prior_cfg.sequence_length,
        "codebook_size": prior_cfg.codebook_size,
        "class_conditional": prior_cfg.class_conditional,
        "uniform_bits_per_token": math.log2(prior_cfg.codebook_size),
        "tokenizer_sha256": train_codes.metadata["tokenizer_sha256"],
    }
    metrics["val_nll_nats_per_token"] = metrics["val_bits_per_token"] * math.log(2)
    metrics["test_nll_nats_per_token"] = metrics["test_bits_per_token"] * math.log(2)
    atomic_write_json(output / "metrics.json", metrics)
    print(f"prior: validation {metrics['val_bits_per_token']:.3f} bits/token, test {metrics['test_bits_per_token']:.3f} "
          f"(uniform: {metrics['uniform_bits_per_token']:.1f}); wrote {output}")


if __name__ == "__main__":
    run_cli(main)
