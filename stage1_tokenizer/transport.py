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
- An optimal plan has about K + B nonzeros out of K * B, so the solvers never hand it back: they return
  what the gradients need, computed from the plan's nonzeros in float64 (P codebook and P's row sums per
  position, P^T latents and the column sums summed over positions; ``solve_positions``), which replaced a
  dense (M, B, K) plan, its conversion and two dense matrix products in the backward (measured on 2 cores,
  trained latents, M = 64, K = 512, B = 32: the term's forward + backward 16.6 ms instead of 23-25 ms).
  Sums over positions are accumulated per run of positions and added in order, so the gradients do not
  depend on thread timing. Potentials and products go back to an accelerator in one copy.
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
- The solve runs synchronously unless overlap is asked for: solver threads running beside the caller's
  next PyTorch ops oversubscribe a small CPU (measured: a slower step).

Solvers
- ``"exact"`` (default): exact. Successive shortest paths over the B latents (``shortest_path_solver``,
  numba), which exploits K >> B: about 4x faster per problem than the network simplex on a trained
  tokenizer's latents at K = 512, B = 32; used where B <= 128 and K >= 4B, the network simplex elsewhere
  (where it is as fast or faster: ``make bench``, scaling section).
- ``"dense"``: exact, POT's network simplex (``emd_c``) on every position; the reference the tests and the
  benchmark compare against. (Column generation over a sparse edge set was also tried: slower.)
- ``"sinkhorn"``: entropic OT, log-domain Sinkhorn in torch on the inputs' device, all positions in
  one batched tensor program (no host transfer). epsilon is relative: eps_m = epsilon * std of the
  doubly-centred cost of position m (row and column shifts of the cost do not change the plan, so
  only the centred part sets the scale). The value is the transport cost <C, P_eps> of the entropic
  plan (no entropy term), the gradients mirror the exact path: d/dC = P_eps, d/dweights = centred
  codeword potential f. Its gap to the exact value is >= 0 and shrinks with epsilon. Measured on the
  latents of a trained Fashion-MNIST tokenizer (64 positions, K = 512, B = 32, float64): relative
  value gap 8.7e-2 / 2.0e-2 / 3.7e-3 at epsilon 0.1 / 0.03 / 0.01, needing about 10 / 630 / >2000
  iterations (latents at one position are tightly clustered, which makes Sinkhorn converge slowly),
  and the plans differ from the exact ones by a total variation of 0.67 / 0.45 / 0.24 per position.
  ``make bench`` re-measures the gap (``sinkhorn``). A ``SinkhornState`` passed by the caller
  warm-starts the codeword potentials from the previous call (they are indexed by position and
  codeword, which persist across steps; the latent side is new every batch).
- ``"auto"``: ``"exact"`` on every device today. On the CPU the exact solve is far cheaper than
  Sinkhorn (every iteration streams the whole (M, K, B) tensor, and hundreds are needed). On an
  accelerator each iteration is a few cheap kernels, but at the iteration counts above (hundreds of
  iterations, ~6 kernel launches each) Sinkhorn costs about as much as the exact host solve, which
  in addition overlaps the decoder (see below) and is exact; ``resolve_solver`` is the one place to
  change this rule once GPU measurements say otherwise.

Overlap: ``start_wasserstein_loss(..., background=True)`` launches the host solve in the solver threads
and returns a handle; the caller does other work (the decoder) and calls ``handle.result()`` for the loss.
Worth it when the networks run on an accelerator (the host cores are otherwise idle); on a 2-core CPU it
is slower than solving first (``make bench``). ``wasserstein_loss`` is ``start_wasserstein_loss(...).result()``.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ot.lp.emd_wrap import emd_c

from .shortest_path_solver import (
    NON_FINITE,
    OK,
    STATUS_NAMES,
    add_plan_products,
    solve_positions,
)

__all__ = [
    "wasserstein_loss",
    "start_wasserstein_loss",
    "resolve_solver",
    "SinkhornState",
    "set_num_threads",
    "get_num_threads",
    "DEFAULT_SOLVER",
    "SOLVERS",
]

SOLVERS = ("exact", "dense", "sinkhorn", "auto")
EXACT_SOLVERS = ("exact", "dense")
AUTO_ACCELERATOR_SOLVER = "exact"
DEFAULT_SOLVER = "exact"
_MASS_TOL = 1e-13  # latent marginals balance to this (weights are normalized to total mass 1)
_GAP_TOL = 1e-9  # certified duality gap, relative to the largest cost entry
# Where the shortest-path solver wins (Gaussian problems, make bench): 2.6x POT's network simplex at B = 32, K = 512,
# 1.9x at B = 64, even at B = 128 (and at K = 4B), slower beyond. Outside that range "exact" runs the simplex.
_MAX_SHORTEST_PATH_LATENTS = 128
_OPTIMAL = 1  # ProblemType code of POT's network simplex
_RESULT_NAMES = {0: "infeasible", 1: "optimal", 2: "unbounded", 3: "max_iter_reached"}

# ----------------------------------------------------------------------------------------------
# thread pool

_pool: ThreadPoolExecutor | None = None
_pool_size: int | None = None  # None: automatic
_pool_lock = threading.Lock()


def _auto_threads() -> int:
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))


