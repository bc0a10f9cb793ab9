"""Side-by-side performance measurements (``make bench``)."""
