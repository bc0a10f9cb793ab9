"""Wasserstein VQ (Fang et al., 2025, "Enhancing Vector Quantization with Distributional Matching: A Theoretical and
Empirical Study"; revised as "Distributional Matching for Vector Quantization: A Unified Theoretical and Empirical
Framework"; code at github.com/VQ-Research/Wasserstein-VQ): nearest-codeword assignment and the usual VQ losses,
plus the closed-form Wasserstein-2 distance between a Gaussian fitted to a queue of recent (detached) latents and a
Gaussian fitted to the codebook, which pulls the codebook as a whole onto the latents' distribution so that no code is
left outside it.

What their code does, read in VQ-Research/Wasserstein-VQ `code/VQVAE/model/wasserstein_quantizer.py`
(`Wasserstein_Quantizer.calc_wasserstein_loss`, `Queue`), `code/VQVAE/config.py`, `code/VQVAE/train_vqvae.py` and
`code/VQVAE/scripts/ImageNet/train_wasserstein_quantizer_imagenet_p1.sh`, and what we do:

- Queue: 65,536 latents (a buffer initialised to N(0, 0.01^2) noise), the current batch written in before the loss
  is computed, detached. Ours: quantizer.wvq_queue_size latents, default 16,384: at the default batch (32 images x
  64 positions = 2,048 latents) that is 8 batches, the ratio of theirs (65,536 = 8 batches of 32 x 256 latents);
  a Gaussian in D = 64 needs far fewer samples than either. Ours starts empty and uses only the rows filled so far
  (no noise rows in the first statistics), wraps around for any batch size (theirs asserts the queue size is a
  multiple of the batch), and is a persistent buffer with its fill count and write position, so a resumed run
  continues with the same queue. Under several processes every process writes the latents of all of them (gathered),
  so the queues stay identical; theirs is single-process.
- Distance: both sides divided by the largest per-dimension standard deviation of the queue (detached); full
  covariances (unbiased, 1/(n - 1)) of the queue and of the codebook; W = sqrt(||mu_z - mu_c||^2 + tr S_z + tr S_c
  - 2 tr (S_z^1/2 S_c S_z^1/2)^1/2), the distance itself, not its square. Same here.
- Gradient: the queue's mean, covariance and scale are detached, so the term moves the codebook only (its mean and
  covariance); the encoder gets the commitment loss and the straight-through gradient. Same here.
- Square roots: they take S_z^1/2 from `eigh` with relu(eigenvalue) + 1e-8, and the cross term from `eigh` of
  S_z^1/2 S_c S_z^1/2, again adding 1e-8 to every eigenvalue before the square root. Ours, in float64: S_z^1/2 from
  `eigh` with negative rounding eigenvalues set to 0 and no jitter (no gradient flows through it); the cross term from
  `eigvalsh` of the symmetrised S_z^1/2 S_c S_z^1/2, with eigenvalues below 1e-18 (rounding noise, in the queue's
  normalised units) counted as 0: the square root's derivative 1/(2 sqrt(lambda)) is unbounded at 0, which a
  rank-deficient codebook covariance (K < D, or collapse) reaches, and the floor cuts it there instead of shifting
  every eigenvalue. The one jitter added is 1e-12 under the outer square root (theirs: 1e-10): the distance is 0
  where the two Gaussians match, and the square root's gradient is infinite there.
- Losses: beta ||z - sg(q)||^2 + alpha ||sg(z) - q||^2 + gamma W with beta = 0.1, alpha = 1, gamma = 0.5 in their
  runs (the scripts' flags; config.py's default gamma is 0). Here quantizer.beta (default 0.1) weighs the commitment
  term, the codebook term has weight 1, and quantizer.wvq_weight (default 0.5) weighs W.
- Codebook: N(0, 0.01^2) initialisation, trained by gradient. They give the codebook its own Adam learning rate
  (0.02 against 5e-5 for the networks); here every parameter has the run's one learning rate, as for every quantizer.
- Evaluation: nearest codeword. In evaluation mode the reported W is that of the batch itself against the codebook
  (their `collect_eval_info`), and the queue is left as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import gather_rows
from .base import Quantizer, QuantizerOutput, code_perplexity
from .registry import QuantizerSpec, Setting, register

DEFAULT_QUEUE_SIZE = 16_384
CODEBOOK_INIT_STD = 0.01  # theirs: embedding.weight.normal_(0, 0.01)
# Under the outer square root: bounds its gradient where the Gaussians match (W = 0); in units of the queue's scale.
_SQRT_JITTER = 1e-12
# Eigenvalues of R S_c R below this are rounding noise of a rank-deficient codebook covariance: counted as 0, no gradient.
_EIGENVALUE_FLOOR = 1e-18


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by `eigh`; eigenvalues below 0 (rounding) count as 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()[None, :]) @ eigenvectors.mT


def mean_and_covariance(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of (n, D), n >= 2."""
    mean = rows.mean(dim=0)
    centred = rows - mean
    return mean, centred.mT @ centred / (rows.shape[0] - 1)


