"""Test-split reconstruction metrics for a tokenizer: MSE, PSNR, SSIM (per-image means) and codebook statistics."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .codebook import code_histogram, codebook_statistics
from .image_metrics import mse_per_image, psnr_per_image, ssim_per_image


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer,
    dataset: Dataset,
    split: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_examples: int = 64,
    progress: bool = True,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[dict, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Returns (metrics, code histogram, (example originals, their reconstructions)). `on_batch(images,
    reconstructions, codes)` sees every batch, for metrics of the caller's own in the same pass."""
    tokenizer = tokenizer.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0}
    originals, reconstructions = [], []
    n = 0
    for images, _ in tqdm(loader, desc=f"evaluating on {split}", disable=not progress, leave=False):
        images = images.to(device)
        recon, indices = tokenizer.reconstruct(images)
        counts += code_histogram(indices, tokenizer.codebook_size)
        recon = recon.float().clamp(0, 1)
        sums["mse"] += float(mse_per_image(recon, images).sum())
        sums["psnr"] += float(psnr_per_image(recon, images).sum())
        sums["ssim"] += float(ssim_per_image(recon, images).sum())
        if on_batch is not None:
            on_batch(images, recon, indices)
        if sum(len(o) for o in originals) < num_examples:
            originals.append(images.cpu())
            reconstructions.append(recon.cpu())
        n += len(images)
    if n == 0:
        raise ValueError(f"the {split} split is empty; nothing to evaluate")
    metrics = {key: value / n for key, value in sums.items()}
    metrics.update(codebook_statistics(counts))
    metrics.update({"num_images": n, "split": split})
    examples = (torch.cat(originals)[:num_examples], torch.cat(reconstructions)[:num_examples])
    return metrics, counts, examples
