"""Train a stage-1 tokenizer (VQ-WAE by default), then evaluate it on the test split.

    python -m pipelines.train_tokenizer --config configs/fashion_mnist.yaml --output runs/default/tokenizer key=value ...
    accelerate launch --num_processes 2 --cpu -m pipelines.train_tokenizer ...   (same flags)

Writes to the output folder: model.safetensors + config.yaml (the export stage 2 loads), best/ (best validation
weights), checkpoints/ (resumable with train.resume=latest), logs/ (TensorBoard), metrics.json,
reconstructions.png and codebook_usage.png.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from configio.config import load_config, to_dict
from configio.errors import CheckpointError, ConfigError
from configio.files import atomic_write_json, atomic_write_text
from eval.plots import save_reconstruction_grid, save_usage_histograms
from eval.reconstruction import evaluate_tokenizer
from stage1_tokenizer.model import Tokenizer, TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import QuantizerConfig

from .cli import run_cli
from .datasets import DataConfig, build_splits, dataset_info
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
class TrainConfig:
    batch_size: int = 32  # per process
    max_steps: int = 6000
    lr: float = 1e-3
    lr_schedule: Literal["plateau", "constant"] = "plateau"  # plateau: ReduceLROnPlateau on validation MSE
    lr_factor: float = 0.5
    lr_patience: int = 3  # evaluations without improvement before the LR is cut
    eval_every: int = 1000
    eval_images: int | None = 2000  # validation images per evaluation; null = the whole split
    eval_batch_size: int = 256
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False  # force the CPU even when an accelerator is present
    num_workers: int = 0
    export: Literal["best", "last"] = "best"  # which weights become model.safetensors (and are tested)
    resume: str | None = None  # "latest", or a checkpoints/step_* folder

    def validate(self) -> None:
        for key in ("batch_size", "max_steps", "eval_every", "checkpoint_every", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"train.lr_factor must lie in (0, 1), got {self.lr_factor}")


@dataclass
class TokenizerJobConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def tokenizer_config(self) -> TokenizerConfig:
        info = dataset_info(self.data)
        cfg = TokenizerConfig(info["image_size"], info["channels"], self.network, self.quantizer)
        cfg.validate()
        return cfg


MODEL_KEYS = ("data", "network", "quantizer", "seed")


@torch.no_grad()
def validation_mse(model, dataset, batch_size: int, accelerator: Accelerator) -> float:
    """Mean per-pixel MSE over `dataset`, sharded across processes and summed."""
    model.eval()
    shard = Subset(dataset, shard_indices(len(dataset), accelerator.process_index, accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for images, _ in DataLoader(shard, batch_size=batch_size):
        images = images.to(accelerator.device)
        with accelerator.autocast():
            recon, _ = model.reconstruct(images)
        total[0] += (recon.float() - images).pow(2).mean(dim=(1, 2, 3)).sum().double()
        total[1] += len(images)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp_min(1))


def parse_args(argv: list[str] | None = None) -> tuple[TokenizerJobConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (defaults: the built-in Fashion-MNIST settings)")
    parser.add_argument("--output", required=True, help="output folder, e.g. runs/default/tokenizer")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100 quantizer.name=vqvae")
    args = parser.parse_args(argv)
    return load_config(TokenizerJobConfig, args.config, args.overrides), Path(args.output)


def main(argv: list[str] | None = None) -> None:
    cfg, output = parse_args(argv)
    tokenizer_cfg = cfg.tokenizer_config()  # fails on a config that does not fit the data before any work
    tcfg = cfg.train
    accelerator = build_accelerator(tcfg.mixed_precision, tcfg.cpu, output)
    is_main = accelerator.is_main_process
    checkpoints, resume_from = resume_point(output, tcfg.resume, tcfg.keep_checkpoints)
    if resume_from is not None:
        check_same_settings(output / "job_config.yaml", cfg, MODEL_KEYS)

    set_seed(cfg.seed)
    splits = build_splits(cfg.data, seed=cfg.seed)
    val_set = splits["val"]
    if tcfg.eval_images is not None and tcfg.eval_images < len(val_set):
        val_set = Subset(val_set, range(tcfg.eval_images))

    model = Tokenizer(tokenizer_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=tcfg.lr_factor, patience=tcfg.lr_patience)
        if tcfg.lr_schedule == "plateau"
        else None
    )
    trainer_state = {"step": 0, "best_val_mse": math.inf, "best_step": -1, "train_seconds": 0.0}
    if resume_from is not None:
        names = ["optimizer", "trainer", "rng"] + (["scheduler"] if scheduler else [])
        loaded = checkpoints.load(resume_from, model, names)
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler:
            scheduler.load_state_dict(loaded["scheduler"])
        trainer_state.update(loaded["trainer"])
        restore_rng_state(loaded["rng"])
        accelerator.print(f"resuming from {resume_from} at step {trainer_state['step']}")
    elif is_main:
        atomic_write_text(output / "job_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    start_step = int(trainer_state["step"])
    sampler = StepBatchSampler(
        len(splits["train"]), tcfg.batch_size, accelerator.num_processes, accelerator.process_index,
        cfg.seed, start_step, tcfg.max_steps,
    )
    loader = DataLoader(splits["train"], batch_sampler=sampler, num_workers=tcfg.num_workers)
    accelerator.init_trackers("tokenizer", config={k: str(v) for k, v in to_dict(cfg).items()})

    running_counts = torch.zeros(tokenizer_cfg.quantizer.codebook_size, dtype=torch.float64)
    progress = tqdm(total=tcfg.max_steps, initial=start_step, desc="tokenizer", disable=not is_main, dynamic_ncols=True)
    step = start_step
    started = time.perf_counter()
    seconds_before = float(trainer_state["train_seconds"])

    def save_checkpoint() -> None:
        trainer_state.update(step=step, train_seconds=seconds_before + time.perf_counter() - started)
        if is_main:
            states = {"optimizer": optimizer.state_dict(), "trainer": dict(trainer_state), "rng": capture_rng_state()}
            if scheduler:
                states["scheduler"] = scheduler.state_dict()
            checkpoints.save(step, raw_model, states)
        accelerator.wait_for_everyone()

    model.train()
    for images, _ in loader:
        images = images.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            out = model(images)
        loss = sum(out.losses.values())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        step += 1

        running_counts.mul_(0.98).add_(torch.bincount(out.indices.flatten().cpu(), minlength=len(running_counts)).double())
        if is_main:
            progress.update(1)
        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            probs = running_counts / running_counts.sum()
            running_ppl = float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
            logs = {f"train/{k}": float(v.detach()) for k, v in out.losses.items()}
            logs.update({f"train/{k}": float(v) for k, v in out.stats.items()})
            logs.update({"train/loss": float(loss.detach()), "train/running_perplexity": running_ppl,
                         "train/lr": optimizer.param_groups[0]["lr"]})
            accelerator.log(logs, step=step)
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}", ppl=f"{running_ppl:.1f}")

        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val = validation_mse(raw_model, val_set, tcfg.eval_batch_size, accelerator)
            accelerator.log({"val/mse": val}, step=step)
            if scheduler:
                scheduler.step(val)
            if val < trainer_state["best_val_mse"]:
                trainer_state.update(best_val_mse=val, best_step=step)
                if is_main:
                    raw_model.save_pretrained(output / "best")
        if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
            save_checkpoint()
    progress.close()
    if step < tcfg.max_steps:
        raise CheckpointError(f"the data loader ended early at step {step} of {tcfg.max_steps}")
    train_seconds = seconds_before + time.perf_counter() - started
    sync = ranks_max_difference(model, accelerator)
    accelerator.end_training()
    if not is_main:
        return

    export_best = tcfg.export == "best" and (output / "best" / "model.safetensors").is_file()
    final = Tokenizer.from_pretrained(output / "best") if export_best else raw_model
    final.save_pretrained(output)
    metrics, counts, (originals, recons) = evaluate_tokenizer(
        final, splits["test"], "test", tcfg.eval_batch_size, accelerator.device
    )
    metrics.update(
        quantizer=tokenizer_cfg.quantizer.name,
        weights=f"best validation (step {trainer_state['best_step']})" if export_best else f"last (step {step})",
        best_val_mse=trainer_state["best_val_mse"],
        steps=step,
        train_seconds=round(train_seconds, 1),
        processes=accelerator.num_processes,
        max_param_difference_across_processes=sync,
        latent_grid=[tokenizer_cfg.latent_size, tokenizer_cfg.latent_size],
        dataset=cfg.data.name,
    )
    save_reconstruction_grid(originals, recons, output / "reconstructions.png")
    save_usage_histograms({tokenizer_cfg.quantizer.name: counts}, output / "codebook_usage.png")
    atomic_write_json(output / "metrics.json", metrics)
    print(
        f"test: perplexity {metrics['perplexity']:.1f} of {metrics['codebook_size']}, usage {100 * metrics['usage']:.1f}%, "
        f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}; wrote {output}/metrics.json"
    )


if __name__ == "__main__":
    run_cli(main)
