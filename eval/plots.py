"""Pictures next to the numbers: reconstruction grids and code-usage histograms."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from configio.files import atomic_write_bytes


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path, per_row: int = 16) -> None:
    """Originals in the odd rows, their reconstructions right below them."""
    n = min(len(originals), per_row * 4)
    rows = []
    for start in range(0, n, per_row):
        rows += [originals[start : start + per_row], reconstructions[start : start + per_row]]
    save_png(torch.cat(rows).float().clamp(0, 1), path, nrow=per_row)


def save_png(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    # torchvision is imported where a picture is made: `import torchvision` loads its models and torch's compiler,
    # which a job that finds nothing to do, or stops on a bad setting, should not wait for.
    from torchvision.utils import make_grid, save_image

    buffer = io.BytesIO()
    save_image(make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0), buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())


def save_usage_histograms(histograms: dict[str, torch.Tensor], path: Path) -> None:
    """Sorted code-usage histograms, one panel per named histogram (a run, or a quantizer in a comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .codebook import codebook_statistics

    fig, axes = plt.subplots(1, len(histograms), figsize=(5 * len(histograms), 3.2), squeeze=False)
    for ax, (name, counts) in zip(axes[0], histograms.items()):
        stats = codebook_statistics(counts)
        freq = (counts.double() / counts.sum()).sort(descending=True).values
        ax.bar(range(len(freq)), freq.numpy(), width=1.0, color="tab:blue")
        ax.axhline(1 / len(freq), color="tab:red", lw=0.8, ls="--", label="uniform")
        ax.set_title(f"{name}: perplexity {stats['perplexity']:.1f}, usage {100 * stats['usage']:.1f}%", fontsize=9)
        ax.set_xlabel("codes, most used first")
        ax.set_ylabel("frequency")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def save_sample_panels(panels: dict[str, torch.Tensor], path: Path, row_names: list[str] | None = None) -> None:
    """Sample grids side by side, one panel per model; each panel (rows, columns, C, H, W) has one row per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items()):
        rows, cols = images.shape[:2]
        grid = make_grid(images.flatten(0, 1).float().clamp(0, 1), nrow=cols, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        step = grid.shape[1] / rows
        ax.set_yticks([step * (i + 0.5) for i in range(rows)])
        ax.set_yticklabels(row_names[:rows] if row_names else [str(i) for i in range(rows)], fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def save_sweep_curves(rows: list[dict], path: Path) -> None:
    """Test usage and perplexity against the codebook size, one line per model (rows: ``codebook_size``, ``model``,
    ``usage``, ``perplexity``; a codebook size may appear for only some models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (usage_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    sizes = sorted({row["codebook_size"] for row in rows})
    for name in dict.fromkeys(row["model"] for row in rows):
        points = sorted((row["codebook_size"], row["usage"], row["perplexity"]) for row in rows if row["model"] == name)
        ks = [p[0] for p in points]
        usage_ax.plot(ks, [100 * p[1] for p in points], marker="o", label=name)
        ppl_ax.plot(ks, [p[2] for p in points], marker="o", label=name)
    ppl_ax.plot(sizes, sizes, color="grey", ls="--", lw=0.8, label="= K (every code equally used)")
    for ax, title in ((usage_ax, "codes used on the test split (%)"), (ppl_ax, "test code perplexity")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size K")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ppl_ax.set_yscale("log", base=2)
    usage_ax.set_ylim(0, 102)
    ppl_ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
