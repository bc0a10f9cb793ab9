"""Train a stage-1 tokenizer (VQ-WAE by default), then evaluate it on the test split.

    python -m pipelines.train_tokenizer --config configs/fashion_mnist.yaml --output runs/default/tokenizer key=value ...
    accelerate launch --num_processes 2 --cpu -m pipelines.train_tokenizer ...   (same flags)

Writes to the output folder: model.safetensors + config.json (the export stage 2 loads, `Tokenizer.from_pretrained`),
best/ (best validation weights), checkpoints/ (the same command resumes from the newest), logs/ (TensorBoard),
job_config.yaml, metrics.json, reconstructions.png and codebook_usage.png. model.safetensors is written last.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from configio.cli import JobArgumentParser, run_cli
from configio.config import load_config
from configio.errors import ConfigError
from stage1_tokenizer.model import Tokenizer
from stage1_tokenizer.quantizers import SPECS
from stage1_tokenizer.quantizers.base import perplexity

from .datasets import build_splits, validation_is_empty
from .resources import check_fits_tokenizer
from .settings import TokenizerJobConfig
from .training import TrainingTask, shard_indices, train


EMPTY_VALIDATION = ("the validation split is empty (data.val_size=0 or data.val_fraction=0?); it picks the best "
                    "weights and drives the LR schedule: give it images (data.val_size > 0)")


class TokenizerTask(TrainingTask):
    name = "tokenizer"
    job = "train_tokenizer"
    validation_metric = "val/mse"
    progress_format = {"loss": "{loss:.4f}", "ppl": "{running_perplexity:.1f}"}
    summary_format = ("test perplexity {perplexity:.1f} of {codebook_size}, usage {usage:.1%}, PSNR {psnr:.2f} dB, "
                      "SSIM {ssim:.4f}")

    def __init__(self, cfg: TokenizerJobConfig, output: Path):
        self.cfg, self.output = cfg, output
        self.tokenizer_cfg = cfg.tokenizer_config()  # fails on a config that does not fit the data before any work
        check_fits_tokenizer(self.tokenizer_cfg, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.data.name,
                             cfg.data.limit, "cpu" if cfg.train.cpu else "auto")
        self.job_record = {}
        # Another quantizer's settings do not change this one's result.
        self.incidental = tuple(f"quantizer.{setting.name}" for spec in SPECS.values() if spec.name != cfg.quantizer.name
                                for setting in spec.settings)
        if validation_is_empty(cfg.data):  # before the folder is claimed: a settings error leaves nothing behind
            raise ConfigError(EMPTY_VALIDATION)
        self.state = {"running_counts": torch.zeros(self.tokenizer_cfg.quantizer.codebook_size, dtype=torch.float64)}

    def load_data(self) -> None:
        cfg = self.cfg
        self.splits = build_splits(cfg.data, seed=cfg.seed)
        self.train_data = self.splits["train"]
        val = self.splits["val"]
        if len(val) == 0:
            raise ConfigError(EMPTY_VALIDATION)
        limit = cfg.train.eval_images
        self.val_set = val if limit is None or limit >= len(val) else Subset(val, range(limit))

    def build_model(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_cfg)

    def training_step(self, model, batch, step, accelerator):
        images = batch[0].to(accelerator.device, non_blocking=True)
        out = model(images)
        # Usage over the last ~50 batches: a per-batch perplexity depends on the batch size.
        counts = self.state["running_counts"].mul_(0.98)
        counts.add_(torch.bincount(out.indices.flatten().cpu(), minlength=len(counts)))
        logs = {k: float(v.detach()) for k, v in {**out.losses, **out.stats}.items()}
        logs["running_perplexity"] = float(perplexity(counts))
        return sum(out.losses.values()), logs

    @torch.no_grad()
    def validate(self, model, accelerator) -> float:
        """Mean per-pixel MSE over the validation images, sharded across processes and summed."""
        model.eval()
        shard = Subset(self.val_set, shard_indices(len(self.val_set), accelerator.process_index, accelerator.num_processes))
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for images, _ in DataLoader(shard, batch_size=self.cfg.train.eval_batch_size):
            images = images.to(accelerator.device)
            with accelerator.autocast():
                recon, _ = model.reconstruct(images)
            total[0] += (recon.float() - images).pow(2).mean(dim=(1, 2, 3)).sum().double()
            total[1] += len(images)
        total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1].clamp_min(1))

    def final_metrics(self, model, accelerator) -> dict[str, Any]:
        # Imported here: torchvision's models and torchmetrics take seconds to import, and a finished or locked
        # folder answers before any of them is needed.
        from eval.plots import save_reconstruction_grid, save_usage_histograms
        from eval.reconstruction import evaluate_tokenizer

        if not accelerator.is_main_process:
            return {}
        output = self.output
        metrics, counts, (originals, recons) = evaluate_tokenizer(
            model, self.splits["test"], "test", self.cfg.train.eval_batch_size, accelerator.device
        )
        metrics.update(quantizer=self.tokenizer_cfg.quantizer.name, dataset=self.cfg.data.name,
                       latent_grid=[self.tokenizer_cfg.latent_size, self.tokenizer_cfg.latent_size])
        save_reconstruction_grid(originals, recons, output / "reconstructions.png")
        save_usage_histograms({self.tokenizer_cfg.quantizer.name: counts}, output / "codebook_usage.png")
        return metrics


def parse_args(argv: list[str] | None = None) -> tuple[TokenizerJobConfig, Path]:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (defaults: the built-in Fashion-MNIST settings)")
    parser.add_argument("--output", required=True, help="output folder, e.g. runs/default/tokenizer")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100 quantizer.name=vqvae")
    args = parser.parse_args(argv)
    return load_config(TokenizerJobConfig, args.config, args.overrides), Path(args.output)


def main(argv: list[str] | None = None) -> None:
    cfg, output = parse_args(argv)
    train(TokenizerTask(cfg, output), cfg, output)


if __name__ == "__main__":
    run_cli(main)