def get_num_threads() -> int:
    """Number of worker threads the solvers use (automatic: min(os.cpu_count(), torch threads))."""
    return _pool_size if _pool_size is not None else _auto_threads()


def set_num_threads(n: int | None) -> None:
    """Set the solver thread count (``None`` restores the automatic choice); 1 disables the pool."""
    global _pool, _pool_size
    if n is not None and int(n) < 1:
        raise ValueError(f"number of threads must be >= 1 or None, got {n}")
    with _pool_lock:
        _pool_size = None if n is None else int(n)
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != n:  # noqa: SLF001
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="vqwae-ot")
        return _pool


def _submit(fn, items, background: bool = False):
    """Start fn over items; returns a function that waits and gives the results in order.

    Runs inline when one thread is enough, unless ``background`` asks for the caller's thread to stay free."""
    n = get_num_threads()
    if not background and (n <= 1 or len(items) <= 1):
        out = [fn(x) for x in items]
        return lambda: out
    pool = _get_pool(max(1, n))
    n = max(1, min(n, len(items)))
    # Strided chunks, one per thread, keep the per-task overhead small; unless in the background, the caller's
    # thread takes the first chunk itself.
    chunks = [items[i::n] for i in range(n)]
    work = lambda chunk: [fn(x) for x in chunk]  # noqa: E731
    futures = [pool.submit(work, chunk) for chunk in chunks[0 if background else 1 :]]
    first = None if background else work(chunks[0])

    def join():
        out = [None] * len(items)
        parts = ([] if background else [first]) + [fut.result() for fut in futures]
        for i, part in enumerate(parts):
            out[i::n] = part
        return out

    return join



# ----------------------------------------------------------------------------------------------
# per-problem solvers (costs float32 or float64, weights and results float64)


def _check(rc: int, m: int) -> None:
    if rc != _OPTIMAL:
        raise RuntimeError(
            f"network simplex did not reach optimality for position {m} "
            f"(result: {_RESULT_NAMES.get(rc, rc)}); increase num_iter_max"
        )


def _center_and_fill(u, v, a, b, C):
    """POT's post-processing: center_ot_dual, then estimate_dual_null_weights for zero weights."""
    c = (b @ v - a @ u) / (a.sum() + b.sum())
    u = u + c
    v = v - c
    zero = a == 0
    if zero.any():
        viol = (u[:, None] + v[None, :] - C).max(1)
        u = u - zero * np.maximum(viol, 0.0)
        c = (b @ v - a @ u) / (a.sum() + b.sum())
        u = u + c
        v = v - c
    return u, v


