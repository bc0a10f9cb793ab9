"""The quantizer registry: each quantizer module registers one `QuantizerSpec` (its settings, its construction, its
description, its compare entries), and the config, the CLI, `compare` and the reports learn about quantizers from
here only. Adding a quantizer is one module in this package plus its test: the package imports every module in it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from configio.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One `quantizer.<name>` setting a quantizer adds, with its check (`ok(value)` true when valid)."""

    name: str
    type: Any
    default: Any = None
    default_factory: Callable[[], Any] | None = None
    expected: str = ""  # what a valid value looks like, for the error message
    ok: Callable[[Any], bool] | None = None

    def check(self, value: Any) -> None:
        if value is None or self.ok is None:
            return
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and self.ok(value)):
            raise ConfigError(f"quantizer.{self.name} must be {self.expected}, got {value!r}")


@dataclass(frozen=True)
class QuantizerSpec:
    name: str  # the value of quantizer.name
    description: str  # one line for reports and the comparison table
    # build(cfg, embedding_dim, num_positions, data_dim) -> the quantizer module (cfg: the whole QuantizerConfig)
    build: Callable[[Any, int, int, int | None], nn.Module]
    settings: tuple[Setting, ...] = ()
    shared: tuple[str, ...] = ("codebook_size",)  # shared settings it reads, shown in summaries
    default_beta: float | None = None  # what quantizer.beta resolves to when unset (None: beta unused)
    check: Callable[[Any], None] | None = None  # checks across settings, when this quantizer is chosen
    # compare's models: name -> (description, overrides besides quantizer.name); default: one model, this name
    variants: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    order: int = 50  # position in compare's default list and tables (baselines first, VQ-WAE last)

    def models(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        return self.variants or {self.name: (self.description, ())}

    def summary(self, cfg: Any) -> str:
        """The settings that matter for this quantizer, with beta resolved to the value training used."""
        parts = [f"{key} {getattr(cfg, key)}" for key in self.shared if key != "beta"]
        if self.default_beta is not None:
            parts.insert(0, f"beta {cfg.resolved_beta:g}")
        parts += [f"{s.name} {getattr(cfg, s.name)}" for s in self.settings if getattr(cfg, s.name) is not None]
        return ", ".join(parts)


SPECS: dict[str, QuantizerSpec] = {}


def register(spec: QuantizerSpec) -> QuantizerSpec:
    if spec.name in SPECS:
        raise RuntimeError(f"two quantizers are registered as {spec.name!r}")
    taken = {s.name for other in SPECS.values() for s in other.settings}
    clash = [s.name for s in spec.settings if s.name in taken]
    if clash:
        raise RuntimeError(f"quantizer {spec.name!r} adds setting {clash[0]!r}, which another quantizer already has")
    SPECS[spec.name] = spec
    return spec


def ordered_specs() -> list[QuantizerSpec]:
    return sorted(SPECS.values(), key=lambda s: (s.order, s.name))


def compare_models() -> dict[str, tuple[str, list[str]]]:
    """Every model compare knows: name -> (description, overrides that select it)."""
    out = {}
    for spec in ordered_specs():
        for model, (description, extra) in spec.models().items():
            out[model] = (description, [f"quantizer.name={spec.name}", *extra])
    return out


__all__ = ["QuantizerSpec", "SPECS", "Setting", "compare_models", "ordered_specs", "register"]
