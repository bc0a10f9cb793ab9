"""SQ-VAE (Takida et al., ICML 2022): stochastic quantization whose learned variance anneals itself.

"SQ-VAE: Variational Bayes on Discrete Representation with Self-annealed Stochastic Quantization", the Gaussian
variant with one learned scalar variance (the authors' ``gaussian_1``, the one behind their image results).

Training. Each latent z (one of M positions) has a categorical posterior over the K codewords,
    P(k | z) = softmax_k(-||z - c_k||^2 / (2 sigma^2)),
relaxed with Gumbel-softmax at temperature tau: the decoder gets z~ = sum_k w_k c_k, w = gumbel_softmax(logits, tau).
Gradients reach z, the codebook and sigma^2 through the relaxation (there is no straight-through estimator while
training). Per image, the latent part of the negative ELBO is
    KL_discrete   = sum_m sum_k P(k | z_m) log P(k | z_m) + M log K        (KL to the uniform prior over codes)
    KL_continuous = sum_m ||z_m - z~_m||^2 / (2 sigma^2)                       (Gaussian KL, equal variances)
and the reconstruction part is the Gaussian log-likelihood ||x - x_hat||^2 / (2 sigma_x^2) summed over the data_dim
pixels (plus a constant). The two KL terms pull P(k | z) towards uniform and sigma^2 up; the reconstruction, seen
through the relaxed sample, pulls sigma^2 down once the codes carry the image. The net effect shrinks sigma^2 as
training goes on, so quantization becomes deterministic by itself (the "self-annealing").

Evaluation and encoding. The nearest codeword (the mode of P(k | z)), with a straight-through output.

The reconstruction weight (why the losses are scaled). The Tokenizer adds the mean pixel MSE with weight 1 to every
quantizer's losses (`reconstruction + sum(losses)`), and the quantizer never sees the images. So instead of weighting
the reconstruction by data_dim / (2 sigma_x^2), both latent terms are multiplied by 2 sigma_x^2 / data_dim:
    mean MSE + (2 sigma_x^2 / data_dim) (KL_discrete + KL_continuous)
        = (2 sigma_x^2 / data_dim) * [ ||x - x_hat||^2 / (2 sigma_x^2) + KL_discrete + KL_continuous ],
the SQ-VAE objective per image times a positive constant: the same minimiser and, since Adam ignores a constant
scale of the loss (up to its eps), the same steps. The
"kl_discrete" and "kl_continuous" entries of the losses carry that factor. data_dim (channels x height x width) comes
from the Tokenizer at construction.

sigma_x^2 follows the authors' default (``flags.arelbo = True``) unless ``data_variance`` fixes it: their maximum-
likelihood value, the current batch MSE (detached), at every step. The quantizer never sees the images, so it
returns the latent terms weighted by 2 / data_dim and the Tokenizer multiplies them by the batch MSE through
`losses_given_reconstruction` (the one hook a quantizer has on the reconstruction). With ``data_variance`` set
(e.g. 0.0025, about the final MSE of 32x32 tokenizers on Fashion-MNIST and CIFAR-10) the weight is that constant.

The authors' reference settings (github.com/sony/sqvae, vision/: configs/defaults.py, configs/cifar10_gauss_1.yaml,
configs/celeba_gauss_1.yaml, model.py, quantizer.py, trainer_base.py), used here as defaults:
- sigma^2 = 1 + exp(s), s learned, initialised at log 20 for K = 512, D = 64 (CIFAR-10, CelebA; log 10 for their
  MNIST/Fashion-MNIST runs with K = 128/256); the 1 is gaussian_1's encoder variance, fixed at exp(0).
- Gumbel temperature tau = max(1.0 * exp(-1e-5 * step), 0), step counted over training batches from 1.
- Codebook initialised from N(0, 1); uniform prior over the codes.
- Training (not set here): Adam lr 1e-3, batch 32, 100 epochs, ReduceLROnPlateau(factor 0.5, patience 3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer, QuantizerOutput, code_perplexity, squared_distances
from .registry import QuantizerSpec, Setting, register

# gaussian_1 adds the learned exp(s) to an encoder variance that is fixed at exp(0) = 1.
ENCODER_VARIANCE = 1.0
# The schedule's floor is 0 in the reference, but Gumbel-softmax divides by tau; this small a tau is already one-hot.
MIN_TEMPERATURE = 1e-6


class SQVAEQuantizer(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        data_dim: int,
        variance_init: float = 20.0,
        temperature: float = 1.0,
        temperature_decay: float = 1e-5,
        data_variance: float | None = None,
    ):
        super().__init__(codebook_size, embedding_dim)
        if data_dim < 1:
            raise ValueError(f"data_dim (pixels per image) must be positive, got {data_dim}")
        with torch.no_grad():
            self.codebook.normal_()
        self.log_variance_scale = nn.Parameter(torch.tensor(math.log(variance_init)))
        # Saved with the weights so that a resumed run continues the temperature schedule where it stopped.
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))
        self.data_dim = data_dim
        self.temperature_init = temperature
        self.temperature_decay = temperature_decay
        self.data_variance = data_variance
        # With data_variance None the batch MSE is applied by losses_given_reconstruction.
        self.latent_loss_weight = 2.0 * (1.0 if data_variance is None else data_variance) / data_dim

    @property
    def variance(self) -> torch.Tensor:
        """sigma^2 of the Gaussian posterior around each latent (a differentiable scalar)."""
        return ENCODER_VARIANCE + self.log_variance_scale.float().exp()

    def temperature(self) -> torch.Tensor:
        """Gumbel-softmax temperature at the current training step (a tensor: reading the step needs no device sync)."""
        steps = self.training_steps.double()
        return (self.temperature_init * torch.exp(-self.temperature_decay * steps)).clamp_min(MIN_TEMPERATURE).float()

    def losses_given_reconstruction(self, losses: dict[str, torch.Tensor], mse: torch.Tensor) -> dict[str, torch.Tensor]:
        """sigma_x^2 = the batch MSE (detached), the authors' default, unless data_variance fixes it."""
        if self.data_variance is not None:
            return losses
        weight = mse.detach().float()
        return {k: v * weight if k.startswith("kl_") else v for k, v in losses.items()}

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codewords, deterministic in training mode too: (flat latents, flat indices, codeword grid)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return super().quantize(z.float())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._forward(z.float())

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = self.flatten(z)
        codebook = self.codebook.float()
        variance = self.variance
        logits = -squared_distances(flat, codebook) / (2 * variance)
        log_probs = F.log_softmax(logits, dim=1)
        if self.training:
            self.training_steps += 1
        temperature = self.temperature()
        if self.training:
            # Gumbel noise -log(E), E ~ Exp(1); an E of exactly 0 (possible in float32) would make the sample NaN.
            exponentials = torch.empty_like(logits).exponential_().clamp_min(torch.finfo(logits.dtype).tiny)
            weights = F.softmax((logits - exponentials.log()) / temperature, dim=1)
            # The argmax of the relaxed sample is an exact draw from P(k | z) (Gumbel-max), whatever tau.
            indices = weights.argmax(dim=1)
            decoded = (weights @ codebook).view(b, h, w, d).permute(0, 3, 1, 2)
            quantized = decoded
        else:
            # The same nearest-codeword rule as quantize(), so evaluation and encode agree code for code.
            indices = self.nearest(flat.detach())
            decoded = self.lookup(indices.view(b, h, w))
            quantized = z + (decoded - z).detach()
        kl_discrete = (log_probs.exp() * log_probs).sum() / b + h * w * math.log(self.codebook_size)
        kl_continuous = (z - decoded).pow(2).sum(dim=(1, 2, 3)).mean() / (2 * variance)
        indices = indices.view(b, h, w)
        losses = {
            "kl_discrete": self.latent_loss_weight * kl_discrete,
            "kl_continuous": self.latent_loss_weight * kl_continuous,
        }
        stats = {
            "perplexity": code_perplexity(indices, self.codebook_size).detach(),
            "variance": variance.detach(),
            "temperature": temperature.detach(),
        }
        return QuantizerOutput(quantized, indices, losses, stats)


