"""The runnable jobs that chain the stages (``python -m pipelines.<job>``).

Importing this package (which ``python -m pipelines.<job>`` does before the job imports torch) sets
``GOMP_SPINCOUNT=10000`` unless the environment already sets it. After every parallel region, PyTorch's OpenMP
workers busy-wait for the next one for GOMP_SPINCOUNT rounds; at libgomp's default (300000 rounds of a pause
instruction, milliseconds on recent x86 cores) they keep spinning through the exact OT solve that follows and take
the cores its threads need. Measured on 2 CPU cores (VQ-WAE / VQ-VAE training step, reference setting, 30 interleaved
repeats, three runs each): 1.45-1.46 at the default, 1.35-1.46 at 10000 (VQ-VAE's step unchanged at 50.6 ms);
at 3000 VQ-VAE's own step slows (54 ms). It only takes effect if torch is not imported yet.
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
