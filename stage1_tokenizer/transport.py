"""Exact optimal-transport loss of VQ-WAE, batched over latent positions.

``wasserstein_loss(latents, codebook, weights)`` returns

    sum_m  W( sum_k weights[m, k] delta(codebook[k]),  (1/B) sum_i delta(latents[m, i]) )

with W the exact (unregularized) optimal-transport cost for the squared Euclidean ground cost. Its
gradients are those of POT's ``ot.emd2`` (torch backend) applied position by position:
d/d(cost matrix) = optimal plan, d/d(weights[m]) = u_m - mean(u_m) with u_m the codeword-side dual
potential; the latents/codebook gradients are the plan's (``_TransportLoss``), with no autograd graph
through the (M, K, B) cost tensor.

Design
- The cost is built on the inputs' device by one matrix product, laid out (M, B, K) (latent-major: each
  position's B x K block contiguous, as the shortest-path solver reads it). On the CPU the solvers read it,
  the latents and the codebook in place (float32 or float64; no host copy); from an accelerator they come in
  one transfer. The M problems are solved in a module-level thread pool (the solvers release the GIL; the
  caller's thread takes a share).
- An optimal plan has about K + B nonzeros out of K * B, so the solvers never hand back a dense plan: each
  position's plan is kept compactly (one latent and mass per codeword, plus the few split codewords;
  ``plan_buffers``), and what the gradients need (P codebook and P's row sums per position, P^T latents and the
  column sums summed over positions) is formed from those in float64, codeword-major over all positions, one range
  of codewords per thread. Sums are added in a fixed order, so the gradients do not depend on thread timing.
  Potentials and products go back to an accelerator in one copy.
- ``transport_costs`` is every latent's squared distance to every codeword: a quantizer that also needs the
  nearest codewords (VQ-WAE) takes them from it and passes it in (``costs=``), one distance matrix per step.
- Each weights row is renormalized in float64 before solving (float32 softmax rows sum to 1 only
  within ~1e-7), so the solver's mass balance holds.
- A solver never returns an unverified answer: POT's network simplex must report optimality (else
  ``RuntimeError``: a silently wrong gradient is worse than a stopped run; raise ``num_iter_max``), and the
  shortest-path solver certifies each position by its duality gap or hands it to the network simplex
  with a warning.
- Zero-weight codewords follow POT: the network simplex drops them, and their potentials are set
  by ``ot.lp.estimate_dual_null_weights``' rule, after POT's centering (the shortest-path solver gives
  them the same value: the largest feasible one). With such codewords the weights gradient is one valid
  choice among many, as in POT.
- With uniform weights the problem is degenerate: the optimal dual is not unique, so the weights
  gradient may differ from another solver's by a different (equally valid) optimal dual.
- The solve runs synchronously: solver threads running beside the caller's next PyTorch ops oversubscribe a
  small CPU, so the step waits for the plans instead of overlapping them with the decoder.

Solvers
- ``"exact"`` (default): exact. Successive shortest paths over the B latents (``shortest_path_solver``,
  numba), which exploits K >> B; used where B <= 128 and K >= 4B, the network simplex elsewhere (where it is as
  fast or faster: ``make bench``, scaling section).
- ``"dense"``: exact, POT's network simplex (``ot.emd``) on every position; the reference the tests and the
  benchmark compare against. (Column generation over a sparse edge set was also tried: slower.)
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from configio.errors import NonFiniteValues

from .shortest_path_solver import (
    NON_FINITE,
    OK,
    STATUS_NAMES,
    plan_buffers,
    plan_extra_products,
    plan_products,
    record_dense_plan,
    result_buffers,
    solve_positions,
)

__all__ = [
    "wasserstein_loss",
    "get_num_threads",
    "DEFAULT_SOLVER",
    "SOLVERS",
]

SOLVERS = ("exact", "dense")
DEFAULT_SOLVER = "exact"
_MASS_TOL = 1e-13  # latent marginals balance to this (weights are normalized to total mass 1)
_GAP_TOL = 1e-9  # certified duality gap, relative to the largest cost entry
# Up to this many latents per position the shortest-path solver is faster than POT's network simplex (make bench's
# scaling section measures both); beyond it, and where K < 4B, "exact" runs the simplex.
_MAX_SHORTEST_PATH_LATENTS = 128
# The network simplex's default iteration limit: a bound, not a cost (an optimal solve stops earlier).
_MIN_ITERATIONS = 100_000
_ITERATIONS_PER_ARC = 10
_OPTIMAL = 1  # result code of POT's network simplex
_RESULT_NAMES = {0: "infeasible", 1: "optimal", 2: "unbounded", 3: "max_iter_reached"}

# ----------------------------------------------------------------------------------------------
# thread pool

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def get_num_threads() -> int:
    """Number of worker threads the solvers use: min(os.cpu_count(), torch threads)."""
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != n:  # noqa: SLF001
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="vqwae-ot")
        return _pool


def _run(fn, items) -> list:
    """fn over items, in the solver threads; the results in order. Runs inline when one thread is enough."""
    n = get_num_threads()
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    pool = _get_pool(n)
    n = min(n, len(items))
    # Strided chunks, one per thread, keep the per-task overhead small; the caller's thread takes the first chunk.
    chunks = [items[i::n] for i in range(n)]
    work = lambda chunk: [fn(x) for x in chunk]  # noqa: E731
    futures = [pool.submit(work, chunk) for chunk in chunks[1:]]
    parts = [work(chunks[0])] + [fut.result() for fut in futures]
    out = [None] * len(items)
    for i, part in enumerate(parts):
        out[i::n] = part
    return out


# ----------------------------------------------------------------------------------------------
# per-problem solvers (costs float32 or float64, weights and results float64)


def _check(rc: int, m: int) -> None:
    if rc != _OPTIMAL:
        raise RuntimeError(
            f"network simplex did not reach optimality for position {m} "
            f"(result: {_RESULT_NAMES.get(rc, rc)}); increase num_iter_max"
        )


def _solve_dense(a, b, C_t, num_iter_max, m):
    """Full network simplex on one problem given its transposed cost C_t (B, K); returns the plan transposed (B, K),
    cost, u, v (POT's: duals centred, zero-weight codewords dropped from the solve and given the largest feasible
    potential).

    POT's public ``ot.emd``: its private ``emd_c`` with the same post-processing was measured no faster."""
    if not np.isfinite(C_t).all():
        raise NonFiniteValues("the transport cost or the code weights contain NaN/inf")
    import ot  # POT takes most of a second to import (scipy.stats): only where the network simplex runs

    plan, log = ot.emd(a, b, np.ascontiguousarray(C_t.T, dtype=np.float64), numItermax=num_iter_max, log=True)
    _check(log["result_code"], m)
    return plan.T, log["cost"], log["u"], log["v"]


