"""What every quantizer shares: a codebook, nearest-codeword lookup and one call signature.

`quantizer(z)` takes encoder latents (B, D, H, W) and returns a `QuantizerOutput`: straight-through quantized latents,
code indices (B, H, W), the weighted loss terms to add to the reconstruction loss, and detached statistics.
All of it runs in float32 whatever the surrounding autocast says.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


def perplexity(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(entropy) of histograms or distributions along `dim` (counts need not be normalised).

    K when all K entries carry equal mass, 1 when one entry carries all of it. The one definition of perplexity
    used everywhere: code histograms of a batch or a split, and the per-position distributions pi of VQ-WAE.
    """
    weights = weights.double() if weights.dtype == torch.float64 else weights.float()
    probs = weights / weights.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.exp(-torch.special.xlogy(probs, probs).sum(dim=dim))


def code_perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Perplexity of the histogram of `indices` over a codebook of `codebook_size` entries."""
    return perplexity(torch.bincount(indices.reshape(-1), minlength=codebook_size))


def check_code_indices(indices: torch.Tensor, codebook_size: int) -> None:
    """Reject code indices outside [0, codebook_size): indexing would fail obscurely or, for an implicit grid, decode garbage."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"code indices must lie in [0, {codebook_size}), got range [{int(indices.min())}, {int(indices.max())}]"
        )


def squared_distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances between the rows of `flat` (N, D) and of `codebook` (K, D)."""
    return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]


# Rows of latents per block of the nearest-codeword search: a (rows, K) block of about 2^22 entries stays in cache
# where a whole (N, K) matrix (1 GB for N = K = 16,384) would not.
_SEARCH_BLOCK_ENTRIES = 1 << 22


def nearest_codewords(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of `codebook` (K, D) for each row of `flat` (N, D), searched in blocks of rows:
    argmin over k of ||c_k||^2 - 2 z.c_k (||z||^2 does not change the argmin) in one fused product per block."""
    flat, codebook = flat.detach(), codebook.detach()
    norms = codebook.pow(2).sum(1)
    rows = max(1, _SEARCH_BLOCK_ENTRIES // max(1, codebook.shape[0]))
    if len(flat) == 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    return torch.cat([torch.addmm(norms, block, codebook.T, alpha=-2.0).argmin(dim=1) for block in flat.split(rows)])


class QuantizerInterface(nn.Module):
    """What the Tokenizer calls: forward(z), quantize(z), lookup(indices), codebook_size, and this hook."""

    codebook_size: int

    def losses_given_reconstruction(self, losses: dict[str, torch.Tensor], mse: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses once the reconstruction error of the batch is known (a likelihood-weighted quantizer rescales)."""
        return losses


class Quantizer(QuantizerInterface):
    """A quantizer with an explicit codebook parameter and nearest-codeword lookup."""

    def __init__(self, codebook_size: int, embedding_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.codebook = nn.Parameter(torch.empty(codebook_size, embedding_dim).uniform_(-1 / codebook_size, 1 / codebook_size))

    @staticmethod
    def flatten(z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B * H * W, D) in raster order."""
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword (squared Euclidean) for each row of `flat` (N, D)."""
        return nearest_codewords(flat, self.codebook.float())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> codeword grid (B, D, H, W)."""
        check_code_indices(indices, self.codebook_size)
        return self.codebook.float()[indices].permute(0, 3, 1, 2).contiguous()

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codewords: (flat latents, flat indices, codeword grid (B, D, H, W))."""
        flat = self.flatten(z)
        indices = self.nearest(flat.detach())
        b, _, h, w = z.shape
        return flat, indices, self.lookup(indices.view(b, h, w))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        raise NotImplementedError
