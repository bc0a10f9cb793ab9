"""Exact optimal-transport loss of VQ-WAE, batched over latent positions.

``wasserstein_loss(latents, codebook, weights)`` returns

    sum_m  W( sum_k weights[m, k] delta(codebook[k]),  (1/B) sum_i delta(latents[m, i]) )

with W the exact (unregularized) optimal-transport cost for the squared Euclidean ground cost. Its
gradients are those of POT's ``ot.emd2`` (torch backend) applied position by position:
d/d(cost matrix) = optimal plan, d/d(weights[m]) = u_m - mean(u_m) with u_m the codeword-side dual
potential; latents/codebook gradients follow by autograd through the cost tensor, built in torch.

Design
- The (M, K, B) cost tensor is built on the inputs' device, copied to the host once as float64,
  the M problems are solved by POT's C network simplex in a module-level thread pool (the C code
  releases the GIL), and plans/potentials go back to the device in one copy.
- Each weights row is renormalized in float64 before solving (float32 softmax rows sum to 1 only
  within ~1e-7), so the solver's mass balance holds.
- A solver that does not report optimality raises ``RuntimeError`` (a silently wrong gradient is
  worse than a stopped run); raise ``num_iter_max`` if that ever happens.
- Two exact solvers: ``"dense"`` (network simplex on the full K x B problem) and ``"pricing"``
  (column generation: network simplex on a sparse restricted edge set, then a vectorized check of
  dual feasibility on all K*B edges of all M problems, adding violated edges and re-solving with
  warm-started potentials until none is violated). Both return an optimal plan and an optimal,
  complementary-slack dual of the full problem. The default is the one measured faster on the
  reference setting on a 2-core CPU (see ``DEFAULT_SOLVER``).
- Zero-weight codewords follow POT: the network simplex drops them, and their potentials are set
  by ``ot.lp.estimate_dual_null_weights``' rule, after POT's centering. (With such codewords the
  weights gradient is one valid choice among many, as in POT.)
- With uniform weights the problem is degenerate: the optimal dual is not unique, so the weights
  gradient may differ from another solver's by a different (equally valid) optimal dual.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ot.lp.emd_wrap import emd_c, emd_c_sparse

__all__ = ["wasserstein_loss", "set_num_threads", "get_num_threads", "DEFAULT_SOLVER", "SOLVERS"]

SOLVERS = ("dense", "pricing")
DEFAULT_SOLVER = "dense"
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


def _map(fn, items):
    """fn over items, in the module pool when it has more than one thread."""
    global _pool
    n = get_num_threads()
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with _pool_lock:
        if _pool is None or _pool._max_workers != n:  # noqa: SLF001
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="vqwae-ot")
        pool = _pool
    # Contiguous chunks, one per thread, keep the per-task overhead small.
    chunks = [items[i::n] for i in range(n)]
    results = list(pool.map(lambda chunk: [fn(x) for x in chunk], chunks))
    out = [None] * len(items)
    for i, res in enumerate(results):
        out[i::n] = res
    return out


# ----------------------------------------------------------------------------------------------
# per-problem solvers (float64 numpy in, float64 numpy out)


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


def _solve_dense(a, b, C, num_iter_max, m):
    """Full network simplex on one K x B problem; returns plan, cost, u, v (u, v POT-processed)."""
    keep = a > 0
    if keep.all():
        G, cost, u, v, rc = emd_c(a, b, C, num_iter_max, 1)
    else:
        Gs, cost, us, vs, rc = emd_c(np.ascontiguousarray(a[keep]), b, np.ascontiguousarray(C[keep]), num_iter_max, 1)
        G = np.zeros_like(C)
        G[keep] = Gs
        u = np.zeros(a.shape[0])
        u[keep] = us
        v = vs
    _check(rc, m)
    u, v = _center_and_fill(u, v, a, b, C)
    return G, cost, u, v


def _initial_edges(C, a, kn, jn):
    """Boolean (M, K, B) candidate edge mask: for each codeword its kn nearest latents and for each
    latent its jn nearest codewords, ranked on the double-centered cost (which removes the |z|^2 and
    |c|^2 terms that dual potentials absorb), plus the edges of a feasible north-west-corner plan so
    that every restricted problem is feasible."""
    Mn, K, B = C.shape
    R = C - C.mean(2, keepdims=True) - C.mean(1, keepdims=True)
    mask = np.zeros(C.shape, dtype=bool)
    kn = min(kn, B)
    jn = min(jn, K)
    idx = np.argpartition(R, kn - 1, axis=2)[:, :, :kn] if kn < B else np.broadcast_to(np.arange(B), (Mn, K, B))
    np.put_along_axis(mask, idx, True, axis=2)
    idx = np.argpartition(R, jn - 1, axis=1)[:, :jn, :] if jn < K else np.broadcast_to(np.arange(K)[:, None], (Mn, K, B))
    np.put_along_axis(mask, idx, True, axis=1)
    # North-west corner on codewords ordered by their nearest latent: a feasible plan with at most
    # K + B - 1 edges, mostly on cheap edges.
    order = np.argsort(R.argmin(2), axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(a, order, 1), axis=1)
    cum[:, -1] = 1.0
    start = np.concatenate([np.zeros((Mn, 1)), cum[:, :-1]], 1)
    lo = np.minimum(np.floor(start * B).astype(np.int64), B - 1)
    hi = np.clip(np.ceil(cum * B).astype(np.int64) - 1, lo, B - 1)
    j = np.arange(B)
    nw = (j >= lo[:, :, None]) & (j <= hi[:, :, None])
    rows = np.arange(Mn)[:, None]
    mask[rows, order] |= nw
    return mask


def _solve_sparse(a, b, C, mask, num_iter_max, warm):
    s, t = np.nonzero(mask)
    if warm is None:
        out = emd_c_sparse(a, b, s.astype(np.uint64), t.astype(np.uint64), C[s, t], num_iter_max)
    else:
        out = emd_c_sparse(a, b, s.astype(np.uint64), t.astype(np.uint64), C[s, t], num_iter_max, warm[0], warm[1])
    fs, ft, fv, cost, u, v, rc = out
    return fs, ft, fv, cost, u, v, rc


def _solve_pricing(C, a, b, num_iter_max, kn=3, jn=24, max_rounds=50):
    """Column generation over all M problems; returns plans, costs, u, v like the dense path."""
    Mn, K, B = C.shape
    plans = np.zeros_like(C)
    costs = np.zeros(Mn)
    U = np.zeros((Mn, K))
    V = np.zeros((Mn, B))
    # Problems with zero-weight codewords take the dense path (POT's null-weight handling).
    dense_ids = [m for m in range(Mn) if not (a[m] > 0).all()]
    active = np.array([m for m in range(Mn) if (a[m] > 0).all()], dtype=np.int64)
    if len(active):
        mask = _initial_edges(C[active], a[active], kn, jn)
        scale = np.abs(C[active]).reshape(len(active), -1).max(1)
        tol = 1e-11 * np.maximum(scale, 1e-300)
        pos = np.arange(len(active))  # indices (into `active`) still being priced
        finished = np.zeros(len(active), dtype=bool)
        warm = [None] * len(active)
        for _ in range(max_rounds):
            res = _map(lambda i: _solve_sparse(a[active[i]], b, C[active[i]], mask[i], num_iter_max, warm[i]), list(pos))
            for i, r in zip(pos, res):
                _check(r[6], int(active[i]))
            u = np.stack([r[4] for r in res])
            v = np.stack([r[5] for r in res])
            red = C[active[pos]] - u[:, :, None] - v[:, None, :]
            viol = red < -tol[pos, None, None]
            bad = viol.reshape(len(pos), -1).any(1)
            for i, r, is_bad in zip(pos, res, bad):
                if not is_bad:
                    m = int(active[i])
                    fs, ft, fv, cost, uu, vv, _ = r
                    plans[m][fs.astype(np.int64), ft.astype(np.int64)] = fv
                    costs[m] = cost
                    U[m], V[m] = _center_and_fill(uu, vv, a[m], b, C[m])
                    finished[i] = True
            if not bad.any():
                break
            # Add, per codeword and per latent, its most violated edge (partial pricing).
            pb = pos[bad]
            red_b = np.where(viol[bad], red[bad], np.inf)
            rows = np.arange(len(pb))[:, None]
            jmin = red_b.argmin(2)
            kmin = red_b.argmin(1)
            sub = mask[pb]
            has_k = np.isfinite(np.take_along_axis(red_b, jmin[:, :, None], 2)[:, :, 0])
            has_j = np.isfinite(np.take_along_axis(red_b, kmin[:, None, :], 1)[:, 0, :])
            sub[rows, np.arange(K)[None, :], jmin] |= has_k
            sub[rows, kmin, np.arange(B)[None, :]] |= has_j
            mask[pb] = sub
            for i, uu, vv in zip(pb, u[bad], v[bad]):
                warm[i] = (np.ascontiguousarray(uu), np.ascontiguousarray(vv))
            pos = pb
        # Safety net (never observed): problems still violating after max_rounds go dense.
        dense_ids.extend(int(active[i]) for i in np.nonzero(~finished)[0])
    if dense_ids:
        res = _map(lambda m: _solve_dense(a[m], b, C[m], num_iter_max, m), dense_ids)
        for m, (G, cost, u, v) in zip(dense_ids, res):
            plans[m], costs[m], U[m], V[m] = G, cost, u, v
    return plans, costs, U, V


def solve_batch(C: np.ndarray, a: np.ndarray, solver: str = DEFAULT_SOLVER, num_iter_max: int = 100_000):
    """Solve M problems (C: (M, K, B) float64, a: (M, K) float64 rows summing to 1, b uniform).

    Returns plans (M, K, B), costs (M,), u (M, K), v (M, B) (potentials POT-centered)."""
    Mn, K, B = C.shape
    b = np.full(B, 1.0 / B)
    if solver == "dense":
        res = _map(lambda m: _solve_dense(a[m], b, C[m], num_iter_max, m), list(range(Mn)))
        plans = np.stack([r[0] for r in res])
        costs = np.array([r[1] for r in res])
        U = np.stack([r[2] for r in res])
        V = np.stack([r[3] for r in res])
        return plans, costs, U, V
    if solver == "pricing":
        return _solve_pricing(C, a, b, num_iter_max)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


# ----------------------------------------------------------------------------------------------
# autograd


class _BatchedEMD2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost, weights, solver, num_iter_max):
        # One host copy of cost and weights, as float64.
        host = torch.cat([cost.detach().reshape(cost.shape[0], -1), weights.detach()], 1).to("cpu", torch.float64)
        host = host.numpy()
        Mn, K, B = cost.shape
        C = np.ascontiguousarray(host[:, : K * B].reshape(Mn, K, B))
        a = np.ascontiguousarray(host[:, K * B :])
        if not np.isfinite(host).all():
            raise ValueError("cost matrix or weights contain NaN/inf")
        total = a.sum(1, keepdims=True)
        if (a < 0).any() or (total <= 0).any():
            raise ValueError("weights must be nonnegative with positive row sums")
        a = a / total
        plans, costs, U, _ = solve_batch(C, a, solver, num_iter_max)
        Uc = U - U.mean(1, keepdims=True)
        back = torch.from_numpy(np.concatenate([plans.reshape(Mn, -1), Uc], 1))
        back = back.to(device=cost.device, dtype=cost.dtype)
        ctx.save_for_backward(back)
        ctx.kb = (K, B)
        return torch.as_tensor(costs.sum(), dtype=cost.dtype, device=cost.device)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        K, B = ctx.kb
        plan = back[:, : K * B].reshape(-1, K, B)
        u = back[:, K * B :]
        g_cost = grad * plan if ctx.needs_input_grad[0] else None
        g_w = grad * u if ctx.needs_input_grad[1] else None
        return g_cost, g_w, None, None


def _pairwise_sqdist(codebook: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(M, K, B) squared Euclidean distances ||codebook[k] - latents[m, i]||^2, exact in autograd."""
    c2 = codebook.pow(2).sum(-1)  # (K,)
    z2 = latents.pow(2).sum(-1)  # (M, B)
    cross = torch.einsum("kd,mbd->mkb", codebook, latents)
    return (c2[None, :, None] + z2[:, None, :] - 2.0 * cross).clamp_min(0.0)


def wasserstein_loss(
    latents: torch.Tensor,
    codebook: torch.Tensor,
    weights: torch.Tensor,
    *,
    solver: str | None = None,
    num_iter_max: int = 100_000,
) -> torch.Tensor:
    """Sum over positions m of the exact OT cost between sum_k weights[m,k] delta(codebook[k]) and
    the uniform empirical measure of latents[m] (mass 1/B each), squared Euclidean cost.

    latents (M, B, D), codebook (K, D), weights (M, K) nonnegative with rows summing to 1.
    Computed in the inputs' dtype (float32 or float64) on their device; returns a scalar.
    solver: "dense" or "pricing" (both exact); None picks ``DEFAULT_SOLVER``.
    Raises RuntimeError if the network simplex does not report optimality.
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
    solver = DEFAULT_SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    dtype = torch.promote_types(torch.promote_types(latents.dtype, codebook.dtype), weights.dtype)
    latents, codebook, weights = latents.to(dtype), codebook.to(dtype), weights.to(dtype)
    cost = _pairwise_sqdist(codebook, latents)
    return _BatchedEMD2.apply(cost, weights, solver, int(num_iter_max))
