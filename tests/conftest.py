import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Under pytest-xdist (make test) each worker takes its share of the cores: workers that each ran torch (and the OT
# solver, which follows torch's thread count) on every core would slow each other several times over.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # the jobs the tests start (compare's, sweep's, bench's)

FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def usual_signal_handlers():
    """The suite may start with SIGINT ignored (a script's background job, nohup); the interruption tests and the
    jobs they start need Python's usual handlers, so the suite runs with them and restores what it found."""
    found = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in found.items():
        signal.signal(signum, handler)


def session_folder(tmp_path_factory, name: str) -> Path:
    """A folder every process of this test session shares: under pytest-xdist the workers' common parent folder."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root shared by the tests that read Fashion-MNIST, and by the test processes (the jobs write into it
    atomically, so processes that unpack the same file side by side are safe)."""
    if not FASHION_DEB.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it when it may)")
    return session_folder(tmp_path_factory, "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """One tiny chain for the end-to-end tests (tokenizer, codes, prior and 8 samples, as `make sample` makes them),
    made once per session by whichever test process needs it first. Read-only: a test that changes a step works on
    a copy; jobs that find nothing to do may run in it (they change nothing, and read no lock of their inputs)."""
    from filelock import FileLock
    from helpers import TINY_SAMPLE_ARGS, job, train_tiny_run

    shared = session_folder(tmp_path_factory, "tiny_run")
    run, made = shared / "run", shared / "made"
    with FileLock(str(shared / "making.lock")):
        if not made.is_file():
            train_tiny_run(run, data_root)
            job("pipelines.sample", "--tokenizer", run / "tokenizer", "--prior", run / "prior", "--output",
                run / "samples", *TINY_SAMPLE_ARGS)
            made.touch()
    return run


def pytest_collection_modifyitems(config, items):
    """Everything under tests/end_to_end/ runs whole jobs: it belongs to the slow set (`make test-fast` skips it)."""
    for item in items:
        if "end_to_end" in item.path.parts:
            item.add_marker(pytest.mark.slow)
