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
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

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


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root shared by the tests that read Fashion-MNIST (decompressed once per session)."""
    if not FASHION_DEB.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it when it may)")
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """One tiny chain for the end-to-end tests (tokenizer, codes, prior and 8 samples, as `make sample` makes them),
    made once per session (per worker under xdist). Read-only: a test that changes a step works on a copy."""
    from helpers import TINY_SAMPLE_ARGS, job, train_tiny_run

    run = train_tiny_run(tmp_path_factory.mktemp("tiny_run"), data_root)
    job("pipelines.sample", "--tokenizer", run / "tokenizer", "--prior", run / "prior", "--output", run / "samples",
        *TINY_SAMPLE_ARGS)
    return run


def pytest_collection_modifyitems(config, items):
    """Everything under tests/end_to_end/ runs whole jobs: it belongs to the slow set (`make test-fast` skips it)."""
    for item in items:
        if "end_to_end" in item.path.parts:
            item.add_marker(pytest.mark.slow)
