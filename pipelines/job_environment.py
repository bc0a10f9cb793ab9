"""Process settings every job applies where it starts, before torch is loaded (libgomp reads them once, at load).

GOMP_SPINCOUNT=10000 unless the environment already sets it. After every parallel region, PyTorch's OpenMP workers
busy-wait for the next one for GOMP_SPINCOUNT rounds; at libgomp's default (300000 rounds of a pause instruction,
milliseconds on recent x86 cores) they keep spinning through the exact OT solve that follows and take the cores its
threads need; much lower values slow PyTorch's own parallel regions (CHANGELOG.md has the measurements). The
libraries never set it: in your own training loop, export it before starting Python.
"""
import os

JOB_ENVIRONMENT = {"GOMP_SPINCOUNT": "10000"}


def apply_job_environment() -> None:
    """Set each of JOB_ENVIRONMENT that the user has not set; call it before torch is imported."""
    for key, value in JOB_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
