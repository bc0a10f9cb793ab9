"""How every job ends: a problem the user can fix is one line (`error: ...`) and exit status 2, never a traceback.

Besides the project's own `UserError`s, the failures a user causes from outside the code end the same way: a path
that cannot be written (below a regular file, a name too long, no permission, a full disk), memory that runs out,
and argument errors (`JobArgumentParser`).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from configio.errors import UserError


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line error instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}; see --help")


def _os_error(err: OSError) -> str:
    where = f" '{err.filename}'" if err.filename else ""
    reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
    return f"cannot use{where}: {reason}; choose another path (or free space / fix permissions)"


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except UserError as err:
        fail(str(err))
    except MemoryError:
        fail("out of memory; lower the batch size or the model and data sizes")
    except OSError as err:
        fail(_os_error(err))
    except RuntimeError as err:
        # The allocators' own errors (torch.OutOfMemoryError, the CPU allocator's RuntimeError) when an estimate missed.
        if type(err).__name__ == "OutOfMemoryError" or "allocate memory" in str(err):
            fail("out of memory; lower the batch size or the model and data sizes")
        raise
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        # A closed stdout (a pipe whose reader went away) must not turn the exit into a traceback.
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
