"""Quantizers behind one call signature: `quantizer(z) -> QuantizerOutput(quantized, indices, losses, stats)`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configio.errors import ConfigError

from .base import Quantizer, QuantizerOutput, code_perplexity
from .vqvae import VQVAEQuantizer
from .vqwae import VQWAEQuantizer


@dataclass
class QuantizerConfig:
    name: Literal["vqwae", "vqvae"] = "vqwae"
    codebook_size: int = 512
    beta: float | None = None  # vqwae: weight of the Wasserstein term (1e-3); vqvae: commitment weight (0.25)
    # vqwae
    kl_weight: float = 1.0
    weights: Literal["learned", "uniform"] = "learned"
    form: Literal["per_position", "global"] = "per_position"
    init: Literal["uniform", "reference"] = "uniform"
    # vqwae transport: "exact" (default: shortest paths over the latents), "dense" (exact, POT's network simplex)
    solver: Literal["exact", "dense"] = "exact"
    # several processes: "local" solves each process's batch, "global_batch" the latents gathered from all processes
    transport_scope: Literal["local", "global_batch"] = "local"
    # vqvae
    beta_on_codebook: bool = False  # the VQ-WAE authors' baseline: beta on the codebook term, not the commitment

    def validate(self) -> None:
        if self.codebook_size < 2:
            raise ConfigError(f"quantizer.codebook_size must be at least 2, got {self.codebook_size}")
        if self.beta is not None and self.beta < 0:
            raise ConfigError(f"quantizer.beta must be >= 0, got {self.beta}")
        if self.kl_weight < 0:
            raise ConfigError(f"quantizer.kl_weight must be >= 0, got {self.kl_weight}")

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 1e-3 if self.name == "vqwae" else 0.25


def build_quantizer(cfg: QuantizerConfig, embedding_dim: int, num_positions: int) -> Quantizer:
    if cfg.name == "vqvae":
        return VQVAEQuantizer(cfg.codebook_size, embedding_dim, cfg.resolved_beta, cfg.beta_on_codebook)
    return VQWAEQuantizer(
        cfg.codebook_size,
        embedding_dim,
        num_positions,
        beta=cfg.resolved_beta,
        kl_weight=cfg.kl_weight,
        learn_weights=cfg.weights == "learned",
        global_transport=cfg.form == "global",
        init=cfg.init,
        solver=cfg.solver,
        transport_scope=cfg.transport_scope,
    )


__all__ = [
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "VQVAEQuantizer",
    "VQWAEQuantizer",
    "build_quantizer",
    "code_perplexity",
]
