"""OptVQ (Zhang, Zheng, Zhou and Lu, 2024, "Preventing Local Pitfalls in Vector Quantization via Optimal Transport",
arXiv:2412.15195): in training, the batch's latents are assigned to codes by one entropic optimal transport (Sinkhorn-
Knopp) over all tokens of the batch against all codes with uniform marginals, so every code receives latents and none
is left in a "local pitfall" far from the data; evaluation and encoding use the nearest codeword.

What the authors' code does, read in zbr17/optvq-gen `optvq/models/quantizer.py` (`VectorQuantizerSinkhorn`,
`sinkhorn`) with the configs and `train.py` of zbr17/OptVQ (`configs/imagenet/optvq_256_f16_h4.yaml`,
`configs/cifar10/optvq.yaml`), and what we do:

- Cost: Euclidean distances (`torch.cdist`, not squared) between latents and codewords, normalised over the whole
  matrix (their `normalize_mode: all`): (d - mean(d)) / (std(d) + 1e-6), then minus its minimum, so the cost is >= 0
  with unit spread whatever the latents' scale. Same here.
- Sinkhorn: kernel exp(-epsilon * cost) with epsilon = 10 (an inverse temperature: POT's reg = 1 / epsilon),
  5 iterations, each normalising the codes' masses to 1/K first and then the tokens' masses to 1/N, so the tokens'
  marginal is exact and the codes' is uniform up to the last iteration's error. Same iterates here, computed with the
  codes' scalings in a stable form: each code's column of the kernel is divided by its largest entry (a code scaling,
  which the next code normalisation absorbs exactly), entries below exp(-87) of that set to 0 with the error this
  makes in every mass checked each iteration, and where it would exceed 1e-6 (a token far from every code) the same
  iterations run in the log domain. They use the plain exponential, which underflows to 0 for costs beyond about
  10 normalised units and then divides by 1e-8 instead.
- Assignment: each token takes the argmax code of the plan (`use_prob: false` in every config; the class default
  samples from the plan). The plan is computed without gradient.
- Losses (`loss_q_type: l2`): ||z - sg(q)||^2 + beta ||sg(z) - q||^2 with beta = 0.25: in their code beta weighs the
  codebook term and the commitment term has weight 1. quantizer.beta is that beta here (default 0.25).
- Codebook: an embedding table through a learned linear projection (`use_proj: true`, weight ~ N(0, 1/D)); codewords
  = proj(embedding). Same here (quantizer.optvq_projection, default true). No feature normalisation (their
  `use_norm=True` is refused by their code).
- k-means initialisation (`use_initiate: kmeans`): a separate stage before training clusters pooled latents of part of
  the training set (faiss, 100 iterations, per class) and loads the centroids into the embedding table, under the
  random projection. Ours runs k-means (10 Lloyd iterations) on the latents of the first training batch, inside the
  first training step, and sets the projection to the identity there, so the first codewords are the centroids.
  With more codes than latents in that batch (K = 16,384 against 2,048 latents) every latent is a centroid and the
  extra centroids are copies of latents with a jitter of 1e-2 of the latents' spread: identical codewords would tie
  in every argmax and the lower index would take them all. A persistent buffer records that it ran, so a resumed run does not run it again.
- Evaluation: their forward runs the Sinkhorn assignment at test time too, which makes a token's code depend on the
  rest of its batch. Ours uses the nearest codeword in evaluation mode and in `quantize`, like every quantizer here.
- Heads: their configs split each latent into 4 heads quantized against one shared codebook (`num_head: 4`); that
  gives 4 codes per position, which our tokenizer's one code per position cannot hold. One head here (their class
  default). Their learning rate for the quantizer equals the rest (`mul_learning_rate: 1.0`), as here.
- Several processes: they all-reduce the codes' masses over processes and count N over all of them, so the transport
  is over the global batch, while the cost normalisation uses each process's own matrix. Same here (the codes' column
  maxima and masses are all-reduced); the k-means initialisation runs on process 0's batch and is broadcast.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, broadcast_from_first, world_size
from .base import (
    Quantizer,
    QuantizerInterface,
    QuantizerOutput,
    check_code_indices,
    code_perplexity,
    nearest_codewords,
    squared_distances,
)
from .registry import QuantizerSpec, Setting, register

KMEANS_ITERATIONS = 10
# The float32 scaling form sets kernel entries below exp(-87) of their code's largest (about the smallest normal
# float32) to 0: exp then writes no subnormals (which run many times slower), and the error this makes in any code's
# or token's mass, at most exp(-87) * sum(scalings) / mass, is checked against this tolerance every iteration; past it
# (a token or code far from all others) the same iterations run in the log domain.
_LOG_KERNEL_CUTOFF = -87.0
_TRUNCATION_TOLERANCE = 1e-6


def normalised_cost(distances: torch.Tensor) -> torch.Tensor:
    """OptVQ's cost: the (N, K) distances standardised over the whole matrix, then shifted to a minimum of 0."""
    cost = (distances - distances.mean()) / (distances.std() + 1e-6)
    return cost - cost.min()


