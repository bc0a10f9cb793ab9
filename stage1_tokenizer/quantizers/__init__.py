"""Quantizers behind one call signature: `quantizer(z) -> QuantizerOutput(quantized, indices, losses, stats)`.

Every module of this package but `base` and `registry` is a quantizer that registers itself (`registry.register`):
importing the package imports them all, and `QuantizerConfig` is assembled from the shared settings below plus the
settings each quantizer declares, so `quantizer.<key>` keeps one name from the command line to the module that reads
it. Settings are checked once, when the config is built.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Literal

from torch import nn

from configio.errors import ConfigError

from .base import Quantizer, QuantizerInterface, QuantizerOutput, code_perplexity
from .registry import SPECS, QuantizerSpec, Setting, compare_models, ordered_specs, register

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module}")

from .fsq import FSQQuantizer  # noqa: E402
from .sqvae import SQVAEQuantizer  # noqa: E402
from .vqvae import VQVAEQuantizer  # noqa: E402
from .vqvae_ema import EMAVectorQuantizer  # noqa: E402
from .vqwae import VQWAEQuantizer  # noqa: E402

# Settings every quantizer has; `rotation_trick` only where a quantizer lists it in its spec's `shared`.
_SHARED: list[tuple[str, Any, Any]] = [
    ("name", Literal[tuple(spec.name for spec in ordered_specs())], "vqwae"),
    ("codebook_size", int, 512),
    ("beta", float | None, None),  # the quantizer's loss weight; null: its own default (spec.default_beta)
    ("rotation_trick", bool, False),  # vqvae, vqvae-ema, simvq: rotation-trick gradients (Fifty et al., 2024)
]


def _field(setting: Setting):
    if setting.default_factory is not None:
        return dataclasses.field(default_factory=setting.default_factory)
    return dataclasses.field(default=setting.default)


# The fields, from the shared settings above and each registered quantizer's own (their types, defaults and checks
# stay in the quantizer's module, one place per setting).
_QuantizerFields = dataclasses.make_dataclass(
    "_QuantizerFields",
    [(name, kind, dataclasses.field(default=default)) for name, kind, default in _SHARED]
    + [(s.name, s.type, _field(s)) for spec in ordered_specs() for s in spec.settings],
)


@dataclasses.dataclass
class QuantizerConfig(_QuantizerFields):
    """The quantizer's settings (`quantizer.<key>`): the shared ones (`_SHARED`) and every registered quantizer's own
    (`QuantizerSpec.settings` in its module). Checked once, when a config is built (`validate`)."""

    def validate(self) -> None:
        if self.codebook_size < 2:
            raise ConfigError(f"quantizer.codebook_size must be at least 2, got {self.codebook_size}")
        if self.beta is not None and self.beta < 0:
            raise ConfigError(f"quantizer.beta must be >= 0, got {self.beta}")
        spec = self.spec
        if self.rotation_trick and "rotation_trick" not in spec.shared:
            users = ", ".join(s.name for s in ordered_specs() if "rotation_trick" in s.shared)
            raise ConfigError(f"quantizer.rotation_trick applies to {users}, not to {self.name}; remove it")
        for other in SPECS.values():
            for setting in other.settings:
                setting.check(getattr(self, setting.name))
        if spec.check is not None:
            spec.check(self)
        self._validated_values = dataclasses.astuple(self)  # not a field: see build_quantizer

    @property
    def resolved_beta(self) -> float:
        """quantizer.beta, or the chosen quantizer's own default when it is unset."""
        if self.beta is not None:
            return self.beta
        default = self.spec.default_beta
        return 0.0 if default is None else default

    @property
    def spec(self) -> QuantizerSpec:
        return SPECS[self.name]


def build_quantizer(cfg, embedding_dim: int, num_positions: int, data_dim: int | None = None) -> nn.Module:
    """The quantizer `cfg` names. `data_dim` (channels x height x width of an image) is needed by sqvae only."""
    # A QuantizerConfig built or changed in code has not been through from_dict's check: check it before a quantizer
    # exists. One that has, with the same values, is not checked again (a job builds its quantizer more than once).
    if getattr(cfg, "_validated_values", None) != dataclasses.astuple(cfg):
        cfg.validate()
    if cfg.name == "sqvae" and data_dim is None:
        raise ValueError("the sqvae quantizer needs data_dim (pixels per image) to weight its ELBO terms")
    return SPECS[cfg.name].build(cfg, embedding_dim, num_positions, data_dim)


__all__ = [
    "EMAVectorQuantizer",
    "FSQQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerInterface",
    "QuantizerOutput",
    "QuantizerSpec",
    "SPECS",
    "SQVAEQuantizer",
    "Setting",
    "VQVAEQuantizer",
    "VQWAEQuantizer",
    "build_quantizer",
    "code_perplexity",
    "compare_models",
    "ordered_specs",
    "register",
]
