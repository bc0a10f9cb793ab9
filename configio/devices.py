"""Which torch device to run on, from what a user typed."""
from __future__ import annotations

from typing import Any

from .errors import ConfigError


def pick_device(name: Any = None):
    """`name` checked (a string or torch.device), or by default an accelerator when present, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"device={name!r} is not a device torch knows ({' '.join(str(err).split())}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available; use device=cpu")
    if device.type not in ("cpu", "cuda") and not (hasattr(torch, "accelerator") and torch.accelerator.is_available()):
        raise ConfigError(f"device={name} is not available on this machine; use device=cpu")
    return device
