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

import torch
from safetensors import safe_open

from configio.config import apply_overrides, from_dict
from configio.errors import CheckpointError, ConfigError

from .datasets import DataConfig
from .run_folder import RECORD_NAME, read_record

CODE_SPLITS = ("train", "val", "test")


def job_seed(tokenizer_dir: Path) -> int:
    """The seed the tokenizer in `tokenizer_dir` was trained with; it also fixed its train/val split."""
    seed = read_record(tokenizer_dir).get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise CheckpointError(f"'{Path(tokenizer_dir) / RECORD_NAME}' holds no valid seed; train the tokenizer again")
    return seed


def tokenizer_data_config(tokenizer_dir: Path, overrides: list[str] | None = None) -> DataConfig:
    """The data settings the tokenizer was trained with, with `data.*` overrides applied."""
    data = read_record(tokenizer_dir).get("data", {})
    if not isinstance(data, dict):
        raise CheckpointError(f"'{Path(tokenizer_dir) / RECORD_NAME}' holds no data settings; train the tokenizer again")
    return from_dict(DataConfig, apply_overrides({"data": data}, list(overrides or []))["data"], prefix="data.")


def prior_tokenizer_sha256(prior_dir: Path) -> str | None:
    """sha256 of the tokenizer whose codes the prior in `prior_dir` was trained on (None when not recorded)."""
    return (read_record(prior_dir).get("codes") or {}).get("tokenizer_sha256")


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

    def check(self, path: Path) -> None:
        """Every field readable and consistent with the tensors; one CheckpointError line otherwise."""
        def corrupt(what: str) -> CheckpointError:
            return CheckpointError(f"code file '{path}' is corrupt ({what}); delete it and extract the codes again")

        try:
            size, (h, w), classes = self.codebook_size, self.grid, self.num_classes
        except (ValueError, TypeError, KeyError):
            raise corrupt("non-numeric codebook_size, grid or num_classes in its metadata") from None
        if not 2 <= size < 2**31 or not (0 < h < 2**16 and 0 < w < 2**16) or not 0 <= classes < 2**31:
            raise corrupt(f"codebook_size {size}, grid {h}x{w} or num_classes {classes} out of range")
        if self.codes.ndim != 2 or self.codes.shape[1] != h * w:
            raise corrupt(f"codes of shape {tuple(self.codes.shape)} do not fit the {h}x{w} grid")
        if self.labels.ndim != 1 or len(self.labels) != len(self.codes):
            raise corrupt(f"{len(self.labels)} labels for {len(self.codes)} sequences")
        if len(self.codes) == 0:
            raise CheckpointError(f"code file '{path}' holds no sequences; give the data set images in that split")
        if int(self.codes.min()) < 0 or int(self.codes.max()) >= size:
            raise corrupt(f"codes outside [0, {size})")
        if classes and (int(self.labels.min()) < 0 or int(self.labels.max()) >= classes):
            raise corrupt(f"labels outside [0, {classes})")


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
    codeset.check(path)
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


__all__ = ["CODE_SPLITS", "RECORD_NAME", "CodeSet", "ConfigError", "job_seed", "load_code_splits", "load_codes",
           "prior_tokenizer_sha256", "read_record", "stored_tokenizer_hash", "tokenizer_data_config"]