def _solve_dense(a, b, C_t, num_iter_max, m):
    """Full network simplex on one problem given its transposed cost C_t (B, K); returns the plan transposed (B, K),
    cost, u, v (POT-processed)."""
    if not np.isfinite(C_t).all():
        raise ValueError("cost matrix or weights contain NaN/inf")
    C = np.ascontiguousarray(C_t.T, dtype=np.float64)
    keep = a > 0
    if keep.all():
        G, cost, u, v, rc = emd_c(a, b, C, num_iter_max, 1)
        plan_t = G.T
    else:
        Gs, cost, us, vs, rc = emd_c(np.ascontiguousarray(a[keep]), b, np.ascontiguousarray(C[keep]), num_iter_max, 1)
        plan_t = np.zeros(C_t.shape)
        plan_t[:, keep] = Gs.T
        u = np.zeros(a.shape[0])
        u[keep] = us
        v = vs
    _check(rc, m)
    u, v = _center_and_fill(u, v, a, b, C)
    return plan_t, cost, u, v


def _uses_shortest_paths(K: int, B: int) -> bool:
    return B <= _MAX_SHORTEST_PATH_LATENTS and 4 * B <= K


def _solve_exact_chunk(C_t, A, b, Z, codebook, positions, out, PTz, Pcol, num_iter_max):
    """Shortest-path solver over some positions (``shortest_path_solver``); POT's network simplex for a position
    where it cannot certify optimality (never seen; a warning says so)."""
    costs, U, V, Pc, Ps = out
    status = np.zeros(C_t.shape[0], np.int64)
    solve_positions(C_t, A, b, Z, codebook, positions, costs, U, V, status, Pc, Ps, PTz, Pcol, _MASS_TOL, _GAP_TOL)
    for m in positions[status[positions] != OK]:
        if status[m] == NON_FINITE:
            raise ValueError("cost matrix or weights contain NaN/inf")
        warnings.warn(f"shortest-path OT solver: {STATUS_NAMES[int(status[m])]} at position {m}; "
                      "solved with POT's network simplex instead", RuntimeWarning, stacklevel=2)
        plan_t, costs[m], U[m], V[m] = _solve_dense(A[m], b, C_t[m], num_iter_max, m)
        add_plan_products(plan_t, Z[m], codebook, Pc[m], Ps[m], PTz, Pcol)


def submit_batch(C_t, a, Z, codebook, solver: str = DEFAULT_SOLVER, num_iter_max: int = 100_000,
                 background: bool = False):
    """Start solving M problems given their costs transposed, C_t (M, B, K), weights a (M, K) (rows summing to 1,
    float64), latents Z (M, B, D) and codebook (K, D); returns a function that waits and gives costs (M,),
    potentials u (M, K), and the plans' products the gradients need (``solve_positions``): Pc (M, B, D),
    Ps (M, B), PTz (K, D), Pcol (K,). The plans themselves (K + B nonzeros or so out of K * B) never leave
    the solvers."""
    Mn, B, K = C_t.shape
    D = Z.shape[2]
    b = np.full(B, 1.0 / B)
    if solver not in EXACT_SOLVERS:
        raise ValueError(f"host solver must be one of {EXACT_SOLVERS}, got {solver!r}")
    out = np.empty(Mn), np.empty((Mn, K)), np.empty((Mn, B)), np.empty((Mn, B, D)), np.empty((Mn, B))
    costs, U, V, Pc, Ps = out
    n = max(1, min(get_num_threads(), Mn))
    shortest = solver == "exact" and _uses_shortest_paths(K, B)
    # Each thread pulls small runs of positions until none is left (positions differ in cost). The sums over
    # positions go to one accumulator per run, added up in order: the gradients do not depend on which thread
    # took which run.
    pieces = np.array_split(np.arange(Mn), min(Mn, 4 * n))
    PTz, Pcol = np.zeros((len(pieces), K, D)), np.zeros((len(pieces), K))
    taken = itertools.count()  # next() is atomic under the GIL

    def worker(_):
        while (j := next(taken)) < len(pieces):
            if shortest:
                _solve_exact_chunk(C_t, a, b, Z, codebook, pieces[j], out, PTz[j], Pcol[j], num_iter_max)
                continue
            for m in pieces[j]:
                plan_t, costs[m], U[m], V[m] = _solve_dense(a[m], b, C_t[m], num_iter_max, m)
                add_plan_products(plan_t, Z[m], codebook, Pc[m], Ps[m], PTz[j], Pcol[j])

    join = _submit(worker, list(range(n)), background)

    def results():
        join()
        return costs, U, Pc, Ps, PTz.sum(0), Pcol.sum(0)

    return results


