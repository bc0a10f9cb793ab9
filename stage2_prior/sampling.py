"""Drawing code sequences from a `CodePrior`: a hand-written autoregressive loop with an optional KV cache.

Per step: code logits (special tokens already dropped by `CodePrior.code_logits`, in float32) ->
classifier-free guidance (uncond + s * (cond - uncond), conditional and null-class rows in one doubled batch) ->
temperature -> top-k -> top-p -> softmax -> torch.multinomial(probs, 1, generator=generator).

With `use_cache=True` the first step runs the condition token and every later step feeds only the newly drawn token
together with the transformer's KV cache; with `use_cache=False` every step re-runs the whole prefix. Both compute
the same logits up to float rounding, so for the same generator seed they draw the same tokens.

The random stream is consumed per step for the whole (sub-)batch, so for a fixed seed the result depends on
`batch_size` (but not on `use_cache`).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch

from .model import CodePrior


def _check_settings(num_samples, temperature, top_k, top_p, guidance_scale, batch_size) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, Real) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (1 turns it off), got {top_p!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1 = no guidance), got {guidance_scale!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  scale: float = 1.0) -> torch.Tensor:
    """Apply temperature, then top-k, then nucleus (top-p) filtering to (B, V) logits; removed entries become -inf.

    Computed in float64 relative to each row's maximum, so that any temperature > 0 and any finite `scale` (the
    logits are `logits * scale`: the guidance scale, kept apart so it never overflows) give probabilities, never
    NaN: the best entry stays at 0 and the others go to -inf at worst."""
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) * scale / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the best one always stays).
        remove_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _labels_tensor(prior: CodePrior, labels: Any, num_samples: int) -> torch.Tensor | None:
    if labels is None:
        return None
    if isinstance(labels, bool):
        raise ValueError(f"labels must be None, an int or a ({num_samples},) integer tensor, got {labels!r}")
    if isinstance(labels, Integral):
        return torch.full((num_samples,), int(labels), dtype=torch.long)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != num_samples:
        raise ValueError(
            f"labels must be None, an int or a tensor of shape ({num_samples},) (one per sample), got shape {tuple(labels.shape)}"
        )
    return labels.cpu()


@torch.no_grad()
def _sample_batch(prior, cond, null, steps, temperature, top_k, top_p, guidance_scale, generator, use_cache,
                  prefix=None) -> torch.Tensor:
    n = cond.shape[0]
    guided = null is not None
    first = torch.cat([cond, null]) if guided else cond
    tokens = first[:, None]  # (n or 2n, 1+t): the full prefix, kept for the uncached path
    codes = torch.empty(n, steps, dtype=torch.long, device=cond.device)
    kept = 0 if prefix is None else prefix.shape[1]
    if kept:
        codes[:, :kept] = prefix
        tokens = torch.cat([tokens, torch.cat([prefix, prefix]) if guided else prefix], dim=1)
    cache = None
    for t in range(kept, steps):
        if use_cache:
            step_input = tokens if cache is None else tokens[:, -1:]
            logits, cache = prior.code_logits(step_input, cache=cache, use_cache=True, last_only=True)
        else:
            logits, _ = prior.code_logits(tokens, use_cache=False, last_only=True)
        logits = logits[:, -1]
        scale = 1.0
        if guided:
            cond_logits, uncond_logits = logits[:n].double(), logits[n:].double()
            if guidance_scale > 1.0:  # uncond + s (cond - uncond), divided by s so that no scale overflows
                logits, scale = uncond_logits / guidance_scale + (cond_logits - uncond_logits), guidance_scale
            else:
                logits = uncond_logits + guidance_scale * (cond_logits - uncond_logits)
        logits = filter_logits(logits, temperature, top_k, top_p, scale)
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (n, 1)
        codes[:, t] = nxt[:, 0]
        tokens = torch.cat([tokens, torch.cat([nxt, nxt]) if guided else nxt], dim=1)
    return codes


def sample_codes(
    prior: CodePrior,
    num_samples: int,
    labels: torch.Tensor | int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    batch_size: int | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Draw `num_samples` code sequences (N, L) in raster order, on the prior's device.

    labels: None for an unconditional prior; an int (every sample that class) or a (N,) tensor for a
    class-conditional one. guidance_scale != 1 runs classifier-free guidance against the null class (conditional
    priors only); guidance_scale == 1 is plain conditional sampling with no unconditional pass.
    The generator must live on the prior's device (torch.Generator(device=...)), as torch.multinomial requires.
    prefix: (N, p) codes every sequence starts with (completion of the rest of an image); p <= L.
    """
    _check_settings(num_samples, temperature, top_k, top_p, guidance_scale, batch_size)
    device = prior.device
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the prior is on {device}; "
            f"create it with torch.Generator(device='{device.type}')"
        )
    label_tensor = _labels_tensor(prior, labels, num_samples)
    cond_all = prior.condition_tokens(label_tensor, num_samples, device)
    guided = guidance_scale != 1.0
    if guided and not prior.config.class_conditional:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a class-conditional prior; this one is unconditional (use 1.0)"
        )
    if prefix is not None:
        prefix = torch.as_tensor(prefix).long().to(device)
        if prefix.dim() != 2 or prefix.shape[0] != num_samples or not 0 <= prefix.shape[1] <= prior.sequence_length:
            raise ValueError(f"prefix must be a ({num_samples}, p) tensor of codes with p <= {prior.sequence_length}, "
                             f"got shape {tuple(prefix.shape)}")
        if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= prior.codebook_size):
            raise ValueError(f"prefix holds codes outside [0, {prior.codebook_size})")
    chunk = batch_size or num_samples
    was_training = prior.training
    prior.eval()
    try:
        parts = []
        for start in range(0, num_samples, chunk):
            cond = cond_all[start : start + chunk]
            null = prior.null_tokens(cond.shape[0], device) if guided else None
            parts.append(
                _sample_batch(
                    prior, cond, null, prior.sequence_length, float(temperature), int(top_k), float(top_p),
                    float(guidance_scale), generator, use_cache,
                    prefix[start : start + chunk] if prefix is not None and prefix.shape[1] else None,
                )
            )
    finally:
        prior.train(was_training)
    return torch.cat(parts, dim=0)
