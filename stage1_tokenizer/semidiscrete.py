"""Semi-discrete optimal transport for VQ-WAE at large codebooks: the codebook against the latent distribution itself.

The exact form transports pi to the latents of one batch. When K is far above the number of latents a problem holds
(K = 16,384 codewords against 32 latents per position, or 2,048 pooled over a batch), each latent takes many
codewords and the plan pulls them together. This form instead transports pi to the distribution the batches are
drawn from, through its semi-dual (Genevay et al., 2016):

    W(pi, P_Z) = max_u  sum_k pi_k u_k + E_z [ min_k ( ||z - c_k||^2 - u_k ) ]

The codeword potentials u are state: every step assigns each latent to its Laguerre cell, argmin_k (C_ik - u_k), and
takes one stochastic ascent step on u (raise the potential of a codeword that got less than its mass pi_k, lower it
where it got more), so the potentials carry what past batches said about the distribution. A step's loss is the
semi-dual at the current u on its batch: every latent is pulled toward the codeword it is transported to, every
codeword toward the mean of the latents of its cell, and pi gets the gradient u, as the exact form's plan and dual
give them. One (N, K) distance matrix per step, the one the nearest-codeword lookup needs anyway.

Two things the ascent cannot do on a moving encoder are done directly: the codebook starts as the first batch's
latents, and a codeword that took no latent over the last K latents is moved onto one (`_relocate_idle`).

It is an approximation of the exact term, and says by how much: `certificate` bounds the exact W between pi and the
empirical measure of any set of latents from both sides, with the dual value at u below and a feasible plan above
(the Laguerre assignment, cut down to each codeword's mass, the rest spread by a product coupling).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .distributed import all_reduce, broadcast_from_first, world_size

# Rows of latents per block when a certificate scans many latents: a (rows, K) block of about 2^22 entries.
_BLOCK_ENTRIES = 1 << 22
# The largest potential step, in units of the step a codeword that is never chosen takes (K pi_k = 1 when uniform).
_MAX_STEP_UNITS = 8.0
# Codebook initialization: the noise added to the drawn latents, relative to the latents' spread in each dimension.
_INIT_JITTER = 0.1


def laguerre_assignment(costs: torch.Tensor, potentials: torch.Tensor) -> torch.Tensor:
    """Each latent's codeword under the potentials: argmin_k (costs[i, k] - potentials[k]); costs (N, K)."""
    return (costs - potentials[None, :]).argmin(dim=1)


class Certificate(NamedTuple):
    lower: float  # the semi-dual at the potentials: at most the exact W
    upper: float  # the cost of a feasible plan: at least the exact W

    @property
    def relative_gap(self) -> float:
        return (self.upper - self.lower) / max(abs(self.upper), 1e-300)


