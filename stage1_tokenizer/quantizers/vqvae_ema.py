"""VQ-VAE with an EMA codebook, k-means initialisation and dead-code replacement, through vector-quantize-pytorch's
`VectorQuantize` (public API only). It holds no codebook Parameter: the EMA codebook is a buffer the library updates
itself; a read-only `codebook` property gives the (K, D) codewords for analysis.
"""
from __future__ import annotations

import torch

from .base import (
    Quantizer,
    QuantizerInterface,
    QuantizerOutput,
    check_code_indices,
    code_perplexity,
    nearest_codewords,
)
from .registry import QuantizerSpec, Setting, register


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
        rotation_trick: bool = False,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        from vector_quantize_pytorch import VectorQuantize  # its import takes seconds: only when one is built

        self.vq = VectorQuantize(
            dim=embedding_dim,
            codebook_size=codebook_size,
            decay=decay,
            commitment_weight=commitment_weight,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold,
            accept_image_fmap=True,
            # The library defaults to the rotation trick; VQ-VAE's estimator is the plain straight-through one unless
            # quantizer.rotation_trick asks for it (Fifty et al., 2024).
            rotation_trick=rotation_trick,
        )

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) codewords (a buffer the EMA updates; all zeros before the k-means initialisation)."""
        return self.vq.codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            codewords, indices, commitment = self.vq(z)
            # The library's gradient estimator (straight-through or rotation) only acts in training mode; outside it
            # the forward value is the same, so the straight-through form gives it in both.
            quantized = codewords.float() if self.training and self.vq.rotation_trick else z + (codewords.float() - z).detach()
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
            flat = Quantizer.flatten(z)
            indices = nearest_codewords(flat.detach(), self.codebook.float())
            b, _, h, w = z.shape
            return flat, indices, self.lookup(indices.view(b, h, w))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> codeword grid (B, D, H, W)."""
        check_code_indices(indices, self.codebook_size)
        return self.vq.get_output_from_indices(indices.long()).float().contiguous()


register(QuantizerSpec(
    name="vqvae-ema",
    description="VQ-VAE with an EMA codebook, k-means init and dead-code replacement (vector-quantize-pytorch)",
    build=lambda cfg, dim, positions, data_dim: EMAVectorQuantizer(
        cfg.codebook_size, dim, commitment_weight=cfg.resolved_beta, decay=cfg.vqvae_ema_decay,
        kmeans_init=cfg.vqvae_ema_kmeans_init, dead_code_threshold=cfg.vqvae_ema_dead_code_threshold,
        rotation_trick=cfg.rotation_trick),
    settings=(
        # The EMA decay of VQ-VAE (van den Oord et al. 2017, appendix).
        Setting("vqvae_ema_decay", float, 0.99, expected="a number in (0, 1), e.g. 0.99", ok=lambda v: 0 < v < 1),
        Setting("vqvae_ema_kmeans_init", bool, True),  # k-means on the first training batch
        # Replace codes whose EMA cluster size drops below this; 0: never.
        Setting("vqvae_ema_dead_code_threshold", float, 2.0, expected=">= 0 (0 turns dead-code replacement off), e.g. 2",
                ok=lambda v: v >= 0),
    ),
    shared=("codebook_size", "rotation_trick"),
    default_beta=0.25,
    order=20,
))