# ----------------------------------------------------------------------------------------------
# autograd


class _TransportLoss(torch.autograd.Function):
    """The loss given what its gradients need from the optimal plan P (computed outside autograd).

    With C[m, k, i] = ||c_k - z_mi||^2 and the plan held fixed (envelope theorem):
    d/dz_mi = 2 (sum_k P[m, k, i]) z_mi - 2 sum_k P[m, k, i] c_k = 2 (Ps z - Pc)[m, i],
    d/dc_k = 2 (sum_mi P[m, k, i]) c_k - 2 sum_mi P[m, k, i] z_mi = 2 (Pcol c - PTz)[k], d/dweights = u (the centred
    codeword potentials). No autograd graph through the (M, K, B) cost tensor, and no dense plan kept."""

    @staticmethod
    def forward(ctx, latents, codebook, weights, value, Pc, Ps, PTz, Pcol, u):
        ctx.save_for_backward(latents, codebook, Pc, Ps, PTz, Pcol, u)
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
        return g_z, g_c, g_w, None, None, None, None, None, None


class PendingLoss:
    """A Wasserstein loss whose solve may still be running; ``result()`` waits and returns the scalar."""

    def __init__(self, latents, codebook, weights, join):
        self._inputs, self._join = (latents, codebook, weights), join
        self._value = None

    def result(self) -> torch.Tensor:
        if self._value is None:
            value, Pc, Ps, PTz, Pcol, u = self._join()
            self._value = _TransportLoss.apply(*self._inputs, value, Pc, Ps, PTz, Pcol, u)
            self._inputs = self._join = None
        return self._value


def _start_host(cost_t, latents, codebook, weights, solver, num_iter_max, background):
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
        raise ValueError("cost matrix or weights contain NaN/inf")
    total = a.sum(1, keepdims=True)
    if (a < 0).any() or (total <= 0).any():
        raise ValueError("weights must be nonnegative with positive row sums")
    a = a / total
    wait = submit_batch(C_t, a, Z, cb, solver, num_iter_max, background)
    if not background:
        # Solve now: solver threads running beside the caller's next PyTorch ops oversubscribe the cores.
        done = wait()
        wait = lambda: done  # noqa: E731

    def join():
        costs, U, *products = wait()
        arrays = [*products, U - U.mean(1, keepdims=True)]  # Pc, Ps, PTz, Pcol, centred u
        dtype, device = cost_t.dtype, cost_t.device
        value = torch.as_tensor(costs.sum(), dtype=dtype, device=device)
        if device.type == "cpu":
            return value, *(torch.from_numpy(x).to(dtype) for x in arrays)
        # One copy back to the device.
        back = torch.from_numpy(np.concatenate([x.reshape(-1) for x in arrays])).to(device=device, dtype=dtype)
        return value, *(t.view(x.shape) for t, x in zip(back.split([x.size for x in arrays]), arrays))

    return join


class SinkhornState:
    """What the caller keeps between Sinkhorn calls: the codeword potentials (M, K) of the last solve
    (the warm start of the next one), and diagnostics of that solve."""

    def __init__(self):
        self.potentials: torch.Tensor | None = None
        self.iterations: int = 0
        self.marginal_error: float = float("nan")

    def reset(self) -> None:
        self.__init__()


