"""Two baselines from the maintained library vector-quantize-pytorch (public API only): EMA VQ-VAE and FSQ.

Both follow the call signature of base.Quantizer (forward, quantize, lookup, codebook_size) but hold no codebook
Parameter: the EMA codebook is a buffer the library updates itself, and FSQ's codebook is an implicit grid. Each
exposes a read-only `codebook` property, (K, D) codewords in latent space, for analysis.
"""
from __future__ import annotations

import torch
from vector_quantize_pytorch import FSQ, VectorQuantize

from .base import (
    QuantizerInterface,
    QuantizerOutput,
    check_code_indices,
    code_perplexity,
    nearest_codewords,
)


def _flatten(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B * H * W, D) in raster order, as base.Quantizer.flatten."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


class EMAVectorQuantizer(QuantizerInterface):
    """VQ-VAE with an exponential-moving-average codebook (van den Oord et al. 2017, appendix; Razavi et al. 2019).

    `VectorQuantize` with k-means initialisation of the codebook on the first training batch and replacement of
    codes whose EMA cluster size falls below `dead_code_threshold` by latents of the current batch. The codebook is
    moved by the EMA only (no gradient); the encoder gets `commitment_weight` * ||z - sg(q)||^2 and the
    straight-through gradient. In evaluation mode the library reports no commitment loss (it is 0 there).
    """

    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        commitment_weight: float = 0.25,
        decay: float = 0.99,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.vq = VectorQuantize(
            dim=embedding_dim,
            codebook_size=codebook_size,
            decay=decay,
            commitment_weight=commitment_weight,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold,
            accept_image_fmap=True,
            # The library defaults to the rotation trick; VQ-VAE's estimator is the plain straight-through one.
            rotation_trick=False,
        )

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) codewords (a buffer the EMA updates; all zeros before the k-means initialisation)."""
        return self.vq.codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            codewords, indices, commitment = self.vq(z)
            # The library's straight-through output only exists in training mode; this gives it in both.
            quantized = z + (codewords.float() - z).detach()
        indices = indices.long()
        return QuantizerOutput(
            quantized,
            indices,
            # A copy: in evaluation mode the library hands out its own zero buffer.
            {"commitment": commitment.float().clone()},
            {"perplexity": code_perplexity(indices, self.codebook_size).detach()},
        )

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codewords: (flat latents, flat indices, codeword grid (B, D, H, W)).

        Read-only: calling the library here would update the EMA in training mode and run the k-means
        initialisation on the batch being encoded if training never ran.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = _flatten(z)
            indices = nearest_codewords(flat.detach(), self.codebook.float())
            b, _, h, w = z.shape
            return flat, indices, self.lookup(indices.view(b, h, w))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> codeword grid (B, D, H, W)."""
        check_code_indices(indices, self.codebook_size)
        return self.vq.get_output_from_indices(indices.long()).float().contiguous()


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
        return _flatten(z), indices.reshape(-1).long(), quantized.float()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> quantized grid (B, D, H, W), through the forward pass's output projection."""
        check_code_indices(indices, self.codebook_size)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.fsq.indices_to_codes(indices.long()).float().contiguous()