register(QuantizerSpec(
    name="sqvae",
    description="SQ-VAE (Takida et al., 2022), Gaussian variant",
    build=lambda cfg, dim, positions, data_dim: SQVAEQuantizer(
        cfg.codebook_size, dim, data_dim, variance_init=cfg.sqvae_variance_init, temperature=cfg.sqvae_temperature,
        temperature_decay=cfg.sqvae_temperature_decay, data_variance=cfg.sqvae_data_variance),
    settings=(
        # The learned part exp(s) of the posterior variance 1 + exp(s) starts here.
        Setting("sqvae_variance_init", float, 20.0, expected="> 0, e.g. 20", ok=lambda v: v > 0),
        # Gumbel-softmax temperature at step 0, decays as exp(-decay * step).
        Setting("sqvae_temperature", float, 1.0, expected="> 0, e.g. 1.0", ok=lambda v: v > 0),
        Setting("sqvae_temperature_decay", float, 1e-5, expected=">= 0, e.g. 1e-5", ok=lambda v: v >= 0),
        # sigma_x^2 of the Gaussian decoder; null: the batch MSE (the authors').
        Setting("sqvae_data_variance", float | None, None, expected="> 0, e.g. 0.0025, or null", ok=lambda v: v > 0),
    ),
    order=30,
))
