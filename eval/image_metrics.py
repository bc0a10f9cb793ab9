"""Per-image PSNR and SSIM at native resolution (torchmetrics); datasets report the mean over images.

SSIM uses the standard Gaussian window (size 11, sigma 1.5) with data range 1, on images in [0, 1].
"""
from __future__ import annotations

import torch

# torchmetrics is imported where a metric is computed: importing it loads every metric it has, which a job that only
# reads or writes images, or finds nothing to do, should not wait for.


def psnr_per_image(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        prediction.float().clamp(0, 1), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim_per_image(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        prediction.float().clamp(0, 1), target.float(), data_range=1.0, reduction="none"
    )


def mse_per_image(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
