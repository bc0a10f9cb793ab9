"""Exact optimal transport between K weighted codewords and B uniform latents, for K much larger than B.

Why a solver of our own: POT's network simplex treats the K x B problem as a generic graph of K + B nodes.
Here the latent side is small (B = 32 against K = 512), so the dual can be searched over the B latent
potentials alone: every codeword goes whole to its cheapest latent under the current potentials, and only
the latents' loads are out of balance. Successive shortest paths then move codeword mass between latents
over a B x B graph whose edge (i, j) is the cheapest move of one of latent i's codewords to latent j.
Each step keeps reduced costs nonnegative and the plan on tight edges, so the result is an exact optimum
(not an approximation), certified at the end by the duality gap; see ``solve_position``.

Two things keep the number of shortest paths small. A sweep of coordinate ascent balances the loads before
the first path (halves the paths). And the problem is first solved with every codeword at the same mass: an
integral problem in which each path moves one whole codeword; the true (near-uniform, learned) masses then
only need small corrections. With the true masses from the start, fractional leftovers multiply the paths by
about 3.5.

Cost per problem on a trained tokenizer's latents (K = 512, B = 32, learned weights within 3% of uniform,
one core): about 0.52 ms, 113 paths (82 + 31), against 2.1 ms for POT's network simplex; the compiled code
is cached (numba ``cache=True``), so only the first run on a machine pays the compilation (seconds).

Layout: C[k, i] = ||codebook[k] - latent[i]||^2 with codeword weights ``a`` (K,) and latent weights ``b`` (B,);
the solver takes C transposed, CT (B, K), and writes the plan transposed, X (B, K): the layout in which one matrix
product gives every cost and the gradient's products read the plan without a copy. Outputs besides X: codeword
potentials q (K,), latent potentials p (B,), with q[k] + p[i] <= C[k, i] everywhere and equality wherever
X[i, k] > 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit

INF = np.inf
# Statuses of solve_position: the caller falls back to POT on NO_PROGRESS or GAP, and rejects NON_FINITE input.
OK, NO_PROGRESS, GAP, NON_FINITE = 0, 1, 2, 3
STATUS_NAMES = {OK: "optimal", NO_PROGRESS: "no augmenting path", GAP: "duality gap above tolerance",
                NON_FINITE: "cost or weights not finite"}


@njit(cache=True, nogil=True)
def _best_two(C, p, k):
    """Smallest and second smallest C[k, j] - p[j] over latents j, and their latents."""
    b1 = INF
    b2 = INF
    i1 = 0
    i2 = 0
    for j in range(C.shape[1]):
        v = C[k, j] - p[j]
        if v < b1:
            b2 = b1
            i2 = i1
            b1 = v
            i1 = j
        elif v < b2:
            b2 = v
            i2 = j
    return b1, b2, i1, i2


@njit(cache=True, nogil=True)
def _balance_potentials(C, CT, a, b, p):
    """One sweep of coordinate ascent on the latent potentials: latent i in turn takes the price at which the
    codewords preferring it weigh b[i]. Cheap and not optimal (the dual is not smooth), but it cuts the
    initial load imbalance, hence the number of shortest paths, by about half."""
    K, B = C.shape
    best1 = np.empty(K)
    best2 = np.empty(K)
    arg1 = np.empty(K, np.int64)
    buf_t = np.empty(K + 1)  # thresholds of the cheapest codewords, sorted, just enough to weigh b[i]
    buf_a = np.empty(K + 1)
    arg2 = np.empty(K, np.int64)
    for k in range(K):
        best1[k], best2[k], arg1[k], arg2[k] = _best_two(C, p, k)
    for i in range(B):
        n = 0
        total = 0.0
        for k in range(K):
            ak = a[k]
            if ak <= 0:
                continue
            # codeword k prefers latent i once p[i] >= t
            t = CT[i, k] - (best2[k] if arg1[k] == i else best1[k])
            if total >= b[i] and t >= buf_t[n - 1]:
                continue
            r = n
            while r > 0 and buf_t[r - 1] > t:
                buf_t[r] = buf_t[r - 1]
                buf_a[r] = buf_a[r - 1]
                r -= 1
            buf_t[r] = t
            buf_a[r] = ak
            n += 1
            total += ak
            while n > 1 and total - buf_a[n - 1] >= b[i]:
                n -= 1
                total -= buf_a[n]
        if n == 0:
            continue
        p[i] = buf_t[n - 1]
        pi = p[i]
        for k in range(K):
            v = CT[i, k] - pi
            # Kept approximately (the second best may go stale): these potentials are only a starting point.
            if arg1[k] == i:
                if v <= best2[k]:
                    best1[k] = v
                else:
                    best1[k] = best2[k]
                    arg1[k] = arg2[k]
                    best2[k] = v
                    arg2[k] = i
            elif v < best1[k]:
                best2[k] = best1[k]
                arg2[k] = arg1[k]
                best1[k] = v
                arg1[k] = i
            elif v < best2[k]:
                best2[k] = v
                arg2[k] = i


@njit(cache=True, nogil=True)
def _shortest_paths(C, X, excess, p, codes, code_pot, count, slot, offset, move, move_code, mass_tol,
                    max_augmentations):
    """Successive shortest paths until every latent balances within mass_tol; returns (status, augmentations)."""
    K, B = C.shape
    dist = np.empty(B)
    done = np.zeros(B, np.bool_)
    pred = np.empty(B, np.int64)
    hop_from = np.empty(B, np.int64)
    hop_to = np.empty(B, np.int64)
    hop_code = np.empty(B, np.int64)
    augmentations = 0
    while True:
        # Dijkstra from every overloaded latent to the nearest underloaded one.
        any_over = False
        for j in range(B):
            done[j] = False
            pred[j] = -1
            if excess[j] > mass_tol:
                dist[j] = 0.0
                any_over = True
            else:
                dist[j] = INF
        if not any_over:
            break
        if augmentations >= max_augmentations:
            return NO_PROGRESS, augmentations
        target = -1
        reach = 0.0
        while True:
            i = -1
            di = INF
            for j in range(B):
                if not done[j] and dist[j] < di:
                    di = dist[j]
                    i = j
            if i < 0:
                return NO_PROGRESS, augmentations
            if excess[i] < -mass_tol:
                target = i
                reach = di
                break
            done[i] = True
            base = di - offset[i]
            for j in range(B):
                if not done[j]:
                    nd = base + move[i, j] - p[j]
                    if nd < dist[j]:
                        dist[j] = nd
                        pred[j] = i
        # Potentials: reduced costs stay >= 0 and the path becomes tight.
        for j in range(B):
            if done[j]:
                shift = reach - dist[j]
                p[j] -= shift
                offset[j] += shift
        # The path, from the target back to its root, and the mass it can carry.
        hops = 0
        node = target
        delta = -excess[target]
        while pred[node] != -1:
            i = pred[node]
            k = move_code[i, node]
            hop_from[hops] = i
            hop_to[hops] = node
            hop_code[hops] = k
            hops += 1
            if X[i, k] < delta:
                delta = X[i, k]
            node = i
        root = node
        if excess[root] < delta:
            delta = excess[root]
        for h in range(hops):
            i = hop_from[h]
            j = hop_to[h]
            k = hop_code[h]
            X[j, k] += delta
            if slot[k, j] < 0:
                qk = code_pot[i, slot[k, i]] + offset[i]
                c = count[j]
                slot[k, j] = c
                codes[j, c] = k
                code_pot[j, c] = qk - offset[j]
                count[j] = c + 1
                base = code_pot[j, c]
                for l in range(B):
                    v = C[k, l] - base
                    if v < move[j, l]:
                        move[j, l] = v
                        move_code[j, l] = k
            if X[i, k] <= delta:
                X[i, k] = 0.0
                r = slot[k, i]
                c = count[i] - 1
                last = codes[i, c]
                codes[i, r] = last
                code_pot[i, r] = code_pot[i, c]
                slot[last, i] = r
                slot[k, i] = -1
                count[i] = c
                for l in range(B):
                    if move_code[i, l] == k:
                        best = INF
                        kb = -1
                        for s in range(c):
                            v = C[codes[i, s], l] - code_pot[i, s]
                            if v < best:
                                best = v
                                kb = codes[i, s]
                        move[i, l] = best
                        move_code[i, l] = kb
            else:
                X[i, k] -= delta
        excess[target] = 0.0 if delta >= -excess[target] else excess[target] + delta
        excess[root] = 0.0 if delta >= excess[root] else excess[root] - delta
        augmentations += 1

    return OK, augmentations


@njit(cache=True, nogil=True)
def solve_position(CT, a, b, X, q, p, mass_tol, gap_tol):
    """Exact OT for one position. CT (B, K) the transposed cost, a (K,) >= 0, b (B,) > 0, equal sums (normalized to 1).

    Writes the transposed plan X (B, K), codeword potentials q and latent potentials p; returns (cost, status, augmentations).
    ``status`` is OK only when the plan balances within ``mass_tol`` and its cost equals the dual objective
    a.q + b.p within ``gap_tol`` (relative), with q + p <= C up to the same tolerance: a certificate of
    optimality computed from the outputs themselves."""
    B, K = CT.shape
    C = np.empty((K, B))
    poison = 0.0  # stays 0 unless an entry is NaN or infinite (then 0 * entry is NaN)
    for i in range(B):
        for k in range(K):
            C[k, i] = CT[i, k]
            poison += 0.0 * CT[i, k]
    positive = 0
    for k in range(K):
        poison += 0.0 * a[k]
        if a[k] > 0:
            positive += 1
    if poison != 0.0:
        return 0.0, NON_FINITE, 0
    X[:, :] = 0.0
    p[:] = 0.0
    unit = 1.0 / positive
    same_mass = True
    for k in range(K):
        if a[k] > 0 and a[k] != unit:
            same_mass = False
    if same_mass:
        unit_a = a
    else:
        unit_a = np.empty(K)
        for k in range(K):
            unit_a[k] = unit if a[k] > 0 else 0.0
    if B > 1:
        _balance_potentials(C, CT, unit_a, b, p)

    # Every codeword to its cheapest latent; lists of each latent's codewords with positive mass. A codeword's
    # potential is stored per list entry relative to the latent's offset, so a potential update is O(B).
    codes = np.empty((B, K), np.int32)
    code_pot = np.empty((B, K))  # q[k] = code_pot[i, slot] + offset[i] for k = codes[i, slot]
    count = np.zeros(B, np.int64)
    slot = np.full((K, B), -1, np.int32)
    offset = np.zeros(B)
    excess = np.empty(B)
    for j in range(B):
        excess[j] = -b[j]
    # move[i, j]: min over latent i's codewords k of C[k, j] - q[k] (+ offset[i]); its reduced cost is
    # move[i, j] - offset[i] - p[j], and move_code[i, j] is that k.
    move = np.full((B, B), INF)
    move_code = np.full((B, B), -1, np.int32)
    for k in range(K):
        b1, _, i1, _ = _best_two(C, p, k)
        q[k] = b1
        if a[k] > 0:
            X[i1, k] = unit_a[k]
            excess[i1] += unit_a[k]
            c = count[i1]
            slot[k, i1] = c
            codes[i1, c] = k
            code_pot[i1, c] = b1
            count[i1] = c + 1
            for l in range(B):
                v = C[k, l] - b1
                if v < move[i1, l]:
                    move[i1, l] = v
                    move_code[i1, l] = k

    # Stage 1 with every codeword at the same mass: an integral problem that needs few augmentations (each moves a
    # whole codeword). Its optimal potentials are close to those of the real weights, which are near uniform in
    # practice; stage 2 rescales the masses in place (same support, so the potentials stay feasible and tight) and
    # finishes with the true weights. Exactness does not depend on this: it only shortens the path count.
    max_augmentations = 50 * (K + B) + 1000
    status, augmentations = _shortest_paths(C, X, excess, p, codes, code_pot, count, slot, offset, move, move_code,
                                            mass_tol, max_augmentations)
    if status != OK:
        return 0.0, status, augmentations
    if not same_mass:
        for j in range(B):
            excess[j] = -b[j]
        for i in range(B):
            for s in range(count[i]):
                k = codes[i, s]
                X[i, k] *= a[k] / unit
                excess[i] += X[i, k]
        status, more = _shortest_paths(C, X, excess, p, codes, code_pot, count, slot, offset, move, move_code,
                                       mass_tol, max_augmentations)
        augmentations += more
        if status != OK:
            return 0.0, status, augmentations

    for i in range(B):
        for s in range(count[i]):
            q[codes[i, s]] = code_pot[i, s] + offset[i]
    for k in range(K):
        if a[k] <= 0:  # no mass: the largest feasible potential
            q[k] = _best_two(C, p, k)[0]

    # Certificate: dual feasibility and zero duality gap (the plan is zero off the latents' lists).
    cost = 0.0
    for i in range(B):
        for s in range(count[i]):
            k = codes[i, s]
            cost += X[i, k] * C[k, i]
    scale = 0.0
    worst = 0.0
    for k in range(K):
        qk = q[k]
        for j in range(B):
            ckj = C[k, j]
            scale = max(scale, ckj)
            worst = min(worst, ckj - qk - p[j])
    dual = 0.0
    for k in range(K):
        if a[k] > 0:
            dual += a[k] * q[k]
    for j in range(B):
        dual += b[j] * p[j]
    tol = gap_tol * max(scale, 1e-300)
    if abs(cost - dual) > tol or worst < -tol:
        return cost, GAP, augmentations
    return cost, OK, augmentations


@njit(cache=True, nogil=True)
def solve_positions(C_t, A, b, positions, plans_t, costs, U, V, status, mass_tol, gap_tol):
    """``solve_position`` over ``positions`` (one call per run of positions a thread takes): C_t (M, B, K),
    A (M, K), plans_t (M, B, K). Potentials are centred as POT's ``center_ot_dual`` does (a.u = b.v)."""
    for r in range(positions.shape[0]):
        m = positions[r]
        cost, st, _ = solve_position(C_t[m], A[m], b, plans_t[m], U[m], V[m], mass_tol, gap_tol)
        costs[m] = cost
        status[m] = st
        if st == OK:
            au = 0.0
            total = 0.0
            for k in range(A.shape[1]):
                au += A[m, k] * U[m, k]
                total += A[m, k]
            bv = 0.0
            for j in range(b.shape[0]):
                bv += b[j] * V[m, j]
                total += b[j]
            shift = (bv - au) / total
            for k in range(A.shape[1]):
                U[m, k] += shift
            for j in range(b.shape[0]):
                V[m, j] -= shift
