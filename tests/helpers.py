"""Running the project's jobs as users do (subprocesses) and checking their one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(module, *args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stderr[-3000:]}")
    return proc


def one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr
