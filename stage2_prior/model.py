"""The stage-2 prior: an autoregressive transformer over the tokenizer's code grids, read in raster order.

Token layout (defined only here; everything else asks `PriorConfig` / `CodePrior`):

    0 .. K-1            the K code tokens (K = codebook_size)
    K                   `start_token`: the condition token of an unconditional prior
    K + 1               `null_token`: the "no class" token used for classifier-free guidance
    K + 2 .. K + 1 + C  `class_token(c)` for the C classes of a class-conditional prior

Each sequence fed to the transformer is [condition token] + the L codes of one image; the model predicts the L
codes. Training loss and NLL are taken over the code logits only (the special tokens' logits are dropped before the
softmax), which is exactly the distribution `sampling.sample_codes` draws from, so the reported NLL/bits per code
is that of the sampler.

Saved the Hugging Face way (`configio.hub.HubModel`): config.json holds the `PriorConfig` (the one config; the
transformer's own config is rebuilt from it), model.safetensors the weights; loading reads JSON and safetensors only,
never pickle. `push_to_hub` works when a hub is reachable.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from configio.config import from_dict, to_dict
from configio.errors import ConfigError
from configio.hub import WEIGHTS_NAME, HubModel

CONFIG_NAME = "config.json"
__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CodePrior", "PriorConfig", "build_transformer"]
# Scaled-dot-product attention. Measured on 2 CPU cores (4 layers, hidden 256, 64 x 64 codes): sdpa and eager are
# within noise of each other for cached sampling and for a training step (sdpa ~10-20% faster uncached for llama);
# sdpa is the transformers default and uses the fused/flash kernels on CUDA. Cached and uncached sampling draw
# identical tokens with either.
ATTN_IMPLEMENTATION = "sdpa"


@dataclass
class PriorConfig:
    architecture: Literal["gpt2", "llama"] = "gpt2"
    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 256
    dropout: float = 0.1
    class_conditional: bool = True
    label_dropout: float = 0.1  # probability a training label is replaced by the null class (classifier-free guidance)
    # filled from the tokenizer/data by the caller, stored with the model:
    codebook_size: int = 512
    sequence_length: int = 64  # h*w codes per image
    num_classes: int = 0  # 0 or ignored when unconditional

    def validate(self) -> None:
        if self.architecture not in ("gpt2", "llama"):
            raise ConfigError(f"prior.architecture must be 'gpt2' or 'llama', got {self.architecture!r}")
        for key in ("num_layers", "num_heads", "hidden_size", "codebook_size", "sequence_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"prior.{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"prior.hidden_size must be divisible by prior.num_heads, got hidden_size={self.hidden_size} "
                f"and num_heads={self.num_heads}"
            )
        if self.architecture == "llama" and (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"prior.hidden_size / prior.num_heads must be even for architecture 'llama' (rotary embeddings), "
                f"got head size {self.hidden_size // self.num_heads}"
            )
        for key in ("dropout", "label_dropout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"prior.{key} must lie in [0, 1), got {value!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"prior.num_classes must be a non-negative integer, got {self.num_classes!r}")

    def check_complete(self) -> None:
        """The settings a model can be built from: a class-conditional prior needs its classes."""
        self.validate()
        if self.class_conditional and self.num_classes < 1:
            raise ConfigError(
                "prior.num_classes must be >= 1 for a class-conditional prior (set it from the data set), "
                f"got {self.num_classes}; or set prior.class_conditional=false"
            )

    # --- token layout: the one place that defines it ---

    @property
    def effective_num_classes(self) -> int:
        return self.num_classes if self.class_conditional else 0

    @property
    def start_token(self) -> int:
        return self.codebook_size

    @property
    def null_token(self) -> int:
        return self.codebook_size + 1

    def class_token(self, label: int) -> int:
        if not self.class_conditional:
            raise ValueError("this prior is unconditional; it has no class tokens")
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(
                f"class label {int(label)} is not known to this prior, which has {self.num_classes} classes"
            )
        return self.codebook_size + 2 + int(label)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 2 + self.effective_num_classes


def build_transformer(cfg: PriorConfig) -> nn.Module:
    """A freshly initialised `transformers` causal LM for `cfg` (built from a config; nothing is downloaded)."""
    cfg.check_complete()
    common = dict(
        vocab_size=cfg.vocab_size,
        bos_token_id=cfg.start_token,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    if cfg.architecture == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            n_positions=cfg.sequence_length + 1,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
        return GPT2LMHeadModel(hf_config)
    from transformers import LlamaConfig, LlamaForCausalLM

    # SwiGLU width ~ 8/3 * hidden, rounded up to a multiple of 8 (so the MLP has about GPT-2's 4x parameter count).
    intermediate = int(math.ceil(8 * cfg.hidden_size / 3 / 8) * 8)
    hf_config = LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.sequence_length + 1,
        attention_dropout=cfg.dropout,
        **common,
    )
    return LlamaForCausalLM(hf_config)


class CodePrior(nn.Module, HubModel, library_name="vq-wae", tags=["vq-wae", "image-generation", "code-prior"]):
    """Wraps a `transformers` GPT-2 or Llama causal LM over [condition token] + L codes."""

    what = "prior"
    make_hint = "train one with 'make prior' or check the path"

    def __init__(self, config: PriorConfig):
        super().__init__()
        cfg = from_dict(PriorConfig, to_dict(config) if dataclasses.is_dataclass(config) else dict(config))
        cfg.check_complete()
        self.config = cfg
        self.model = build_transformer(cfg)

    # --- conveniences mirroring the token layout ---

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def sequence_length(self) -> int:
        return self.config.sequence_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- input checks ---

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a tensor of shape (batch, {self.sequence_length}), got {type(codes).__name__}")
        if codes.dim() == 3:  # (B, h, w) grids straight from the tokenizer: raster order
            codes = codes.flatten(1)
        if codes.dim() != 2 or codes.shape[1] != self.sequence_length:
            raise ValueError(
                f"this prior models sequences of {self.sequence_length} codes; expected codes of shape "
                f"(batch, {self.sequence_length}), got {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel():
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.codebook_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"code {bad} is outside this prior's vocabulary [0, {self.codebook_size}); "
                    f"was the prior built for this tokenizer's codebook_size?"
                )
        return codes.long()

    def condition_tokens(self, labels: torch.Tensor | int | None, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """(batch,) condition tokens: start token (unconditional) or one class token per label."""
        device = device if device is not None else self.device
        cfg = self.config
        if not cfg.class_conditional:
            if labels is not None:
                raise ValueError("this prior is unconditional (class_conditional=false); do not pass class labels")
            return torch.full((batch,), cfg.start_token, dtype=torch.long, device=device)
        if labels is None:
            raise ValueError(
                f"this prior is class-conditional ({cfg.num_classes} classes); pass one class label per sequence"
            )
        if isinstance(labels, bool):
            raise ValueError(f"class labels must be integers, got {labels!r}")
        if isinstance(labels, int):
            labels = torch.full((batch,), labels, dtype=torch.long)
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() == 0:
            labels = labels.expand(batch)
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"expected {batch} class labels (shape ({batch},)), got shape {tuple(labels.shape)}")
        if labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= cfg.num_classes:
                bad = low if low < 0 else high
                raise ValueError(f"class label {bad} is not known to this prior, which has {cfg.num_classes} classes")
        return labels.to(device=device, dtype=torch.long) + (cfg.codebook_size + 2)

    def null_tokens(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        if not self.config.class_conditional:
            raise ValueError("classifier-free guidance needs a class-conditional prior; this one is unconditional")
        return torch.full((batch,), self.config.null_token, dtype=torch.long, device=device or self.device)

    # --- the transformer call, shared with sampling ---

    def code_logits(
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        use_cache: bool = False,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Float32 logits over the K codes only (special tokens dropped) and the updated KV cache (or None)."""
        out = self.model(input_ids=input_ids, cache=cache, use_cache=use_cache, logits_to_keep=1 if last_only else 0)
        return out.logits[..., : self.codebook_size].float(), (out.cache if use_cache else None)

    def _inputs(self, codes: torch.Tensor, labels, generator: torch.Generator | None, drop_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.check_codes(codes)
        device = self.device
        codes = codes.to(device)
        cond = self.condition_tokens(labels, codes.shape[0], device)
        if drop_labels and self.config.class_conditional and self.config.label_dropout > 0:
            gen_device = generator.device if generator is not None else device
            drop = torch.rand(codes.shape[0], generator=generator, device=gen_device).to(device) < self.config.label_dropout
            cond = torch.where(drop, torch.full_like(cond, self.config.null_token), cond)
        # Predict code t from [cond, c_0 .. c_{t-1}]: the last code is never an input.
        input_ids = torch.cat([cond[:, None], codes[:, :-1]], dim=1)
        return input_ids, codes

    def token_nll(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) negative log-likelihood of each code in nats. Label dropout only in training mode."""
        input_ids, targets = self._inputs(codes, labels, generator, drop_labels=self.training)
        logits, _ = self.code_logits(input_ids)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean cross-entropy over the code positions, in nats (the training loss)."""
        return self.token_nll(codes, labels, generator).mean()

    @torch.no_grad()
    def nll_sum(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """(B,) summed NLL in nats of each sequence; no label dropout whatever the mode.

        Bits per code over a data set = sum of nll_sum / (number of sequences * L * ln 2); see `bits_per_code`.
        """
        was_training = self.training
        self.eval()
        try:
            return self.token_nll(codes, labels).sum(dim=1)
        finally:
            self.train(was_training)

    def bits_per_code(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None) -> float:
        codes = self.check_codes(codes)
        return float(self.nll_sum(codes, labels).sum()) / (codes.numel() * math.log(2))

    @torch.no_grad()
    def logits_for(self, codes: torch.Tensor, labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """(B, L, K) eval-mode code logits for the given sequences (for inspection and tests)."""
        was_training = self.training
        self.eval()
        try:
            input_ids, _ = self._inputs(codes, labels, None, drop_labels=False)
            return self.code_logits(input_ids)[0]
        finally:
            self.train(was_training)