def _lse_step(logm, pot, C, eps, dim):
    """-eps * logsumexp(logm + (pot - C) / eps) over `dim` (the Sinkhorn half-step in log domain)."""
    return -eps * torch.logsumexp(logm + (pot - C) / eps, dim=dim, keepdim=True)


@torch.no_grad()
def sinkhorn_solve(C, a, epsilon=0.01, state: SinkhornState | None = None, tol=1e-4, max_iter=2000, check_every=10):
    """Batched log-domain Sinkhorn for (M, K, B) costs, (M, K) weights, uniform 1/B on the latent side.

    Returns (plan (M, K, B), transport cost per position (M,), codeword potentials f (M, K)). Runs in C's dtype
    on C's device. Stops when every position's latent-side marginal is within ``tol`` (L1) or at ``max_iter``."""
    Mn, K, B = C.shape
    a = a / a.sum(1, keepdim=True)
    centred = C - C.mean(2, keepdim=True) - C.mean(1, keepdim=True) + C.mean((1, 2), keepdim=True)
    scale = centred.pow(2).mean((1, 2)).sqrt().clamp_min(torch.finfo(C.dtype).tiny)
    eps = (epsilon * scale)[:, None, None]
    loga = a.log()[:, :, None]  # -inf for zero weights: their plan rows vanish, f stays finite
    logb = torch.full((1, 1, B), -math.log(B), dtype=C.dtype, device=C.device)
    warm = state is not None and state.potentials is not None and state.potentials.shape == (Mn, K)
    if warm:
        f = state.potentials.to(C.dtype)[:, :, None]
    else:
        # Cold start: anneal epsilon from the cost scale down to the target, a few sweeps per halving.
        f = torch.zeros(Mn, K, 1, dtype=C.dtype, device=C.device)
        for j in range(max(0, math.ceil(math.log2(1.0 / epsilon))), 0, -1):
            for _ in range(3):
                g = _lse_step(loga, f, C, eps * 2**j, 1)
                f = _lse_step(logb, g, C, eps * 2**j, 2)
    it, err = 0, float("inf")
    while it < max_iter:
        g = _lse_step(loga, f, C, eps, 1)
        f = _lse_step(logb, g, C, eps, 2)
        it += 1
        if it % check_every == 0 or it == max_iter:
            # Rows are exact after the f half-step; the latent side carries the error.
            col = torch.exp(loga + logb + (f + g - C) / eps).sum(1)  # (M, B)
            err = float((col - 1.0 / B).abs().sum(1).max())
            if err <= tol:
                break
    plan = torch.exp(loga + logb + (f + g - C) / eps)
    f = f[:, :, 0]
    if state is not None:
        state.potentials = f.detach().clone()
        state.iterations, state.marginal_error = it, err
    return plan, (plan * C).sum((1, 2)), f


def _start_sinkhorn(cost, latents, codebook, weights, epsilon, state, tol, max_iter):
    C = cost.detach()
    w = weights.detach()
    if not (torch.isfinite(C).all() and torch.isfinite(w).all()):
        raise ValueError("cost matrix or weights contain NaN/inf")
    if (w < 0).any() or (w.sum(1) <= 0).any():
        raise ValueError("weights must be nonnegative with positive row sums")
    plan, costs, f = sinkhorn_solve(C, w, epsilon, state, tol, max_iter)
    value, u = costs.sum(), f - f.mean(1, keepdim=True)
    with torch.no_grad():
        z, c = latents.detach(), codebook.detach()
        plan_t = plan.transpose(1, 2)  # (M, B, K)
        products = (plan_t @ c, plan_t.sum(2), torch.einsum("mkb,mbd->kd", plan, z), plan.sum((0, 2)))
    return lambda: (value, *products, u)


def resolve_solver(solver: str | None, device: torch.device | str) -> str:
    """The solver that runs: None -> DEFAULT_SOLVER; "auto" -> the choice for that device (module docstring)."""
    solver = DEFAULT_SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        # Measured on the CPU; argued for accelerators (module docstring): exact everywhere for now.
        return "exact" if torch.device(device).type == "cpu" else AUTO_ACCELERATOR_SOLVER
    return solver


