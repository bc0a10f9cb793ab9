"""How every job ends: a problem the user can fix is one line (`error: ...`) and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable

from configio.errors import ConfigError, UserError


def pick_device(name: str | None):
    """The torch device a job runs on: `name` when given (checked), else an accelerator when present, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device={name!r} is not a device torch knows ({' '.join(str(err).split())}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available; use device=cpu")
    if device.type not in ("cpu", "cuda") and not (hasattr(torch, "accelerator") and torch.accelerator.is_available()):
        raise ConfigError(f"device={name} is not available on this machine; use device=cpu")
    return device


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; resume with train.resume=latest", file=sys.stderr)
        sys.exit(130)
