"""VQ-VAE (van den Oord et al., 2017): nearest-codeword quantization trained by codebook and commitment losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Quantizer, QuantizerOutput, code_perplexity
from .registry import QuantizerSpec, Setting, register


class VQVAEQuantizer(Quantizer):
    """Standard VQ-VAE: codebook loss ||sg(z) - q||^2 + beta * commitment loss ||z - sg(q)||^2.

    `beta_on_codebook=True` reproduces the VQ-WAE authors' baseline, which puts beta on the codebook term instead.
    `rotation_trick=True` passes gradients to the encoder through the rotation that takes each latent to its codeword
    (Fifty et al., 2024; vector-quantize-pytorch's `rotate_to`) instead of the straight-through copy.
    """

    def __init__(self, codebook_size: int, embedding_dim: int, beta: float = 0.25, beta_on_codebook: bool = False,
                 rotation_trick: bool = False):
        super().__init__(codebook_size, embedding_dim)
        self.beta = beta
        self.beta_on_codebook = beta_on_codebook
        self.rotation_trick = rotation_trick

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = z.float()
        _, indices, codewords = self.quantize(z)
        codebook_loss = F.mse_loss(codewords, z.detach())
        commitment_loss = F.mse_loss(z, codewords.detach())
        if self.beta_on_codebook:
            codebook_loss = self.beta * codebook_loss
        else:
            commitment_loss = self.beta * commitment_loss
        if self.rotation_trick and self.training:
            from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to  # slow import: only when used

            channels_last = rotate_to(z.permute(0, 2, 3, 1), codewords.permute(0, 2, 3, 1))
            quantized = channels_last.permute(0, 3, 1, 2)
        else:
            quantized = z + (codewords - z).detach()
        b, _, h, w = z.shape
        indices = indices.view(b, h, w)
        return QuantizerOutput(
            quantized,
            indices,
            {"codebook": codebook_loss, "commitment": commitment_loss},
            {"perplexity": code_perplexity(indices, self.codebook_size).detach()},
        )


register(QuantizerSpec(
    name="vqvae",
    description="VQ-VAE (van den Oord et al., 2017)",
    build=lambda cfg, dim, positions, data_dim: VQVAEQuantizer(cfg.codebook_size, dim, cfg.resolved_beta,
                                                                cfg.beta_on_codebook, cfg.rotation_trick),
    # The VQ-WAE authors' baseline: beta on the codebook term, not the commitment.
    settings=(Setting("beta_on_codebook", bool, False),),
    shared=("codebook_size", "rotation_trick"),
    default_beta=0.25,
    variants={
        "vqvae": ("VQ-VAE (beta on the commitment term, as van den Oord et al.)", ("quantizer.beta_on_codebook=false",)),
        "vqvae-reference": ("VQ-VAE as in the VQ-WAE authors' code (beta on the codebook term)",
                            ("quantizer.beta_on_codebook=true",)),
    },
    order=10,
))
