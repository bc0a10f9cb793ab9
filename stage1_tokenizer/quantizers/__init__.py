"""Quantizers behind one call signature: `quantizer(z) -> QuantizerOutput(quantized, indices, losses, stats)`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from configio.errors import ConfigError

from .base import Quantizer, QuantizerOutput, code_perplexity
from .library import EMAVectorQuantizer, FSQQuantizer
from .sqvae import SQVAEQuantizer
from .vqvae import VQVAEQuantizer
from .vqwae import VQWAEQuantizer


@dataclass
class QuantizerConfig:
    name: Literal["vqwae", "vqvae", "sqvae", "vqvae-ema", "fsq"] = "vqwae"
    codebook_size: int = 512
    # vqwae: weight of the Wasserstein term (1e-3); vqvae, vqvae-ema: commitment weight (0.25); sqvae, fsq: unused
    beta: float | None = None
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
    # vqvae-ema (vector-quantize-pytorch's VectorQuantize): EMA codebook, k-means init, dead-code replacement
    vqvae_ema_decay: float = 0.99  # the EMA decay of VQ-VAE (van den Oord et al. 2017, appendix)
    vqvae_ema_kmeans_init: bool = True  # k-means on the first training batch
    vqvae_ema_dead_code_threshold: float = 2.0  # replace codes whose EMA cluster size drops below this; 0: never
    # fsq (vector-quantize-pytorch's FSQ): codebook_size must equal the product of the levels
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8])
    # sqvae (Gaussian SQ-VAE; defaults from the authors' code, see stage1_tokenizer/quantizers/sqvae.py)
    sqvae_variance_init: float = 20.0  # the learned part exp(s) of the posterior variance 1 + exp(s) starts here
    sqvae_temperature: float = 1.0  # Gumbel-softmax temperature at step 0, decays as exp(-decay * step)
    sqvae_temperature_decay: float = 1e-5
    sqvae_data_variance: float | None = None  # sigma_x^2 of the Gaussian decoder; null: the batch MSE (the authors')

    def validate(self) -> None:
        if self.codebook_size < 2:
            raise ConfigError(f"quantizer.codebook_size must be at least 2, got {self.codebook_size}")
        if self.beta is not None and self.beta < 0:
            raise ConfigError(f"quantizer.beta must be >= 0, got {self.beta}")
        if self.kl_weight < 0:
            raise ConfigError(f"quantizer.kl_weight must be >= 0, got {self.kl_weight}")
        _check_number("vqvae_ema_decay", self.vqvae_ema_decay, "a number in (0, 1), e.g. 0.99", lambda v: 0 < v < 1)
        _check_number("vqvae_ema_dead_code_threshold", self.vqvae_ema_dead_code_threshold,
                      ">= 0 (0 turns dead-code replacement off), e.g. 2", lambda v: v >= 0)
        _check_number("sqvae_variance_init", self.sqvae_variance_init, "> 0, e.g. 20", lambda v: v > 0)
        _check_number("sqvae_temperature", self.sqvae_temperature, "> 0, e.g. 1.0", lambda v: v > 0)
        _check_number("sqvae_temperature_decay", self.sqvae_temperature_decay, ">= 0, e.g. 1e-5", lambda v: v >= 0)
        if self.sqvae_data_variance is not None:
            _check_number("sqvae_data_variance", self.sqvae_data_variance, "> 0, e.g. 0.0025, or null", lambda v: v > 0)
        levels = self.fsq_levels
        if not isinstance(levels, (list, tuple)) or not levels or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 3 for v in levels
        ):
            raise ConfigError(
                f"quantizer.fsq_levels must be a non-empty list of integers >= 3, e.g. [8, 8, 8], got {levels!r}"
            )
        if self.name == "fsq" and self.codebook_size != math.prod(levels):
            raise ConfigError(
                f"quantizer.codebook_size must equal the product of quantizer.fsq_levels for fsq: {list(levels)} gives "
                f"{math.prod(levels)} codes, not {self.codebook_size}; set codebook_size={math.prod(levels)} or change "
                "fsq_levels (e.g. [8, 8, 8] = 512, [8, 5, 5, 5] = 1000)"
            )

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 1e-3 if self.name == "vqwae" else 0.25


def _check_number(key: str, value: float, expected: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"quantizer.{key} must be {expected}, got {value!r}")


def build_quantizer(
    cfg: QuantizerConfig, embedding_dim: int, num_positions: int, data_dim: int | None = None
) -> nn.Module:
    """The quantizer `cfg` names. `data_dim` (channels x height x width of an image) is needed by sqvae only."""
    # A QuantizerConfig built in code has not been through from_dict: check it before a quantizer exists.
    cfg.validate()
    if cfg.name == "sqvae":
        if data_dim is None:
            raise ValueError("the sqvae quantizer needs data_dim (pixels per image) to weight its ELBO terms")
        return SQVAEQuantizer(
            cfg.codebook_size,
            embedding_dim,
            data_dim,
            variance_init=cfg.sqvae_variance_init,
            temperature=cfg.sqvae_temperature,
            temperature_decay=cfg.sqvae_temperature_decay,
            data_variance=cfg.sqvae_data_variance,
        )
    if cfg.name == "vqvae-ema":
        return EMAVectorQuantizer(
            cfg.codebook_size,
            embedding_dim,
            commitment_weight=cfg.resolved_beta,
            decay=cfg.vqvae_ema_decay,
            kmeans_init=cfg.vqvae_ema_kmeans_init,
            dead_code_threshold=cfg.vqvae_ema_dead_code_threshold,
        )
    if cfg.name == "fsq":
        return FSQQuantizer(embedding_dim, cfg.fsq_levels)
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
    "EMAVectorQuantizer",
    "FSQQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "SQVAEQuantizer",
    "VQVAEQuantizer",
    "VQWAEQuantizer",
    "build_quantizer",
    "code_perplexity",
]
