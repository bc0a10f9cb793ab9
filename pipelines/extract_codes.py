"""Encode the train, validation and test splits with a trained tokenizer into code sequences for the prior.

    python -m pipelines.extract_codes --tokenizer runs/default/tokenizer --output runs/default/codes [key=value ...]

Each split becomes `<split>.safetensors` holding `codes` (N, h*w) in raster order and `labels` (N,), with the
tokenizer's sha256, codebook size and grid in its metadata. A split whose file was made by the same tokenizer
is reused; any other is rebuilt. The data settings come from the tokenizer's own job config (overridable), so
the codes describe the same images the tokenizer was trained on. The prior trains on `train` only.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from configio.cli import JobArgumentParser
from configio.devices import pick_device
from configio.errors import ConfigError
from configio.config import to_dict
from configio.files import atomic_save_safetensors, atomic_write_json, file_sha256
from stage1_tokenizer.model import WEIGHTS_NAME, Tokenizer

from .datasets import build_splits, dataset_info
from .run_folder import claim_folder
from .runs import (
    CODE_SPLITS,
    job_seed,
    load_codes,
    stored_tokenizer_hash,
    tokenizer_data_config,
)


@torch.no_grad()
def encode_split(tokenizer: Tokenizer, dataset, batch_size: int, device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes, labels = [], []
    for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        codes.append(tokenizer.encode(images.to(device)).flatten(1).cpu())
        labels.append(torch.as_tensor(targets).long())
    return torch.cat(codes), torch.cat(labels)


def extract(tokenizer_dir: Path, output: Path, overrides: list[str], batch_size: int = 256, device: str | None = None) -> dict:
    """Encode every split into `output` under the run-folder rule: the tokenizer (its sha256) and the data settings
    define the codes; the same ones reuse every complete split file, others start over (old codes set aside)."""
    tokenizer_dir, output = Path(tokenizer_dir), Path(output)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    device = pick_device(device)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir, map_location=device)
    digest = file_sha256(tokenizer_dir / WEIGHTS_NAME)
    data_cfg = tokenizer_data_config(tokenizer_dir, overrides)
    if data_cfg.image_size != tokenizer.config.image_size:
        raise ConfigError(
            f"data.image_size={data_cfg.image_size} but the tokenizer takes {tokenizer.config.image_size}-pixel images"
        )
    settings = {"tokenizer_sha256": digest, "seed": job_seed(tokenizer_dir), "data": to_dict(data_cfg)}
    with claim_folder(output, "extract_codes", settings, inputs=(tokenizer_dir,)):
        return _extract(tokenizer, tokenizer_dir, digest, data_cfg, output, batch_size, device)


def _extract(tokenizer: Tokenizer, tokenizer_dir: Path, digest: str, data_cfg, output: Path, batch_size: int,
             device: torch.device) -> dict:
    if (output / "summary.json").is_file() and all(stored_tokenizer_hash(output / f"{s}.safetensors") == digest
                                                    for s in CODE_SPLITS):
        try:
            summary = json.loads((output / "summary.json").read_text())
        except (OSError, ValueError):  # damaged by hand: rebuilt below from the complete split files
            summary = None
        if isinstance(summary, dict):
            summary["reused"] = list(CODE_SPLITS)
            return summary
    # train.safetensors (the make target) last: its presence means every split is there.
    order = sorted(CODE_SPLITS, key=lambda split: split == "train")
    todo = [s for s in order if stored_tokenizer_hash(output / f"{s}.safetensors") != digest]
    summary = {"tokenizer": str(tokenizer_dir), "tokenizer_sha256": digest, "reused": [s for s in CODE_SPLITS if s not in todo]}
    if todo:
        splits = build_splits(data_cfg, seed=job_seed(tokenizer_dir))  # the same train/val split as the tokenizer saw
        side = tokenizer.config.latent_size
        num_classes = dataset_info(data_cfg)["num_classes"]
        for split in todo:
            if len(splits[split]) == 0:
                raise ConfigError(f"the {split} split is empty; the prior needs codes of every split (check data.limit "
                                  "and data.val_size)")
            codes, labels = encode_split(tokenizer, splits[split], batch_size, device, f"encoding {split}")
            dtype = torch.int16 if tokenizer.codebook_size <= 2**15 else torch.int32
            metadata = {
                "codebook_size": str(tokenizer.codebook_size),
                "grid": json.dumps([side, side]),
                "tokenizer_sha256": digest,
                "dataset": data_cfg.name,
                "num_classes": str(num_classes or 0),
                "split": split,
                "order": "raster",
            }
            atomic_save_safetensors({"codes": codes.to(dtype), "labels": labels}, output / f"{split}.safetensors", metadata)
    summary["counts"] = {s: int(load_codes(output / f"{s}.safetensors").codes.shape[0]) for s in CODE_SPLITS}
    atomic_write_json(output / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer folder (model.safetensors + config.json)")
    parser.add_argument("--output", required=True, help="where the code files go, e.g. runs/default/codes")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: an accelerator when present)")
    parser.add_argument("overrides", nargs="*", help="data settings, e.g. data.root=/data data.limit=1000")
    args = parser.parse_args(argv)
    for text in args.overrides:
        if not text.startswith("data."):
            raise ConfigError(f"override '{text}': only data.* settings apply to code extraction")
    summary = extract(Path(args.tokenizer), Path(args.output), args.overrides, args.batch_size, args.device)
    print(f"codes: {summary['counts']} (reused: {', '.join(summary['reused']) or 'none'}) in {args.output}")


if __name__ == "__main__":
    from configio.cli import run_cli

    run_cli(main)
