"""Codebook statistics from code histograms pooled over a whole split (not per batch: that depends on batch size)."""
from __future__ import annotations

import torch

from stage1_tokenizer.quantizers.base import perplexity


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1).long().cpu(), minlength=codebook_size)


def codebook_statistics(counts: torch.Tensor) -> dict[str, float | int]:
    """Perplexity (exp of the entropy of the histogram), usage (fraction of codes used at least once), dead codes."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("cannot compute codebook statistics from an empty histogram")
    used = int((counts > 0).sum())
    return {
        "perplexity": float(perplexity(counts)),
        "usage": used / counts.numel(),
        "dead_codes": counts.numel() - used,
        "codebook_size": counts.numel(),
    }