def gaussian_w2_squared(mean: torch.Tensor, covariance: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared W2 between N(mean, covariance) and the Gaussian fitted to the rows of `codebook` (K, D), K >= 2,
    differentiable in the codebook: ||mean - mu_c||^2 + tr(covariance) + tr(S_c) - 2 tr (R S_c R)^1/2 with
    R = covariance^1/2. float64 throughout; clamped at 0."""
    mean, covariance, codebook = mean.double(), covariance.double(), codebook.double()
    code_mean, code_covariance = mean_and_covariance(codebook)
    root = psd_sqrt(covariance)
    inner = root @ code_covariance @ root
    eigenvalues = torch.linalg.eigvalsh((inner + inner.mT) / 2)
    cross = torch.where(eigenvalues > _EIGENVALUE_FLOOR, eigenvalues.clamp_min(_EIGENVALUE_FLOOR).sqrt(), 0.0).sum()
    squared = ((mean - code_mean).square().sum() + covariance.diagonal().sum() + code_covariance.diagonal().sum()
               - 2 * cross)
    return squared.clamp_min(0)


class WassersteinVQQuantizer(Quantizer):
    """Nearest-codeword VQ plus gamma * W2(queue Gaussian, codebook Gaussian) on the codebook (module docstring)."""

    def __init__(self, codebook_size: int, embedding_dim: int, beta: float = 0.1, weight: float = 0.5,
                 queue_size: int = DEFAULT_QUEUE_SIZE):
        super().__init__(codebook_size, embedding_dim)
        torch.nn.init.normal_(self.codebook, 0.0, CODEBOOK_INIT_STD)
        self.beta = beta
        self.weight = weight
        self.queue_size = queue_size
        # Persistent, so a checkpoint resumes with the same queue: the latents, how many rows hold latents, where the
        # next one goes.
        self.register_buffer("queue", torch.zeros(queue_size, embedding_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write these latents (and every other process's) over the oldest ones."""
        rows = gather_rows(rows.detach().float())[-self.queue_size:]
        n = rows.shape[0]
        slots = (int(self.queue_next) + torch.arange(n, device=rows.device)) % self.queue_size
        self.queue[slots] = rows
        self.queue_next.fill_((int(self.queue_next) + n) % self.queue_size)
        self.queue_filled.fill_(min(int(self.queue_filled) + n, self.queue_size))

    def queued(self) -> torch.Tensor:
        """The latents in the queue (rows written so far; all of them once it has wrapped)."""
        return self.queue[: int(self.queue_filled)]

    def wasserstein(self, features: torch.Tensor) -> torch.Tensor:
        """Their W: the W2 distance between Gaussians fitted to `features` (detached) and to the codebook, both
        divided by the features' largest per-dimension standard deviation; 0 with fewer than 2 features."""
        features = features.detach().double()
        if features.shape[0] < 2:
            return self.codebook.sum() * 0.0
        scale = features.std(dim=0).max().clamp_min(1e-8)
        mean, covariance = mean_and_covariance(features / scale)
        squared = gaussian_w2_squared(mean, covariance, self.codebook / scale)
        return (squared + _SQRT_JITTER).sqrt().float()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat, indices, codewords = self.quantize(z)
            if self.training:
                self.enqueue(flat)
                distance = self.wasserstein(self.queued())
            else:
                distance = self.wasserstein(flat)
            losses = {"codebook": F.mse_loss(codewords, z.detach()),
                      "commitment": self.beta * F.mse_loss(z, codewords.detach()),
                      "wasserstein": self.weight * distance}
            quantized = z + (codewords - z).detach()
        b, _, h, w = z.shape
        indices = indices.view(b, h, w)
        return QuantizerOutput(quantized, indices, losses,
                               {"perplexity": code_perplexity(indices, self.codebook_size).detach(),
                                "wasserstein_distance": distance.detach()})

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codewords: (flat latents, flat indices, codeword grid (B, D, H, W))."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return super().quantize(z.float())


register(QuantizerSpec(
    name="wasserstein-vq",
    description="Wasserstein VQ, nearest codes plus a Gaussian W2 between a latent queue and the codebook (Fang et al., 2025)",
    build=lambda cfg, dim, positions, data_dim: WassersteinVQQuantizer(
        cfg.codebook_size, dim, beta=cfg.resolved_beta, weight=cfg.wvq_weight, queue_size=cfg.wvq_queue_size),
    settings=(
        # gamma, the weight of the W2 distance (their runs: 0.5).
        Setting("wvq_weight", float, 0.5, expected="a number >= 0, e.g. 0.5", ok=lambda v: v >= 0),
        # Recent latents whose Gaussian the codebook's is matched to (theirs: 65,536; 8 batches at either scale).
        Setting("wvq_queue_size", int, DEFAULT_QUEUE_SIZE, expected="an integer >= 2, e.g. 16384", ok=lambda v: v >= 2),
    ),
    # quantizer.beta weighs the commitment term (their runs: 0.1); the codebook term has weight 1.
    default_beta=0.1,
    order=55,
))
