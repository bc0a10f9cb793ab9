"""VQ-WAE (Vuong et al., ICML 2023): quantization trained by exact optimal transport to learned code distributions.

Each latent position m has a distribution pi^m = softmax(w_m) over the shared codebook. The codebook and the
encoder are pulled together by beta * sum_m W(pi^m, empirical latents at m); a KL term keeps every pi^m close to
uniform, which is what keeps the whole codebook in use. There is no commitment loss.

Several processes (``transport_scope``):
- ``"local"``: each process transports pi^m to the latents of its own batch; DDP averages the gradients, so the
  objective is the mean over processes of per-process Wasserstein terms (an OT over a smaller empirical measure).
- ``"global_batch"``: the latents of all processes are gathered with a differentiable all_gather, so each problem
  is the one a single process would solve on the global batch. The M positions are split between the processes
  (each solves about M / N of them), and the term is scaled by N: the all_gather backward sums every process's
  gradient into the owner of each latent, and DDP then divides by N, so the averaged gradients (and the mean of the
  per-process loss values) equal those of the single-process loss on the concatenated batch. With fewer positions
  than processes (the global form) every process solves all of them and no scaling is needed. Only in training
  mode with gradients on; evaluation stays local. Every process must hold the same number of latents.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from configio.errors import ConfigError

from ..distributed import world_size
from ..semidiscrete import SemiDiscreteTransport
from ..transport import transport_costs, wasserstein_loss
from .base import Quantizer, QuantizerOutput, code_perplexity, perplexity
from .registry import QuantizerSpec, Setting, register


def reference_logits(num_positions: int, codebook_size: int) -> torch.Tensor:
    """The authors' init, generalised: logit 1 on a contiguous block of codes per position, 0 elsewhere.

    For 64 positions and K = 512 this is their 8 codes per position; when K < positions some rows stay all-zero
    (uniform).
    """
    logits = torch.zeros(num_positions, codebook_size)
    owner = torch.arange(codebook_size) * num_positions // codebook_size
    logits[owner, torch.arange(codebook_size)] = 1.0
    return logits


class VQWAEQuantizer(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        num_positions: int,
        beta: float = 1e-3,
        kl_weight: float = 1.0,
        learn_weights: bool = True,
        global_transport: bool = False,
        init: str = "uniform",
        solver: str = "exact",
        transport_scope: str = "local",
        potential_step: float = 0.1,
    ):
        super().__init__(codebook_size, embedding_dim)
        self.num_positions = num_positions
        self.beta = beta
        self.kl_weight = kl_weight
        self.global_transport = global_transport
        self.solver = solver
        self.transport_scope = transport_scope
        if solver == "semidiscrete" and not global_transport:
            raise ValueError("the semidiscrete solver transports one pi over all positions: it needs form=global")
        # The semi-discrete form's codeword potentials: state carried from step to step (see semidiscrete.py).
        self.semidiscrete = SemiDiscreteTransport(codebook_size, potential_step) if solver == "semidiscrete" else None
        rows = 1 if global_transport else num_positions
        logits = reference_logits(rows, codebook_size) if init == "reference" else torch.zeros(rows, codebook_size)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", torch.zeros(rows, codebook_size))

    @property
    def learn_weights(self) -> bool:
        return isinstance(self.logits, nn.Parameter)

    @torch.no_grad()
    def report_statistics(self) -> dict:
        """The perplexity of each position's learned code distribution pi (for the evaluation report)."""
        pi = self.code_distributions().double().cpu()
        pi_ppl = perplexity(pi, dim=1)
        return {"learned_pi_perplexity": {
            "form": "global" if pi.shape[0] == 1 else "per_position", "learned": bool(self.learn_weights),
            "mean": float(pi_ppl.mean()), "min": float(pi_ppl.min()), "max": float(pi_ppl.max()),
            "values": [round(float(v), 3) for v in pi_ppl],
        }}

    def code_distributions(self) -> torch.Tensor:
        """pi, shape (positions, K), or (1, K) in the global form."""
        return F.softmax(self.logits.float(), dim=1)

    def _gather(self, latents: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Global-batch scope: (latents of all processes, this process's weight rows, loss scale); see the module."""
        if not (
            self.transport_scope == "global_batch" and self.training and torch.is_grad_enabled() and world_size() > 1
        ):
            return latents, weights, 1.0
        from torch.distributed.nn.functional import all_gather

        world, rank = world_size(), dist.get_rank()
        latents = torch.cat(all_gather(latents.contiguous()), dim=1)
        if latents.shape[0] < world:
            return latents, weights, 1.0
        rows = torch.tensor_split(torch.arange(latents.shape[0], device=latents.device), world)[rank]
        return latents[rows], weights[rows], float(world)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = z.float()
        b, d, h, w = z.shape
        if not self.global_transport and h * w != self.num_positions:
            raise ValueError(
                f"this VQ-WAE quantizer has {self.num_positions} positions but got a {h}x{w} latent grid; "
                "the image size does not match the one the tokenizer was built for"
            )
        # (positions, batch, dim): the empirical distribution that each pi^m is transported to. Its transport costs
        # are every latent's squared distances to the codebook: the nearest codewords come from them too, so the
        # step computes one (positions * batch, K) distance matrix, not two.
        latents = z.permute(2, 3, 0, 1).reshape(h * w, b, d)
        training_step = self.training and torch.is_grad_enabled()
        if self.semidiscrete is not None and training_step:
            self.semidiscrete.initialize_codebook(self.codebook.data, latents.detach().reshape(-1, d))
        codebook = self.codebook.float()
        costs = transport_costs(codebook, latents)
        indices = costs.argmin(dim=2).T.reshape(b, h, w)
        codewords = self.lookup(indices)
        weights = self.code_distributions()
        if self.global_transport:
            latents, costs = latents.reshape(1, h * w * b, d), costs.reshape(1, h * w * b, -1)
        # The semi-discrete form needs no gathering: its potentials follow every process's loads.
        gathered, ot_weights, scale = (latents, weights, 1.0) if self.semidiscrete else self._gather(latents, weights)
        if gathered is not latents:  # other processes' latents: other costs
            latents, costs = gathered, None
        stats = {"perplexity": code_perplexity(indices, self.codebook_size).detach()}
        extra = {}
        if self.learn_weights:
            kl = (weights * (torch.log(weights.clamp_min(1e-30)) + math.log(self.codebook_size))).sum()
            extra["kl"] = self.kl_weight * kl / self.codebook_size
            stats["pi_perplexity"] = perplexity(weights.detach()).mean()
        # The transport term's graph after the KL term's: autograd sums the weights' two gradients in the order the
        # terms are built, and the other order changes training in the last bits.
        if self.semidiscrete is not None:
            # One problem over all positions' latents, weighted by the number of positions so that each latent's
            # gradient is the one the per-position form gives it (mass 1/B at its position, 1/(M B) here).
            transport = h * w * self.semidiscrete(latents[0], codebook, weights[0], costs[0],
                                                  codebook_storage=self.codebook.data if training_step else None)
        else:
            transport = wasserstein_loss(latents, codebook, ot_weights, solver=self.solver, costs=costs)
        losses = {"wasserstein": self.beta * scale * transport, **extra}
        quantized = z + (codewords - z).detach()
        return QuantizerOutput(quantized, indices.view(b, h, w), losses, stats)



# From this codebook size "auto" means the global semi-discrete form: where it was measured against the paper's
# per-position form and won (docs/large_codebooks.md). Below it the per-position form keeps every code in use.
LARGE_CODEBOOK = 16_384


def _check_settings(cfg) -> None:
    # Resolved here, once per config, so a run's record holds the form and solver it ran with (and a K = 512 record
    # is what it was before "auto" existed).
    large = cfg.codebook_size >= LARGE_CODEBOOK
    if cfg.form == "auto":
        cfg.form = "global" if large else "per_position"
    if cfg.solver == "auto":
        cfg.solver = "semidiscrete" if large and cfg.form == "global" else "exact"
    if cfg.solver == "semidiscrete" and cfg.form != "global":
        raise ConfigError("quantizer.solver=semidiscrete transports one pi over all positions: add quantizer.form=global")


register(QuantizerSpec(
    name="vqwae",
    description="VQ-WAE (this paper)",
    build=lambda cfg, dim, positions, data_dim: VQWAEQuantizer(
        cfg.codebook_size, dim, positions, beta=cfg.resolved_beta, kl_weight=cfg.kl_weight,
        learn_weights=cfg.weights == "learned", global_transport=cfg.form == "global", init=cfg.init,
        solver=cfg.solver, transport_scope=cfg.transport_scope, potential_step=cfg.potential_step),
    settings=(
        Setting("kl_weight", float, 1.0, expected=">= 0", ok=lambda v: v >= 0),
        Setting("weights", Literal["learned", "uniform"], "learned"),
        # auto: per_position below LARGE_CODEBOOK, global from it
        Setting("form", Literal["auto", "per_position", "global"], "auto"),
        Setting("init", Literal["uniform", "reference"], "uniform"),
        # "exact" (shortest paths over the latents), "dense" (exact, POT's network simplex), "semidiscrete" (the global
        # form against the latent distribution, stage1_tokenizer/semidiscrete.py); auto: semidiscrete for the global
        # form from LARGE_CODEBOOK, else exact
        Setting("solver", Literal["auto", "exact", "dense", "semidiscrete"], "auto"),
        # semidiscrete: the potentials' ascent step, relative to the batch's mean distance to its nearest codeword
        Setting("potential_step", float, 0.1, expected="> 0, e.g. 0.1", ok=lambda v: v > 0),
        # several processes: "local" solves each process's batch, "global_batch" the latents of all processes
        Setting("transport_scope", Literal["local", "global_batch"], "local"),
    ),
    check=_check_settings,
    default_beta=1e-3,  # the weight of the Wasserstein term
    order=90,
))
