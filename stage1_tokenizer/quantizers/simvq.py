"""SimVQ (Zhu et al., 2024, "Addressing representation collapse in vector quantized models with one linear layer")
through vector-quantize-pytorch's `SimVQ` (public API only).

The codebook is a frozen random basis C times one learned linear map W: every code moves whenever W does, so no code
is left behind by the nearest-codeword updates that make a plain VQ-VAE's codebook collapse. Losses as the library
computes them: ||sg(z) - q||^2 + beta ||z - sg(q)||^2 (beta: quantizer.beta, default 0.25); the encoder's gradient
is straight-through, or the rotation trick with quantizer.rotation_trick=true.
"""
from __future__ import annotations

import torch

from .base import Quantizer, QuantizerInterface, QuantizerOutput, check_code_indices, code_perplexity, nearest_codewords
from .registry import QuantizerSpec, register


class SimVQQuantizer(QuantizerInterface):
    def __init__(self, codebook_size: int, embedding_dim: int, beta: float = 0.25, rotation_trick: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        from vector_quantize_pytorch import SimVQ  # its import takes seconds: only when one is built

        self.simvq = SimVQ(dim=embedding_dim, codebook_size=codebook_size, channel_first=True,
                           rotation_trick=rotation_trick, input_to_quantize_commit_loss_weight=beta)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the codewords W C the latents are matched to."""
        return self.simvq.codebook.float()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, indices, loss = self.simvq(z.float())
        indices = indices.long()
        return QuantizerOutput(quantized.float(), indices, {"commitment": loss.float()},
                               {"perplexity": code_perplexity(indices, self.codebook_size).detach()})

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codewords: (flat latents, flat indices, codeword grid (B, D, H, W))."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = Quantizer.flatten(z)
            indices = nearest_codewords(flat.detach(), self.codebook)
            b, _, h, w = z.shape
            return flat, indices, self.lookup(indices.view(b, h, w))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> codeword grid (B, D, H, W)."""
        check_code_indices(indices, self.codebook_size)
        return self.codebook[indices.long()].permute(0, 3, 1, 2).contiguous()


register(QuantizerSpec(
    name="simvq",
    description="SimVQ, a codebook reparameterised by one linear layer (vector-quantize-pytorch)",
    build=lambda cfg, dim, positions, data_dim: SimVQQuantizer(cfg.codebook_size, dim, cfg.resolved_beta,
                                                                cfg.rotation_trick),
    shared=("codebook_size", "rotation_trick"),
    default_beta=0.25,
    order=35,
))