def _pairwise_sqdist(codebook: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(M, K, B) squared Euclidean distances ||codebook[k] - latents[m, i]||^2 (differentiable)."""
    c2 = codebook.pow(2).sum(-1)  # (K,)
    z2 = latents.pow(2).sum(-1)  # (M, B)
    cross = torch.einsum("kd,mbd->mkb", codebook, latents)
    return (c2[None, :, None] + z2[:, None, :] - 2.0 * cross).clamp_min(0.0)


@torch.no_grad()
def _cost_tensor_t(codebook: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``_pairwise_sqdist`` transposed, (M, B, K), without autograd: one matrix product, then in-place updates."""
    Mn, B, D = latents.shape
    flat = latents.reshape(Mn * B, D)
    cost_t = torch.addmm(codebook.pow(2).sum(-1)[None, :], flat, codebook.T, alpha=-2.0)
    cost_t.add_(flat.pow(2).sum(-1)[:, None]).clamp_min_(0.0)
    return cost_t.view(Mn, B, -1)


def start_wasserstein_loss(
    latents: torch.Tensor,
    codebook: torch.Tensor,
    weights: torch.Tensor,
    *,
    solver: str | None = None,
    num_iter_max: int = 100_000,
    epsilon: float = 0.01,
    state: SinkhornState | None = None,
    tol: float = 1e-4,
    max_iter: int = 2000,
    background: bool = False,
) -> PendingLoss:
    """``wasserstein_loss`` split in two: builds the cost on the inputs' device and starts the solve; with
    ``background=True`` the exact host solve runs in the solver threads while the caller goes on. Call
    ``.result()`` on the handle for the loss (Sinkhorn runs on the device and is done on return)."""
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
    solver = resolve_solver(solver, latents.device)
    if solver == "sinkhorn" and not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    dtype = torch.promote_types(torch.promote_types(latents.dtype, codebook.dtype), weights.dtype)
    latents, codebook, weights = latents.to(dtype), codebook.to(dtype), weights.to(dtype)
    cost_t = _cost_tensor_t(codebook.detach(), latents.detach())
    if solver == "sinkhorn":
        join = _start_sinkhorn(cost_t.transpose(1, 2), latents, codebook, weights, float(epsilon), state, float(tol),
                               int(max_iter))
    else:
        join = _start_host(cost_t, latents, codebook, weights, solver, int(num_iter_max), background)
    return PendingLoss(latents, codebook, weights, join)


def wasserstein_loss(
    latents: torch.Tensor,
    codebook: torch.Tensor,
    weights: torch.Tensor,
    *,
    solver: str | None = None,
    num_iter_max: int = 100_000,
    epsilon: float = 0.01,
    state: SinkhornState | None = None,
    tol: float = 1e-4,
    max_iter: int = 2000,
) -> torch.Tensor:
    """Sum over positions m of the OT cost between sum_k weights[m,k] delta(codebook[k]) and
    the uniform empirical measure of latents[m] (mass 1/B each), squared Euclidean cost.

    latents (M, B, D), codebook (K, D), weights (M, K) nonnegative with rows summing to 1.
    Computed in the inputs' dtype (float32 or float64) on their device; returns a scalar.
    solver: "exact" (shortest paths over the latents), "dense" (exact, POT's network simplex), "sinkhorn"
    (entropic, relative ``epsilon``, optional warm ``state``, stops at latent-marginal L1 error ``tol`` or
    ``max_iter``) or "auto" (see the module docstring); None picks ``DEFAULT_SOLVER`` ("exact").
    Raises RuntimeError if the network simplex does not report optimality.
    """
    return start_wasserstein_loss(
        latents, codebook, weights, solver=solver, num_iter_max=num_iter_max, epsilon=epsilon, state=state,
        tol=tol, max_iter=max_iter,
    ).result()
