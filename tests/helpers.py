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


def write_code_set(folder, num_train=64, num_eval=32, codebook_size=16, side=4, num_classes=3, seed=0):
    """A small random code set in the format pipelines.extract_codes writes (train/val/test.safetensors)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, n in (("train", num_train), ("val", num_eval), ("test", num_eval)):
        codes = torch.randint(0, codebook_size, (n, side * side), generator=generator).to(torch.int16)
        labels = torch.randint(0, max(1, num_classes), (n,), generator=generator)
        metadata = {"codebook_size": str(codebook_size), "grid": json.dumps([side, side]), "tokenizer_sha256": "synthetic",
                    "num_classes": str(num_classes), "split": split, "order": "raster"}
        save_file({"codes": codes, "labels": labels}, str(folder / f"{split}.safetensors"), metadata=metadata)
    return folder


def real_images(data_root, n=12):
    """The first n Fashion-MNIST test images of a 48-image-per-split subset, (n, 1, 32, 32) in [0, 1]."""
    import torch

    from pipelines.datasets import DataConfig, build_splits

    test = build_splits(DataConfig(root=str(data_root), limit=48), seed=0)["test"]
    return torch.stack([test[i][0] for i in range(n)])