def _uses_shortest_paths(K: int, B: int) -> bool:
    return B <= _MAX_SHORTEST_PATH_LATENTS and 4 * B <= K


def _solve_dense_into(a, b, C_t, m, results, plan, num_iter_max):
    """``_solve_dense`` for position m into ``results`` (``result_buffers``), its plan recorded in ``plan``
    (``plan_buffers``)."""
    plan_t, results.costs[m], results.code_potentials[m], results.latent_potentials[m] = _solve_dense(
        a, b, C_t, num_iter_max, m)
    if not record_dense_plan(plan_t, m, plan, results.row_sums[m]):  # a basic solution splits at most B - 1 codewords
        raise RuntimeError(f"network simplex plan at position {m} splits more codewords than a basic solution can")


def _solve_exact_chunk(C_t, A, b, positions, results, plan, num_iter_max):
    """Shortest-path solver over some positions (``shortest_path_solver``); POT's network simplex for a position
    where it cannot certify optimality (never seen; a warning says so, and the test suite turns it into an error)."""
    solve_positions(C_t, A, b, positions, results, plan, _MASS_TOL, _GAP_TOL)
    status = results.status
    for m in positions[status[positions] != OK]:
        if status[m] == NON_FINITE:
            raise NonFiniteValues("the transport cost or the code weights contain NaN/inf")
        warnings.warn(f"shortest-path OT solver: {STATUS_NAMES[int(status[m])]} at position {m}; "
                      "solved with POT's network simplex instead", RuntimeWarning, stacklevel=2)
        _solve_dense_into(A[m], b, C_t[m], m, results, plan, num_iter_max)


