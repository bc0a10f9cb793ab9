"""SIGINT and SIGTERM end a job with one line and exit status 130 / 143; a loop may defer the first to stop where it
keeps its progress, and a second one stops at once."""
import os
import signal
import time

import pytest

from configio.cli import SAME_INTERRUPTION_S, STOPPED_AT_ONCE, Interrupted, deferred_interrupts, run_cli


@pytest.fixture
def restored_handlers():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ)}
    yield handlers
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_job_stops_at_once_with_one_line(capsys, restored_handlers, signum, status):
    reached = []

    def main():
        os.kill(os.getpid(), signum)
        reached.append("after the signal")

    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == status and not reached
    assert capsys.readouterr().err == f"interrupted ({signal.Signals(signum).name}); {STOPPED_AT_ONCE}\n"
    assert {s: signal.getsignal(s) for s in restored_handlers} == restored_handlers


def test_an_interruption_reported_elsewhere_ends_without_a_line(capsys):
    def main():
        raise Interrupted(signal.SIGTERM)  # e.g. a job's child process printed where it stopped

    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == 143 and capsys.readouterr().err == ""


def test_a_deferred_signal_is_recorded_and_a_second_one_stops_at_once(restored_handlers):
    with pytest.raises(Interrupted) as second:
        with deferred_interrupts() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGTERM
            time.sleep(SAME_INTERRUPTION_S * 1.2)
            os.kill(os.getpid(), signal.SIGINT)
    assert second.value.signum == signal.SIGINT and second.value.exit_status == 130
    assert {s: signal.getsignal(s) for s in restored_handlers} == restored_handlers


def test_a_signal_repeated_at_once_is_one_interruption(restored_handlers):
    """What a process gets when SIGTERM goes to its whole job and its parent (make, torchrun) passes it on too."""
    with pytest.raises(Interrupted) as stopped:
        with deferred_interrupts() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGTERM
            raise Interrupted(request.signum, "stopped where the block chose")
    assert stopped.value.message == "stopped where the block chose"


def test_a_deferred_signal_the_block_leaves_unhandled_is_delivered_when_it_ends(restored_handlers):
    class Delivered(Exception):
        pass

    def outer(signum, frame):
        raise Delivered(signum)

    signal.signal(signal.SIGTERM, outer)
    with pytest.raises(Delivered):
        with deferred_interrupts() as request:
            os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the recorded signal was lost")
    assert request.signum == signal.SIGTERM


def test_an_ignored_signal_stays_ignored(restored_handlers):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as `nohup` or a background job of a script leaves it
    with deferred_interrupts() as request:
        os.kill(os.getpid(), signal.SIGTERM)
    assert request.signum is None and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_signal_repeated_at_once_does_not_break_into_the_clean_up(capsys, restored_handlers):
    cleaned = []

    def main():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the same interruption, passed on by a parent
            cleaned.append(True)

    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == 143 and cleaned
    assert capsys.readouterr().err == f"interrupted (SIGTERM); {STOPPED_AT_ONCE}\n"
