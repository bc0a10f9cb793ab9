"""A run folder, read the same way by every job: `runs/<name>/{tokenizer,codes,prior,samples,eval}`.

What one job writes and another reads lives here, so jobs never import each other:
- each training job's `job_config.yaml` (the settings it ran with; written before training starts),
- the seed and data settings a tokenizer was trained with (code extraction, sampling and evaluation reuse them, so
  they see the same train/val/test split),
- the code files of `codes/` (`<split>.safetensors`: codes (N, h*w) in raster order, labels (N,), and the
  tokenizer's sha256, codebook size and grid in the metadata).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from configio.config import apply_overrides, from_dict
from configio.errors import CheckpointError, ConfigError

from .datasets import DataConfig

JOB_CONFIG_NAME = "job_config.yaml"
CODE_SPLITS = ("train", "val", "test")


def read_job_config(folder: Path) -> dict[str, Any]:
    """The settings a training job in `folder` ran with, as a mapping ({} when it has none yet)."""
    path = Path(folder) / JOB_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise CheckpointError(f"'{path}' is corrupt (not valid YAML); delete the run folder and train again") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"'{path}' is corrupt (not a mapping); delete the run folder and train again")
    return values


def job_seed(tokenizer_dir: Path) -> int:
    """The seed the tokenizer in `tokenizer_dir` was trained with; it also fixed its train/val split."""
    return int(read_job_config(tokenizer_dir).get("seed", 0))


def tokenizer_data_config(tokenizer_dir: Path, overrides: list[str] | None = None) -> DataConfig:
    """The data settings the tokenizer was trained with, with `data.*` overrides applied."""
    values = apply_overrides({"data": read_job_config(tokenizer_dir).get("data", {})}, list(overrides or []))["data"]
    return from_dict(DataConfig, values, prefix="data.")


def prior_tokenizer_sha256(prior_dir: Path) -> str | None:
    """sha256 of the tokenizer whose codes the prior in `prior_dir` was trained on (None when not recorded)."""
    return (read_job_config(prior_dir).get("codes") or {}).get("tokenizer_sha256")


@dataclass
class CodeSet:
    codes: torch.Tensor  # (N, L) long
    labels: torch.Tensor  # (N,) long
    metadata: dict[str, str]

    @property
    def codebook_size(self) -> int:
        return int(self.metadata["codebook_size"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = json.loads(self.metadata["grid"])
        return int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.metadata.get("num_classes", "0") or 0)


def load_codes(path: Path) -> CodeSet:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"code file '{path}' is missing; run 'make codes' (or pipelines.extract_codes) first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            codes, labels = handle.get_tensor("codes").long(), handle.get_tensor("labels").long()
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(f"code file '{path}' is corrupt ({err}); delete it and extract the codes again") from None
    for key in ("codebook_size", "grid", "tokenizer_sha256"):
        if key not in metadata:
            raise CheckpointError(f"code file '{path}' lacks '{key}' in its metadata; extract the codes again")
    codeset = CodeSet(codes, labels, metadata)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codeset.codebook_size):
        raise CheckpointError(f"code file '{path}' holds codes outside [0, {codeset.codebook_size}); extract the codes again")
    if len(codes) == 0:
        raise CheckpointError(f"code file '{path}' holds no sequences; give the data set images in that split")
    return codeset


def stored_tokenizer_hash(path: Path) -> str | None:
    """The tokenizer sha256 a code file was made with, or None when the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("tokenizer_sha256")
    except Exception:  # noqa: BLE001 - any unreadable file simply gets rebuilt
        return None


def load_code_splits(codes_dir: Path, splits: tuple[str, ...] = CODE_SPLITS) -> dict[str, CodeSet]:
    """The code files of `splits`, checked to come from one tokenizer."""
    sets = {split: load_codes(Path(codes_dir) / f"{split}.safetensors") for split in splits}
    if len({s.metadata["tokenizer_sha256"] for s in sets.values()}) > 1:
        raise CheckpointError(f"the code files in {codes_dir} come from different tokenizers; extract them again")
    return sets


__all__ = ["CODE_SPLITS", "JOB_CONFIG_NAME", "CodeSet", "ConfigError", "job_seed", "load_code_splits", "load_codes",
           "prior_tokenizer_sha256", "read_job_config", "stored_tokenizer_hash", "tokenizer_data_config"]