def solve_batch(C_t, a, Z, codebook, solver: str = DEFAULT_SOLVER, num_iter_max: int = 100_000):
    """Solve M problems given their costs transposed, C_t (M, B, K), weights a (M, K) (rows summing to 1,
    float64), latents Z (M, B, D) and codebook (K, D); returns costs (M,), potentials u (M, K), and the plans'
    products the gradients need: Pc (M, B, D) = P_m codebook, Ps (M, B) = P_m's row sums, PTz (K, D) = sum over m
    of P_m^T Z[m], Pcol (K,) = P's column sums summed over positions. The plans themselves (K + B nonzeros or so out
    of K * B) stay in compact buffers (``plan_buffers``)."""
    Mn, B, K = C_t.shape
    D = Z.shape[2]
    b = np.full(B, 1.0 / B)
    results = result_buffers(Mn, K, B)
    plan = plan_buffers(Mn, K, B)
    n = max(1, min(get_num_threads(), Mn))
    shortest = solver == "exact" and _uses_shortest_paths(K, B)
    # Each thread pulls small runs of positions until none is left (positions differ in cost).
    pieces = np.array_split(np.arange(Mn), min(Mn, 4 * n))
    taken = itertools.count()  # next() is atomic under the GIL

    def solve(_):
        while (j := next(taken)) < len(pieces):
            if shortest:
                _solve_exact_chunk(C_t, a, b, pieces[j], results, plan, num_iter_max)
                continue
            for m in pieces[j]:
                _solve_dense_into(a[m], b, C_t[m], m, results, plan, num_iter_max)

    _run(solve, list(range(n)))
    # The products, one range of codewords per thread (each its own part of Pc, added in order): the gradients do not
    # depend on thread timing.
    bounds = np.linspace(0, K, n + 1).astype(np.int64)
    Pc_parts = np.zeros((n, Mn, B, D))
    PTz, Pcol = np.empty((K, D)), np.empty(K)
    _run(lambda r: plan_products(plan, Z, codebook, bounds[r], bounds[r + 1], Pc_parts[r], PTz, Pcol),
         list(range(n)))
    Pc = Pc_parts.sum(0)
    plan_extra_products(plan, Z, codebook, Pc, PTz, Pcol)
    return results.costs, results.code_potentials, Pc, results.row_sums, PTz, Pcol


# ----------------------------------------------------------------------------------------------
# autograd


class _TransportLoss(torch.autograd.Function):
    """The loss given what its gradients need from the optimal plan P (computed outside autograd).

    With C[m, k, i] = ||c_k - z_mi||^2 and the plan held fixed (envelope theorem):
    d/dz_mi = 2 (sum_k P[m, k, i]) z_mi - 2 sum_k P[m, k, i] c_k = 2 (Ps z - Pc)[m, i],
    d/dc_k = 2 (sum_mi P[m, k, i]) c_k - 2 sum_mi P[m, k, i] z_mi = 2 (Pcol c - PTz)[k], d/dweights = u (the centred
    codeword potentials). No autograd graph through the (M, K, B) cost tensor, and no dense plan kept."""

    @staticmethod
    def forward(ctx, latents, codebook, weights, value, from_plan):
        """from_plan: (Pc, Ps, PTz, Pcol, u) as ``_solve_host`` returns them after the value."""
        ctx.save_for_backward(latents, codebook, *from_plan)
        return value

    @staticmethod
    def backward(ctx, grad):
        latents, codebook, Pc, Ps, PTz, Pcol, u = ctx.saved_tensors
        g_z = g_c = g_w = None
        two = 2.0 * grad
        if ctx.needs_input_grad[0]:
            g_z = two * (Ps[:, :, None] * latents - Pc)
        if ctx.needs_input_grad[1]:
            g_c = two * (Pcol[:, None] * codebook - PTz)
        if ctx.needs_input_grad[2]:
            g_w = grad * u
        return g_z, g_c, g_w, None, None


def _solve_host(cost_t, latents, codebook, weights, solver, num_iter_max):
    """Solve on the host; returns the value and what ``_TransportLoss`` needs, on the inputs' device and in their dtype."""
    # The solvers read the cost, latents and codebook in their dtype (float32 or float64), on the CPU without a copy,
    # from an accelerator in one transfer; the weights are normalized in float64.
    Mn, B, K = cost_t.shape
    D = latents.shape[2]
    latents, codebook, weights = latents.detach(), codebook.detach(), weights.detach()
    if cost_t.device.type == "cpu":
        C_t, Z, cb = cost_t.numpy(), latents.contiguous().numpy(), codebook.contiguous().numpy()
        a = weights.to(torch.float64).numpy()
    else:
        parts = [cost_t.reshape(-1), latents.reshape(-1), codebook.reshape(-1), weights.reshape(-1)]
        host = torch.cat(parts).cpu().numpy()
        ends = np.cumsum([x.numel() for x in parts])
        C_t = host[: ends[0]].reshape(Mn, B, K)
        Z = host[ends[0] : ends[1]].reshape(Mn, B, D)
        cb = host[ends[1] : ends[2]].reshape(K, D)
        a = host[ends[2] :].reshape(Mn, K).astype(np.float64)
    if not np.isfinite(a).all():  # the cost is checked by the solvers, position by position
        raise NonFiniteValues("the transport cost or the code weights contain NaN/inf")
    total = a.sum(1, keepdims=True)
    if (a < 0).any() or (total <= 0).any():
        raise ValueError("weights must be nonnegative with positive row sums")
    a = a / total
    costs, U, *products = solve_batch(C_t, a, Z, cb, solver, num_iter_max)
    arrays = [*products, U - U.mean(1, keepdims=True)]  # Pc, Ps, PTz, Pcol, centred u
    dtype, device = cost_t.dtype, cost_t.device
    value = torch.as_tensor(costs.sum(), dtype=dtype, device=device)
    if device.type == "cpu":
        return value, *(torch.from_numpy(x).to(dtype) for x in arrays)
    # One copy back to the device.
    back = torch.from_numpy(np.concatenate([x.reshape(-1) for x in arrays])).to(device=device, dtype=dtype)
    return value, *(t.view(x.shape) for t, x in zip(back.split([x.size for x in arrays]), arrays))


