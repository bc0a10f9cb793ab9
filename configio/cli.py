"""How every job ends: a problem the user can fix is one line (`error: ...`) and exit status 2, never a traceback.

Besides the project's own `UserError`s, the failures a user causes from outside the code end the same way: a path
that cannot be written (below a regular file, a name too long, no permission, a full disk, a file-size limit, a
read-only or vanished folder), memory that runs out, and argument errors (`JobArgumentParser`).

An interruption (SIGINT, as Ctrl-C sends, or SIGTERM, as a cluster's preemption or a shutdown sends) ends a job with
one line and exit status 128 + the signal (130, 143). By default it stops at once: every writer is atomic, so what
looks finished is complete and the rest is gone. A loop that can stop more usefully (the training loop: finish the
step, write a checkpoint) takes the signals in `deferred_interrupts` and stops at a point of its choosing; a second
signal still stops at once.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

from configio.errors import UserError, WriteFailed

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# One interruption often arrives twice within milliseconds: from whoever signals a whole process group or job (a
# cluster's preemption) and again from a parent passing it on (make and torchrun pass SIGTERM to their children).
# A repeat within this many seconds is the same interruption, not a second one (nor one that breaks into the
# clean-up of the first).
SAME_INTERRUPTION_S = 0.5
STOPPED_AT_ONCE = ("stopped at once: complete results and checkpoints are kept, unfinished ones are not; run the same "
                   "command again to resume")


def _print_line(text: str) -> None:
    print(" ".join(str(text).split()), file=sys.stderr)


def fail(message: str, status: int = 2) -> NoReturn:
    _print_line(f"error: {message}")
    sys.exit(status)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line error instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}; see --help")


class Interrupted(KeyboardInterrupt):
    """A job stopped by SIGINT or SIGTERM. `message` is its one line (None: another process reports it, e.g. a
    job's child process or another rank); the exit status is 128 + the signal, as a shell reports a signal."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(signum, message)
        self.signum, self.message = signum, message

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _stop_at_once(signum: int, frame) -> None:
    raise Interrupted(signum, f"interrupted ({signal.Signals(signum).name}); {STOPPED_AT_ONCE}")


@contextmanager
def _signal_handlers(handler, signals: tuple[int, ...] = INTERRUPTING_SIGNALS) -> Iterator[None]:
    """`handler` for `signals` while the block runs, called once per interruption (a repeat within
    SAME_INTERRUPTION_S is ignored). A signal the process ignores (a job started with `nohup` or in the background
    of a script) stays ignored; outside the main thread, where Python runs no handler, nothing changes."""
    last = -SAME_INTERRUPTION_S - 1.0

    def once_per_interruption(signum: int, frame) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > SAME_INTERRUPTION_S:
            last = now
            handler(signum, frame)

    previous = {}
    try:
        for signum in signals:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, once_per_interruption if callable(handler) else handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass
class InterruptRequest:
    """The signal a deferred interruption asked for (None until one arrives)."""

    signum: int | None = None


@contextmanager
def deferred_interrupts() -> Iterator[InterruptRequest]:
    """SIGINT and SIGTERM are recorded in the yielded request instead of stopping the block; the block checks it at
    points where stopping keeps its progress and raises `Interrupted` itself. A second signal raises at once. A
    signal the block leaves unhandled is delivered again when it ends, so it is never lost."""
    request = InterruptRequest()

    def record(signum: int, frame) -> None:
        if request.signum is not None:
            _stop_at_once(signum, frame)
        request.signum = signum

    with _signal_handlers(record):
        yield request
    if request.signum is not None:
        signal.raise_signal(request.signum)


def ignore_interruptions(*_: object) -> None:
    """For a job's helper processes (data loader workers; the argument a `worker_init_fn` gets is not needed): a
    signal sent to the whole job must not kill them under the main process, which decides when the job stops and
    ends them itself."""
    for signum in INTERRUPTING_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def _job_signals() -> Iterator[None]:
    """For the length of a job: SIGINT and SIGTERM raise `Interrupted`, and SIGXFSZ is ignored so that a write past
    the file-size limit (ulimit -f) fails with EFBIG, reported as one line, instead of killing the process."""
    with _signal_handlers(_stop_at_once), _signal_handlers(signal.SIG_IGN, (signal.SIGXFSZ,)):
        yield


# What to do about the OS's most common reasons a path cannot be used.
_REMEDIES = {
    errno.ENOSPC: "free space on that disk or choose another output",
    errno.EDQUOT: "free space within your disk quota or choose another output",
    errno.EFBIG: "the file-size limit (ulimit -f) is below what it needs: raise the limit or choose another output",
    errno.EROFS: "choose an output on a writable file system",
    errno.EACCES: "fix the permissions or choose another output",
    errno.EPERM: "fix the permissions or choose another output",
}


@contextmanager
def _thread_write_failures_left_to_the_job() -> Iterator[None]:
    """A background thread's failed write is not printed as a traceback: the job's own thread meets it next and ends
    with its one line (TensorBoard's event writer raises its thread's error at the job's next call)."""
    previous = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in _REMEDIES):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _os_error(err: OSError) -> str:
    where = f" '{err.filename}'" if err.filename else ""
    reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, WriteFailed):
        vanished = "a folder on its way is missing (removed while the job ran?): run the same command again"
        remedy = vanished if err.errno == errno.ENOENT else _REMEDIES.get(err.errno, "choose another output")
        return f"cannot write{where}: {reason}; {remedy}"
    return f"cannot use{where}: {reason}; {_REMEDIES.get(err.errno, 'choose another path (or free space / fix permissions)')}"


def run_cli(main: Callable[[], None]) -> None:
    try:
        with _job_signals(), _thread_write_failures_left_to_the_job():
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
    except Interrupted as err:
        if err.message:
            _print_line(err.message)
        sys.exit(err.exit_status)
    except KeyboardInterrupt:  # SIGINT while the job's handlers were not in place (ignored SIGINT restored, ...)
        _print_line(f"interrupted (SIGINT); {STOPPED_AT_ONCE}")
        sys.exit(128 + signal.SIGINT)
    finally:
        # A closed stdout (a pipe whose reader went away) must not turn the exit into a traceback.
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
