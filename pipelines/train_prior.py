"""Train the stage-2 prior (a `transformers` causal LM) on code sequences extracted from the train split.

    python -m pipelines.train_prior --codes runs/default/codes --output runs/default/prior [--config configs/prior.yaml] key=value ...
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.train_prior ...   (same flags)

Vocabulary size, sequence length and classes come from the code files. Validation NLL (bits per code, `*_bits_per_code` in metrics.json) is measured
on the val codes at every evaluation; the best weights are exported with `save_pretrained` (config.json +
model.safetensors, written last) into the output folder, with metrics.json holding the final validation and test
NLL. The test codes are only ever scored, never trained on.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from configio.cli import JobArgumentParser, run_cli
from configio.config import from_dict, load_values
from configio.errors import ConfigError
from configio.files import file_sha256
from stage2_prior.model import CodePrior, PriorConfig

from .resources import check_fits_prior
from .runs import CODE_SPLITS, CodeSet, load_code_splits
from .settings import PriorJobConfig
from .training import TrainingTask, shard_indices, train


# Decided by the code files, never by a setting: one given anyway must agree with the codes.
DATA_DECIDED = ("codebook_size", "sequence_length", "num_classes")


def prior_config_for(codes: CodeSet, cfg: PriorConfig, given: dict[str, Any] | None = None) -> PriorConfig:
    """The architecture from the config; vocabulary, length and classes from the codes they will model.

    `given`: the prior settings the user wrote; a data-decided one that disagrees with the codes is refused."""
    h, w = codes.grid
    if cfg.class_conditional and codes.num_classes < 1:
        raise ConfigError(
            "prior.class_conditional=true but the dataset has no class labels; set prior.class_conditional=false"
        )
    filled = replace(cfg, codebook_size=codes.codebook_size, sequence_length=h * w,
                     num_classes=codes.num_classes if cfg.class_conditional else 0)
    for key in DATA_DECIDED:
        if key in (given or {}) and getattr(filled, key) != getattr(cfg, key):
            raise ConfigError(f"prior.{key}={getattr(cfg, key)} but the codes decide it ({getattr(filled, key)}); remove "
                              f"prior.{key}: the vocabulary, sequence length and classes come from the code files")
    filled.check_complete()
    return filled


@torch.no_grad()
def bits_per_code(prior: CodePrior, codes: CodeSet, batch_size: int, accelerator) -> float:
    """Mean negative log-likelihood of the code sequences in bits per code, sharded across processes."""
    prior.eval()
    idx = shard_indices(len(codes.codes), accelerator.process_index, accelerator.num_processes)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        batch = codes.codes[rows].to(accelerator.device)
        cond = codes.labels[rows].to(accelerator.device) if prior.config.class_conditional else None
        with accelerator.autocast():
            total[0] += prior.nll_sum(batch, cond).double().sum()
        total[1] += batch.numel()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp_min(1) / math.log(2))


class PriorTask(TrainingTask):
    name = "prior"
    job = "train_prior"
    validation_metric = "val/bits_per_code"
    progress_format = {"bits": "{bits_per_code:.3f}"}
    summary_format = ("validation {val_bits_per_code:.3f} bits/code, test {test_bits_per_code:.3f} "
                      "(uniform: {uniform_bits_per_code:.1f})")

    def __init__(self, cfg: PriorJobConfig, codes_dir: Path, given: dict[str, Any] | None = None):
        self.cfg = cfg
        self.codes = load_code_splits(codes_dir)
        self.prior_cfg = prior_config_for(self.codes["train"], cfg.prior, given)
        check_fits_prior(self.prior_cfg, cfg.train.batch_size, "cpu" if cfg.train.cpu else "auto")
        sha = self.codes["train"].metadata["tokenizer_sha256"]
        digest = hashlib.sha256("".join(file_sha256(Path(codes_dir) / f"{s}.safetensors") for s in CODE_SPLITS).encode())
        # The code files' contents define the run, not the folder they sit in.
        self.job_record = {"codes": {"tokenizer_sha256": sha, "sha256": digest.hexdigest()}}
        self.inputs = (Path(codes_dir),)
        self.train_data = TensorDataset(self.codes["train"].codes, self.codes["train"].labels)
        val = self.codes["val"]
        limit = cfg.train.eval_images
        self.val = val if limit is None or limit >= len(val.codes) else CodeSet(val.codes[:limit], val.labels[:limit], val.metadata)

    def build_model(self) -> CodePrior:
        return CodePrior(self.prior_cfg)

    def training_step(self, model, batch, step, accelerator):
        codes, labels = (t.to(accelerator.device, non_blocking=True) for t in batch)
        loss = model(codes, labels if self.prior_cfg.class_conditional else None)
        return loss, {"bits_per_code": float(loss.detach()) / math.log(2)}

    def validate(self, model, accelerator) -> float:
        return bits_per_code(model, self.val, self.cfg.train.eval_batch_size, accelerator)

    def final_metrics(self, model, accelerator) -> dict[str, Any]:
        batch = self.cfg.train.eval_batch_size
        val_bpc = bits_per_code(model, self.codes["val"], batch, accelerator)
        test_bpc = bits_per_code(model, self.codes["test"], batch, accelerator)
        cfg = self.prior_cfg
        return {
            "val_bits_per_code": val_bpc,
            "test_bits_per_code": test_bpc,
            "val_nats_per_code": val_bpc * math.log(2),
            "test_nats_per_code": test_bpc * math.log(2),
            "uniform_bits_per_code": math.log2(cfg.codebook_size),
            "num_train_sequences": len(self.codes["train"].codes),
            "sequence_length": cfg.sequence_length,
            "codebook_size": cfg.codebook_size,
            "class_conditional": cfg.class_conditional,
            "tokenizer_sha256": self.job_record["codes"]["tokenizer_sha256"],
        }


def parse_args(argv: list[str] | None = None) -> tuple[PriorJobConfig, Path, Path, dict[str, Any]]:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", required=True, help="folder with train/val/test.safetensors from pipelines.extract_codes")
    parser.add_argument("--output", required=True, help="output folder, e.g. runs/default/prior")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in settings)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100 prior.num_layers=6")
    args = parser.parse_args(argv)
    values = load_values(args.config, args.overrides)
    given = values.get("prior") if isinstance(values.get("prior"), dict) else {}
    return from_dict(PriorJobConfig, values), Path(args.codes), Path(args.output), given


def main(argv: list[str] | None = None) -> None:
    cfg, codes_dir, output, given = parse_args(argv)
    train(PriorTask(cfg, codes_dir, given), cfg, output)


if __name__ == "__main__":
    run_cli(main)
