"""Side-by-side performance measurements (``make bench``), run with the training jobs' process settings."""