def sinkhorn_potentials(cost: torch.Tensor, epsilon: float, iterations: int,
                        log_domain: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn-Knopp on the (N, K) cost with uniform marginals (1/N per token, 1/K per code), starting with the
    codes: the plan after `iterations` is exp(-epsilon * cost + log_u[:, None] + log_v[None, :]).

    Returns (log_u (N,), log_v (K,)). Under several processes the tokens are those of all processes together (the
    codes' sums are all-reduced); log_u covers this process's tokens. `log_domain`: None picks the float32 scaling
    form unless its truncation error could pass 1e-6 of a mass, True/False forces one (the tests check both
    against POT)."""
    cost = cost.float()
    n_total = float(all_reduce(torch.tensor(float(cost.shape[0]), device=cost.device)))
    k = cost.shape[1]
    logits = cost * -epsilon
    if not log_domain:
        # Divide each code's column by its largest entry over all tokens: no column is all zeros, and the first code
        # normalisation absorbs the shift exactly (the tokens start uniform, as in theirs).
        shift = all_reduce(logits.amax(dim=0), dist.ReduceOp.MAX)
        kernel = F.threshold(logits - shift, _LOG_KERNEL_CUTOFF, -math.inf).exp_()
        u = torch.ones(cost.shape[0], device=cost.device)
        cutoff = math.exp(_LOG_KERNEL_CUTOFF)
        for _ in range(iterations):
            code_mass = all_reduce(kernel.t() @ u)
            v = (1.0 / k) / code_mass
            token_mass = kernel @ v
            if log_domain is None:
                error = torch.stack([all_reduce(u.sum()) / code_mass.min(), v.sum() / token_mass.min()]) * cutoff
                if bool(all_reduce(error.max(), dist.ReduceOp.MAX) > _TRUNCATION_TOLERANCE):
                    break
            u = (1.0 / n_total) / token_mass
        else:
            return u.double().log(), v.double().log() - shift.double()
    # The same iterations on log potentials: exact wherever the kernel underflows.
    log_n, log_k = math.log(n_total), math.log(k)
    log_u = torch.zeros(cost.shape[0], device=cost.device)
    for _ in range(iterations):
        log_v = -_global_logsumexp(logits + log_u[:, None], dim=0) - log_k
        log_u = -torch.logsumexp(logits + log_v[None, :], dim=1) - log_n
    return log_u.double(), log_v.double()


def _global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over `dim` across the rows of every process."""
    local = torch.logsumexp(x, dim=dim)
    if world_size() == 1:
        return local
    peak = all_reduce(local.clone(), dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return torch.log(all_reduce(torch.exp(local - peak))) + peak


def transport_plan(cost: torch.Tensor, epsilon: float, iterations: int, log_domain: bool | None = None) -> torch.Tensor:
    """The (N, K) Sinkhorn plan (float64, total mass 1) of `sinkhorn_potentials`; for tests and analysis."""
    log_u, log_v = sinkhorn_potentials(cost, epsilon, iterations, log_domain)
    return torch.exp(cost.double() * -epsilon + log_u[:, None] + log_v[None, :])


def optimal_transport_assignment(flat: torch.Tensor, codebook: torch.Tensor, epsilon: float,
                                 iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(OptVQ's code for each row of `flat` (N, D), its nearest code), both (N,)."""
    distances = squared_distances(flat.float(), codebook.float()).clamp_min_(0).sqrt_()
    nearest = distances.argmin(dim=1)
    cost = normalised_cost(distances)
    _, log_v = sinkhorn_potentials(cost, epsilon, iterations)
    # The plan's argmax over codes for each token: the token's own scaling does not change it.
    return (cost * -epsilon + log_v.float()[None, :]).argmax(dim=1), nearest


@torch.no_grad()
def kmeans(samples: torch.Tensor, num_clusters: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Lloyd's k-means from `num_clusters` distinct samples; a centroid that loses all its samples stays where it is.

    With no more samples than clusters every sample is a centroid (distortion 0, nothing for Lloyd to do) and the
    other centroids are copies of random samples moved by 1e-2 of the samples' per-dimension spread: identical
    codewords would tie in every argmax, and a smaller jitter drowns in the rounding of ||x||^2 - 2 x.c + ||c||^2.
    """
    samples = samples.float()
    n = samples.shape[0]
    order = torch.randperm(n, device=samples.device)
    if n <= num_clusters:
        extra = samples[torch.randint(n, (num_clusters - n,), device=samples.device)]
        spread = samples.std(dim=0, keepdim=True).nan_to_num(0.0).clamp_min(1e-6)
        return torch.cat([samples[order], extra + 1e-2 * spread * torch.randn_like(extra)])
    centroids = samples[order[:num_clusters]].clone()
    for _ in range(iterations):
        assignment = nearest_codewords(samples, centroids)
        counts = torch.bincount(assignment, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, samples)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].float()
    return centroids


class OptVQQuantizer(QuantizerInterface):
    """OptVQ: Sinkhorn assignment over the whole batch in training, nearest codeword otherwise (module docstring)."""

    def __init__(self, codebook_size: int, embedding_dim: int, beta: float = 0.25, epsilon: float = 10.0,
                 iterations: int = 5, kmeans_init: bool = True, projection: bool = True):
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.epsilon = epsilon
        self.iterations = iterations
        self.embedding = nn.Parameter(torch.randn(codebook_size, embedding_dim))  # nn.Embedding's N(0, 1)
        self.projection = None
        if projection:
            self.projection = nn.Linear(embedding_dim, embedding_dim)
            nn.init.normal_(self.projection.weight, std=embedding_dim ** -0.5)
        # Persistent: a checkpoint records that the k-means initialisation ran, and a resumed run does not rerun it.
        self.register_buffer("initialised", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the codewords: proj(embedding), or the embedding table without a projection."""
        table = self.embedding.float()
        return table if self.projection is None else F.linear(table, self.projection.weight.float(),
                                                             self.projection.bias.float())

    @torch.no_grad()
    def initialise(self, flat: torch.Tensor) -> None:
        """k-means of these latents into the codebook (process 0's, broadcast), the projection set to the identity."""
        centroids = kmeans(flat, self.codebook_size)
        broadcast_from_first(centroids)
        self.embedding.copy_(centroids)
        if self.projection is not None:
            self.projection.weight.copy_(torch.eye(self.embedding_dim))
            self.projection.bias.zero_()
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = Quantizer.flatten(z)
            if self.training and not bool(self.initialised):
                self.initialise(flat.detach())
            codebook = self.codebook
            stats = {}
            if self.training:
                with torch.no_grad():
                    indices, nearest = optimal_transport_assignment(flat.detach(), codebook.detach(), self.epsilon,
                                                                    self.iterations)
                stats["reassigned"] = (indices != nearest).float().mean()
            else:
                indices = nearest_codewords(flat, codebook)
            b, _, h, w = z.shape
            codewords = codebook[indices].view(b, h, w, -1).permute(0, 3, 1, 2)
            # Their l2 loss: commitment weight 1, beta on the codebook term.
            losses = {"codebook": self.beta * F.mse_loss(codewords, z.detach()),
                      "commitment": F.mse_loss(z, codewords.detach())}
            quantized = z + (codewords - z).detach()
        indices = indices.view(b, h, w)
        stats["perplexity"] = code_perplexity(indices, self.codebook_size)
        return QuantizerOutput(quantized, indices, losses, {k: v.detach().float() for k, v in stats.items()})

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codewords: (flat latents, flat indices, codeword grid (B, D, H, W))."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = Quantizer.flatten(z)
            indices = nearest_codewords(flat.detach(), self.codebook)
            b, _, h, w = z.shape
            return flat, indices, self.lookup(indices.view(b, h, w))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> codeword grid (B, D, H, W)."""
        check_code_indices(indices, self.codebook_size)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.codebook[indices.long()].permute(0, 3, 1, 2).contiguous()


register(QuantizerSpec(
    name="optvq",
    description="OptVQ, Sinkhorn assignment of the whole batch to all codes (Zhang et al., 2024)",
    build=lambda cfg, dim, positions, data_dim: OptVQQuantizer(
        cfg.codebook_size, dim, beta=cfg.resolved_beta, epsilon=cfg.optvq_epsilon, iterations=cfg.optvq_iterations,
        kmeans_init=cfg.optvq_kmeans_init, projection=cfg.optvq_projection),
    settings=(
        # The inverse temperature of the kernel exp(-epsilon * cost) on the normalised cost (their configs: 10).
        Setting("optvq_epsilon", float, 10.0, expected="a number > 0, e.g. 10", ok=lambda v: v > 0),
        # Sinkhorn-Knopp iterations per training step (their configs: 5).
        Setting("optvq_iterations", int, 5, expected="an integer >= 1, e.g. 5", ok=lambda v: v >= 1),
        Setting("optvq_kmeans_init", bool, True),  # k-means on the first training batch
        Setting("optvq_projection", bool, True),  # codewords = a learned linear map of the table (their use_proj)
    ),
    # quantizer.beta weighs the codebook term, as in their code; the commitment term has weight 1.
    default_beta=0.25,
    order=50,
))
