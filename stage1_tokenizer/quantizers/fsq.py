"""Finite scalar quantization (Mentzer et al., ICLR 2024) through vector-quantize-pytorch's `FSQ` (public API only).
The codebook is the implicit grid of prod(levels) points; a read-only `codebook` property gives them after the output
projection, for analysis.

Levels. `quantizer.fsq_levels` null picks the levels the FSQ paper recommends for the codebook size asked for
(its Table 2/appendix: 2^8 [8, 6, 5], 2^10 [8, 5, 5, 5], 2^12 [7, 5, 5, 5, 5], 2^14 [8, 8, 8, 6, 5], 2^16
[8, 8, 8, 5, 5, 5]; 2^9 [8, 8, 8]), and for the odd exponents between them levels of ours in the same spirit
(2^11 [8, 8, 6, 5], 2^13 [8, 8, 8, 4, 4]), the nearest size for any other K. The real size, prod(levels), is what the
model, its codes and every report use; it can differ from `quantizer.codebook_size` (16,384 asks for 15,360 codes).
Explicit levels must multiply to `quantizer.codebook_size`.
"""
from __future__ import annotations

import math

import torch

from configio.errors import ConfigError

from .base import (
    Quantizer,
    QuantizerInterface,
    QuantizerOutput,
    check_code_indices,
    code_perplexity,
)
from .registry import QuantizerSpec, Setting, register


class FSQQuantizer(QuantizerInterface):
    """Finite scalar quantization (Mentzer et al., ICLR 2024): `FSQ(levels, dim=D)`.

    The library projects each D-dim latent to len(levels) dims, bounds every dim and rounds it to one of its levels
    (straight-through), then projects back to D. The codebook is the implicit grid of prod(levels) points; there is
    no codebook loss and no commitment loss, so the losses are empty. Decoding maps indices -> grid codes -> the
    same output projection as the forward pass.
    """

    def __init__(self, embedding_dim: int, levels: list[int] | tuple[int, ...]):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.levels = list(levels)
        from vector_quantize_pytorch import FSQ  # its import takes seconds: only when one is built

        self.fsq = FSQ(levels=self.levels, dim=embedding_dim)
        self.codebook_size = int(self.fsq.codebook_size)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the grid points after the output projection: what the decoder sees for each code (detached)."""
        with torch.no_grad(), torch.autocast(device_type=self.fsq.implicit_codebook.device.type, enabled=False):
            indices = torch.arange(self.codebook_size, device=self.fsq.implicit_codebook.device)
            return self.fsq.indices_to_codes(indices).float()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, indices = self.fsq(z.float())
        indices = indices.long()
        return QuantizerOutput(
            quantized.float(), indices, {}, {"perplexity": code_perplexity(indices, self.codebook_size).detach()}
        )

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat latents, flat indices, quantized grid (B, D, H, W)); FSQ is deterministic, so this is the forward."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            quantized, indices = self.fsq(z)
        return Quantizer.flatten(z), indices.reshape(-1).long(), quantized.float()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> quantized grid (B, D, H, W), through the forward pass's output projection."""
        check_code_indices(indices, self.codebook_size)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.fsq.indices_to_codes(indices.long()).float().contiguous()


RECOMMENDED_LEVELS = {
    8: [8, 6, 5], 9: [8, 8, 8], 10: [8, 5, 5, 5], 11: [8, 8, 6, 5], 12: [7, 5, 5, 5, 5], 13: [8, 8, 8, 4, 4],
    14: [8, 8, 8, 6, 5], 16: [8, 8, 8, 5, 5, 5],
}


def levels_for(cfg) -> list[int]:
    """The levels `cfg` gives: its own, or the recommended ones for the nearest size (see the module docstring)."""
    if cfg.fsq_levels is not None:
        return list(cfg.fsq_levels)
    exponent = min(RECOMMENDED_LEVELS, key=lambda e: (abs(e - math.log2(cfg.codebook_size)), e))
    return list(RECOMMENDED_LEVELS[exponent])


def _check(cfg) -> None:
    if cfg.fsq_levels is not None and cfg.codebook_size != math.prod(cfg.fsq_levels):
        levels = list(cfg.fsq_levels)
        raise ConfigError(
            f"quantizer.codebook_size must equal the product of quantizer.fsq_levels for fsq: {levels} gives "
            f"{math.prod(levels)} codes, not {cfg.codebook_size}; set codebook_size={math.prod(levels)}, change "
            "fsq_levels (e.g. [8, 8, 8] = 512, [8, 5, 5, 5] = 1000) or set fsq_levels=null for the recommended ones"
        )


register(QuantizerSpec(
    name="fsq",
    description="FSQ, finite scalar quantization (vector-quantize-pytorch)",
    build=lambda cfg, dim, positions, data_dim: FSQQuantizer(dim, levels_for(cfg)),
    settings=(Setting("fsq_levels", list[int] | None, None,
                      expected="null or a non-empty list of integers >= 3, e.g. [8, 8, 8]",
                      ok=lambda v: bool(v) and all(not isinstance(x, bool) and isinstance(x, int) and x >= 3 for x in v)),),
    check=_check,
    order=40,
))