def _pairwise_sqdist(codebook: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(M, K, B) squared Euclidean distances ||codebook[k] - latents[m, i]||^2 (differentiable)."""
    c2 = codebook.pow(2).sum(-1)  # (K,)
    z2 = latents.pow(2).sum(-1)  # (M, B)
    cross = torch.einsum("kd,mbd->mkb", codebook, latents)
    return (c2[None, :, None] + z2[:, None, :] - 2.0 * cross).clamp_min(0.0)


@torch.no_grad()
def transport_costs(codebook: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The costs ``wasserstein_loss`` transports under, (M, B, K): ``_pairwise_sqdist`` transposed, without autograd,
    one matrix product and in-place updates. A quantizer that also needs each latent's nearest codeword takes the
    argmin over K of these and passes them on (``costs=``), instead of a second (M * B, K) distance matrix."""
    Mn, B, D = latents.shape
    flat = latents.reshape(Mn * B, D)
    cost_t = torch.addmm(codebook.pow(2).sum(-1)[None, :], flat, codebook.T, alpha=-2.0)
    cost_t.add_(flat.pow(2).sum(-1)[:, None]).clamp_min_(0.0)
    return cost_t.view(Mn, B, -1)


def wasserstein_loss(
    latents: torch.Tensor,
    codebook: torch.Tensor,
    weights: torch.Tensor,
    *,
    solver: str = DEFAULT_SOLVER,
    num_iter_max: int | None = None,
    costs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over positions m of the OT cost between sum_k weights[m,k] delta(codebook[k]) and
    the uniform empirical measure of latents[m] (mass 1/B each), squared Euclidean cost.

    latents (M, B, D), codebook (K, D), weights (M, K) nonnegative with rows summing to 1.
    Computed in the inputs' dtype (float32 or float64) on their device; returns a scalar.
    solver: "exact" (``DEFAULT_SOLVER``: shortest paths over the latents) or "dense" (exact, POT's network simplex).
    costs: ``transport_costs(codebook, latents)`` when the caller has it already (same dtype and device).
    num_iter_max: the network simplex's iteration limit; by default it grows with the problem (a pooled 2,048 x
    2,048 problem needs more than POT's default of 100,000). Raises RuntimeError if it does not report optimality.
    """
    if latents.dim() != 3:
        raise ValueError(f"latents must have shape (M, B, D), got {tuple(latents.shape)}")
    Mn, B, D = latents.shape
    if codebook.dim() != 2 or codebook.shape[1] != D:
        raise ValueError(f"codebook must have shape (K, D) with D = {D}, got {tuple(codebook.shape)}")
    K = codebook.shape[0]
    if tuple(weights.shape) != (Mn, K):
        raise ValueError(f"weights must have shape (M, K) = ({Mn}, {K}), got {tuple(weights.shape)}")
    if Mn == 0 or B == 0 or K == 0:
        raise ValueError(f"empty problem: M={Mn}, B={B}, K={K}")
    if not (latents.is_floating_point() and codebook.is_floating_point() and weights.is_floating_point()):
        raise ValueError("latents, codebook and weights must be floating point tensors")
    if latents.device != codebook.device or latents.device != weights.device:
        raise ValueError(
            f"inputs must share one device, got {latents.device}, {codebook.device}, {weights.device}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    dtype = torch.promote_types(torch.promote_types(latents.dtype, codebook.dtype), weights.dtype)
    latents, codebook, weights = latents.to(dtype), codebook.to(dtype), weights.to(dtype)
    if costs is None:
        cost_t = transport_costs(codebook.detach(), latents.detach())
    elif tuple(costs.shape) != (Mn, B, K) or costs.dtype != dtype or costs.device != latents.device:
        raise ValueError(f"costs must be transport_costs(codebook, latents): shape ({Mn}, {B}, {K}), {dtype}, "
                         f"{latents.device}; got {tuple(costs.shape)}, {costs.dtype}, {costs.device}")
    else:
        cost_t = costs.detach()
    if num_iter_max is None:
        num_iter_max = max(_MIN_ITERATIONS, _ITERATIONS_PER_ARC * K * B)
    value, *from_plan = _solve_host(cost_t, latents, codebook, weights, solver, int(num_iter_max))
    return _TransportLoss.apply(latents, codebook, weights, value, tuple(from_plan))
