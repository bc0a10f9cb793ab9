"""Side-by-side performance measurements (``make bench``).

Imports ``pipelines`` first so that the benchmark runs with the training jobs' OpenMP setting (see there)."""
import pipelines  # noqa: F401