class SemiDiscreteTransport(torch.nn.Module):
    """The codeword potentials and their stochastic ascent; the loss on one batch.

    `step_size` scales the ascent step relative to the batch's mean margin between each latent's best and second-best
    codeword, so the step follows the scale of the latents as training changes it.
    """

    def __init__(self, codebook_size: int, step_size: float):
        super().__init__()
        self.step_size = step_size
        # Persistent: a resumed run continues from the potentials it stopped with.
        self.register_buffer("potentials", torch.zeros(codebook_size))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Steps since each codeword last took a latent (summed over processes).
        self.register_buffer("idle_steps", torch.zeros(codebook_size, dtype=torch.long))
        # Whether `initialized` was seen True: reading the buffer is a device sync, paid once rather than every step.
        self._initialized_seen = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._initialized_seen = False  # the loaded `initialized` decides
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def initialize_codebook(self, codebook: torch.Tensor, latents: torch.Tensor) -> bool:
        """On the first training step, codewords drawn from the batch's latents (with repeats when K > N); True if
        it did. A collapsed start (every codeword at one point) would leave the assignment to the potentials alone,
        and one codeword would take the whole batch and a potential step thousands of times too large."""
        if self._initialized_seen or bool(self.initialized):
            self._initialized_seen = True
            return False
        chosen = torch.randint(len(latents), (len(codebook),), device=latents.device)
        # Copies of one latent (K > N) would stay one point: a codeword's update is the mean of its cell, and equal
        # codewords share one cell. A jitter well below the latents' spread separates them.
        jitter = _INIT_JITTER * latents.std(dim=0, keepdim=True) * torch.randn(len(codebook), latents.shape[1],
                                                                                device=latents.device)
        codebook.copy_((latents[chosen] + jitter).to(codebook.dtype))
        broadcast_from_first(codebook)
        self.initialized.fill_(True)
        self._initialized_seen = True
        return True

    def forward(self, latents: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor, costs: torch.Tensor,
                codebook_storage: torch.Tensor | None = None) -> torch.Tensor:
        """The semi-dual on this batch (a scalar), differentiable in latents (N, D), codebook (K, D), weights (K,).

        costs: the (N, K) squared distances, detached. On a training step, pass the codebook parameter's storage as
        `codebook_storage`: the potentials then take one ascent step and idle codewords are moved (`_relocate_idle`).
        A batch's value is no bound worth reporting when K > N (each latent would have to split over codewords);
        `certificate` over many latents (a split's) bounds the exact W.
        """
        potentials = self.potentials.detach().clone()
        reduced = (costs - potentials[None, :]).topk(2, dim=1, largest=False)
        assignment = reduced.indices[:, 0]
        transported = latents - codebook[assignment]
        value = transported.pow(2).sum(1).mean() - potentials[assignment].mean() + (weights * potentials).sum()
        if codebook_storage is not None:
            margin = (reduced.values[:, 1] - reduced.values[:, 0]).sum()
            self._ascend(assignment, margin, weights.detach())
            self._relocate_idle(codebook_storage, latents.detach(), costs.gather(1, assignment[:, None])[:, 0],
                                assignment)
        return value

    @torch.no_grad()
    def _ascend(self, assignment: torch.Tensor, margin: torch.Tensor, weights: torch.Tensor) -> None:
        K = len(weights)
        counts = torch.bincount(assignment, minlength=K).to(weights.dtype)
        totals = all_reduce(torch.cat([counts, torch.stack([margin.to(weights.dtype),
                                                                 weights.new_tensor(len(assignment))])]))
        loads, scale = totals[:K] / totals[K + 1], totals[K] / totals[K + 1]
        self.idle_steps.add_(1).masked_fill_(totals[:K] > 0, 0)
        # The semi-dual's gradient in u_k is pi_k - load_k. Its unit is the batch's mean margin between a latent's
        # best and second-best codeword (the price change that moves a latent, as an auction's bid increment), per
        # unit of mass 1/K; the distances themselves are no unit, since in 64 dimensions they dwarf their differences.
        # Bounded: early on one codeword can take hundreds of a batch's latents, and an unbounded step would push its
        # potential so far down that it stays unused for thousands of steps (a trust region on u).
        excess = (K * (weights - loads)).clamp(-_MAX_STEP_UNITS, _MAX_STEP_UNITS)
        potentials = self.potentials + self.step_size * scale * excess
        # The semi-dual does not change when every potential moves by one constant: keep sum_k pi_k u_k at 0.
        self.potentials.copy_(potentials - (weights * potentials).sum())

    @torch.no_grad()
    def _relocate_idle(self, codebook: torch.Tensor, latents: torch.Tensor, latent_costs: torch.Tensor,
                       assignment: torch.Tensor) -> None:
        """Codewords that took no latent over the last batches that held K latents move onto latents of this batch.

        The ascent alone does not bring them back: an unused codeword's potential rises one unit a step while an
        overloaded one falls by up to _MAX_STEP_UNITS, one unit moves few latents in a packed codebook, and a codeword
        left behind by the moving encoder gets no gradient at all. The latents are drawn in proportion to their
        transport cost (where the codebook serves the data worst, as k-means++ seeds), and the moved codeword takes the
        potential of the codeword that latent was sent to, so it wins that latent's neighbourhood at the next step.
        Every process takes process 0's draw, so the codebooks stay equal.
        """
        patience = max(1, round(len(self.potentials) / (len(latents) * world_size())))
        idle = (self.idle_steps >= patience).nonzero()[:, 0]
        if len(idle) == 0:
            return
        chosen = torch.multinomial(latent_costs.float().clamp_min(1e-12), len(idle), replacement=True)
        moved = torch.cat([latents[chosen].to(codebook.dtype),
                           self.potentials[assignment[chosen]][:, None].to(codebook.dtype)], dim=1)
        broadcast_from_first(moved)
        codebook[idle] = moved[:, :-1]
        self.potentials[idle] = moved[:, -1].to(self.potentials.dtype)
        self.idle_steps[idle] = 0


@torch.no_grad()
def certificate(latents: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor, potentials: torch.Tensor,
                costs: torch.Tensor | None = None) -> Certificate:
    """Bounds on the exact W between sum_k weights_k delta(codebook_k) and the uniform measure on latents (N, D).

    lower: sum_k w_k u_k + mean_i min_k (C_ik - u_k), a dual-feasible value for any u (weak duality).
    upper: the Laguerre assignment keeps min(1, w_k / load_k) of each latent it sends to codeword k; the mass left
    on both sides (equal in total) is coupled by its product measure, whose cost needs no (N, K) matrix.
    In float64; `costs`, the (N, K) squared distances when a step has them, else computed over blocks of latents, so
    N may be large (a whole split's latents).
    """
    latents, codebook = latents.double(), codebook.double()
    weights, potentials = weights.double() / weights.double().sum(), potentials.double()
    K = len(codebook)
    code_norms = codebook.pow(2).sum(1)
    blocks = [costs] if costs is not None else (
        (torch.addmm(code_norms, block, codebook.T, alpha=-2.0) + block.pow(2).sum(1, keepdim=True)).clamp_min(0)
        for block in latents.split(max(1, _BLOCK_ENTRIES // K)))
    assignment, assigned_cost = [], []
    for block_costs in blocks:
        chosen = laguerre_assignment(block_costs.to(potentials.dtype), potentials)
        assignment.append(chosen)
        assigned_cost.append(block_costs.gather(1, chosen[:, None])[:, 0].double())
    assignment, assigned_cost = torch.cat(assignment), torch.cat(assigned_cost)
    return _bounds(latents, codebook, code_norms, weights, potentials, assignment, assigned_cost)


def _bounds(latents, codebook, code_norms, weights, potentials, assignment, assigned_cost) -> Certificate:
    N, K = len(latents), len(codebook)
    lower = (weights * potentials).sum() + (assigned_cost - potentials[assignment]).mean()
    loads = torch.bincount(assignment, minlength=K).double() / N
    kept = torch.where(loads > 0, (weights / loads.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(loads))
    kept_per_latent = kept[assignment]
    upper = (kept_per_latent * assigned_cost).sum() / N
    code_left = (weights - loads * kept).clamp_min(0)
    latent_left = (1.0 - kept_per_latent) / N
    left = latent_left.sum()
    if left > 0:
        upper = upper + (code_left * code_norms).sum() + (latent_left * latents.pow(2).sum(1)).sum() \
            - 2.0 * (code_left @ codebook).dot(latent_left @ latents) / left
    return Certificate(float(lower), float(upper))
