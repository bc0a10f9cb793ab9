"""Memory checks before a job allocates: a size that cannot fit stops with one line ("does not fit in memory: needs
about N GiB"), not with an allocator error halfway through a run.

The estimates count what dominates (weights with their gradients and AdamW's two moments, the activations a training
step keeps for its backward pass, the transport problems, the decoded data) and are meant to be within a small factor.
A job refuses only when the estimate exceeds all the memory available, so a setting that trains today is never
refused.
"""
from __future__ import annotations

import os

import torch

from configio.errors import ConfigError
from stage1_tokenizer.model import TokenizerConfig
from stage2_prior.model import PriorConfig

GIB = 2**30
BYTES = 4  # float32
PER_PARAMETER = 4 * BYTES  # the weight, its gradient and AdamW's two moments
# Images each data set decodes into memory up front (train + test).
IN_MEMORY_IMAGES = {"fashion_mnist": 70_000, "mnist": 70_000, "cifar10": 60_000, "svhn": 99_289}


def available_bytes(device: str = "cpu") -> int:
    """Memory a job may still take: free accelerator memory, or the host's MemAvailable."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _refuse_beyond(need: float, have: int, what: str, lower: str) -> None:
    if need > have:
        raise ConfigError(f"{what} does not fit in memory: it needs about {need / GIB:,.1f} GiB but {have / GIB:,.1f} GiB "
                          f"is available; lower {lower}")


def tokenizer_bytes(cfg: TokenizerConfig, batch_size: int) -> float:
    """Weights + optimizer, the activations of one training batch, and its transport problems."""
    net, q = cfg.network, cfg.quantizer
    side, latent = cfg.image_size, cfg.latent_size
    widths = net.stage_channels()
    h, r, d, k, m = net.hidden_channels, net.residual_channels, net.embedding_dim, q.codebook_size, cfg.num_positions
    convs = sum(16 * a * b for a, b in zip([cfg.channels, *widths], widths)) + 9 * (widths[-1] if widths else d) * h
    params = 2 * (convs + net.num_residual_layers * 10 * h * r + h * d) + k * d + m * k
    per_image = sum(c * (side // 2 ** (i + 1)) ** 2 for i, c in enumerate(widths)) * 3 * 2
    per_image += latent**2 * (h * (4 + 4 * net.num_residual_layers) + 4 * d) * 2 + 4 * cfg.channels * side**2
    exact_transport = q.name == "vqwae" and q.solver != "semidiscrete"  # the exact solvers' float64 work arrays
    transport = 3 * m * batch_size * k * 8 if exact_transport else 2 * m * batch_size * k
    return params * PER_PARAMETER + 2 * BYTES * per_image * batch_size + BYTES * transport


def check_fits_tokenizer(cfg: TokenizerConfig, batch_size: int, eval_batch_size: int, data_name: str,
                         data_limit: int | None, device: str = "auto") -> None:
    images = IN_MEMORY_IMAGES.get(data_name, 0)
    if data_limit is not None:
        images = min(images, 3 * data_limit)
    _refuse_beyond(images * cfg.channels * cfg.image_size**2, available_bytes("cpu"), f"the {data_name} data at "
                   f"{cfg.image_size} px", "data.image_size")
    need = max(tokenizer_bytes(cfg, batch_size), tokenizer_bytes(cfg, eval_batch_size) / 2)
    _refuse_beyond(need, available_bytes(device), "the tokenizer", "data.image_size, network.hidden_channels, "
                   "network.residual_channels, quantizer.codebook_size or train.batch_size")


def prior_bytes(cfg: PriorConfig, batch_size: int) -> float:
    """Weights + optimizer (GPT-2's 12 h^2 per layer, embeddings and an untied head) and one batch's activations."""
    h, layers, heads = cfg.hidden_size, cfg.num_layers, cfg.num_heads
    length, vocab = cfg.sequence_length + 1, cfg.vocab_size
    params = layers * (12 * h * h + 13 * h) + 2 * vocab * h + length * h
    activations = batch_size * length * (layers * (18 * h + 2 * heads * length) + 3 * vocab)
    return params * PER_PARAMETER + BYTES * activations


def check_fits_prior(cfg: PriorConfig, batch_size: int, device: str = "auto") -> None:
    _refuse_beyond(prior_bytes(cfg, batch_size), available_bytes(device), "the prior",
                   "prior.hidden_size, prior.num_layers or train.batch_size")


def check_fits_sampling(prior: PriorConfig, num_samples: int, batch_size: int, image_values: int,
                        device: str = "auto") -> None:
    """Every decoded image stays in memory until the FID; one batch holds its key/value cache (doubled by guidance)."""
    _refuse_beyond(num_samples * image_values * BYTES * 2, available_bytes("cpu"), f"{num_samples:,} samples",
                   "num_samples")
    length = prior.sequence_length + 1
    cache = 2 * 2 * batch_size * length * prior.num_layers * prior.hidden_size * BYTES
    logits = 2 * batch_size * length * prior.vocab_size * BYTES
    _refuse_beyond(cache + logits, available_bytes(device), f"a sampling batch of {batch_size:,}", "batch_size")


__all__ = ["check_fits_sampling", "available_bytes", "check_fits_prior", "check_fits_tokenizer", "prior_bytes", "tokenizer_bytes"]
