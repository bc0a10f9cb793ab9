"""VQ-VAE (van den Oord et al., 2017): nearest-codeword quantization trained by codebook and commitment losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Quantizer, QuantizerOutput, code_perplexity


class VQVAEQuantizer(Quantizer):
    """Standard VQ-VAE: codebook loss ||sg(z) - q||^2 + beta * commitment loss ||z - sg(q)||^2.

    `beta_on_codebook=True` reproduces the VQ-WAE authors' baseline, which puts beta on the codebook term instead.
    """

    def __init__(self, codebook_size: int, embedding_dim: int, beta: float = 0.25, beta_on_codebook: bool = False):
        super().__init__(codebook_size, embedding_dim)
        self.beta = beta
        self.beta_on_codebook = beta_on_codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = z.float()
        _, indices, codewords = self.quantize(z)
        codebook_loss = F.mse_loss(codewords, z.detach())
        commitment_loss = F.mse_loss(z, codewords.detach())
        if self.beta_on_codebook:
            codebook_loss = self.beta * codebook_loss
        else:
            commitment_loss = self.beta * commitment_loss
        quantized = z + (codewords - z).detach()
        b, _, h, w = z.shape
        indices = indices.view(b, h, w)
        return QuantizerOutput(
            quantized,
            indices,
            {"codebook": codebook_loss, "commitment": commitment_loss},
            {"perplexity": code_perplexity(indices, self.codebook_size).detach()},
        )
