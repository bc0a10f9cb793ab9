"""Exact optimal transport between K weighted codewords and B uniform latents, for K much larger than B.

Why a solver of our own: POT's network simplex treats the K x B problem as a generic graph of K + B nodes.
Here the latent side is small (B = 32 against K = 512), so the dual can be searched over the B latent
potentials alone: every codeword goes whole to its cheapest latent under the current potentials, and only
the latents' loads are out of balance. Successive shortest paths then move codeword mass between latents
over a B x B graph whose edge (i, j) is the cheapest move of one of latent i's codewords to latent j.
Each step keeps reduced costs nonnegative and the plan on tight edges, so the result is an exact optimum
(not an approximation), certified at the end by the duality gap; see ``solve_position``.

Two things keep the number of shortest paths small. Sweeps of coordinate ascent balance the loads before
the first path (each removes 40-60% of the imbalance; they repeat while it stays large). And the problem is
first solved with every codeword at the same mass: an integral problem in which each path moves one whole
codeword; the true (near-uniform, learned) masses then only need small corrections. With the true masses from
the start, fractional leftovers multiply the paths by about 3.5.

Cost per problem on a trained tokenizer's latents (K = 512, B = 32, learned weights within 3% of uniform,
one core): about 0.33 ms, 88 paths (2 sweeps), against 2.1 ms for POT's network simplex; on a fresh
tokenizer's latents (every codeword near the origin) 0.27 ms, 50 paths (3 sweeps). Where the time goes, and why
the loops look as they do: the passes over all K x B costs (the sweep, the first assignment, the certificate)
are written branch-free over contiguous rows so that they vectorize; the sweep's order statistic skips most
values with bounds from group minima; Dijkstra relaxes with a settled-latent penalty instead of a branch;
a codeword leaving a latent recomputes that latent's row of moves in one vectorized pass. The compiled code
is cached (numba ``cache=True``), so only the first run on a machine pays the compilation (seconds).

Layout: C[k, i] = ||codebook[k] - latent[i]||^2 with codeword weights ``a`` (K,) and latent weights ``b`` (B,);
the solver takes C transposed, CT (B, K), and writes the plan transposed, X (B, K): the layout in which one matrix
product gives every position's costs as one contiguous block. Outputs besides X: codeword potentials q (K,),
latent potentials p (B,), with q[k] + p[i] <= C[k, i] everywhere and equality wherever X[i, k] > 0.
``solve_positions`` (the batched entry point) hands back the products the gradients need, computed from the
plan's nonzeros, instead of the plan.
"""

from __future__ import annotations

import numpy as np
from numba import njit

INF = np.inf
# Statuses of solve_position: the caller falls back to POT on NO_PROGRESS or GAP, and rejects NON_FINITE input.
OK, NO_PROGRESS, GAP, NON_FINITE = 0, 1, 2, 3
STATUS_NAMES = {OK: "optimal", NO_PROGRESS: "no augmenting path", GAP: "duality gap above tolerance",
                NON_FINITE: "cost or weights not finite"}
_MAX_SWEEPS = 4


@njit(cache=True, nogil=True)
def _lower_two(row, pi, i, best1, best2, arg1, arg2):
    """Latent i's value row[k] - pi replaces its old one in every codeword's two smallest values (approximate:
    a value that drops out leaves its place to +inf, not to the third smallest). Branch-free so it vectorizes."""
    for k in range(row.shape[0]):
        v = row[k] - pi
        b1 = best1[k]
        b2 = best2[k]
        a1 = arg1[k]
        a2 = arg2[k]
        if a1 == i:
            b1 = b2
            a1 = a2
            b2 = INF
        elif a2 == i:
            b2 = INF
        lo = v < b1
        mid = v < b2
        best2[k] = b1 if lo else (v if mid else b2)
        arg2[k] = a1 if lo else (i if mid else a2)
        best1[k] = v if lo else b1
        arg1[k] = i if lo else a1


@njit(cache=True, nogil=True)
def _below_group_bound(values, n, m, out, group_min):
    """Copies to ``out`` the values[:n] at most the largest of the minima of m groups (values r, r + m, r + 2m,
    ...; elementwise, so it vectorizes) and returns how many: at least m, and every value up to the m-th
    smallest among them, since each group has one."""
    for r in range(m):
        group_min[r] = INF
    full = n - n % m
    for s in range(0, full, m):
        for r in range(m):
            group_min[r] = min(group_min[r], values[s + r])
    for r in range(full, n):
        group_min[r - full] = min(group_min[r - full], values[r])
    bound = -INF
    for r in range(m):
        bound = max(bound, group_min[r])
    c = 0
    for k in range(n):  # stored unconditionally, kept by the count: no branch to mispredict
        t = values[k]
        out[c] = t
        c += t <= bound
    return c


@njit(cache=True, nogil=True)
def _smallest(values, m, buf):
    """The m-th smallest of values (1 <= m <= len(values)); buf: work space of 3 * len(values). Two rounds of
    group bounds leave a few times m candidates; the answer is the largest candidate with fewer than m
    candidates below it (quadratic in the candidates, but branch-free and vectorized)."""
    n = values.shape[0]
    first = buf[:n]
    second = buf[n : 2 * n]
    group_min = buf[2 * n :]
    c = _below_group_bound(values, n, m, first, group_min)
    c = _below_group_bound(first, c, m, second, group_min)
    result = -INF
    for x in range(c):
        t = second[x]
        below = 0
        for y in range(c):
            below += second[y] < t
        result = max(result, t if below < m else -INF)
    return result


@njit(cache=True, nogil=True)
def _excess_load(near, a, b, stride):
    """With every stride-th codeword k of equal mass (a[k] > 0) on latent near[k], standing for stride of them: the
    sum over latents of their load beyond b, in codewords."""
    load = np.zeros(b.shape[0])
    unit = 0.0
    for k in range(0, near.shape[0], stride):
        if a[k] > 0:
            load[near[k]] += stride
            unit = a[k]
    excess = 0.0
    if unit > 0:
        for i in range(b.shape[0]):
            excess += max(0.0, load[i] - b[i] / unit)
    return excess


@njit(cache=True, nogil=True)
def _nearest_latents(CT, p, stride, best, near):
    """For every stride-th codeword k: best[k] = min over latents i of CT[i, k] - p[i], near[k] = that i."""
    B, K = CT.shape
    for k in range(0, K, stride):
        best[k] = INF
        near[k] = 0
    for i in range(B):
        row = CT[i]
        pi = p[i]
        for k in range(0, K, stride):
            v = row[k] - pi
            lower = v < best[k]
            best[k] = v if lower else best[k]
            near[k] = i if lower else near[k]


@njit(cache=True, nogil=True)
def _sampled_imbalance(CT, p, a, b, stride):
    """The load imbalance (in codewords, as ``_balance_potentials`` returns it) under potentials p, estimated from
    every stride-th codeword: a cheap way to compare starting points."""
    K = CT.shape[1]
    near = np.empty(K, np.int64)
    _nearest_latents(CT, p, stride, np.empty(K), near)
    return _excess_load(near, a, b, stride)


@njit(cache=True, nogil=True)
def _balance_potentials(CT, a, b, p):
    """One sweep of coordinate ascent on the latent potentials, for codewords of equal mass (those of ``a`` > 0):
    latent i in turn takes the price at which as many codewords prefer it as make up b[i]. Cheap and not
    optimal (the dual is not smooth), but each sweep cuts the load imbalance, hence the number of shortest
    paths, by 40-60%. Returns the imbalance left, in codewords: the sum over latents of their excess load
    (approximate: from the sweep's own bookkeeping)."""
    B, K = CT.shape
    best1 = np.full(K, INF)
    best2 = np.full(K, INF)
    arg1 = np.full(K, -1, np.int64)
    arg2 = np.full(K, -1, np.int64)
    thresh = np.empty(K)
    buf = np.empty(3 * K)
    massless = np.empty(K)  # +inf for codewords without mass: never counted
    unit = 0.0
    positive = 0
    for k in range(K):
        massless[k] = 0.0 if a[k] > 0 else INF
        if a[k] > 0:
            unit = a[k]
            positive += 1
    for i in range(B):
        _lower_two(CT[i], p[i], i, best1, best2, arg1, arg2)
    for i in range(B):
        m = min(positive, max(1, int(np.ceil(b[i] / unit - 1e-9))))
        row = CT[i]
        for k in range(K):  # codeword k prefers latent i once p[i] >= thresh[k]
            thresh[k] = row[k] - (best2[k] if arg1[k] == i else best1[k]) + massless[k]
        p[i] = _smallest(thresh, m, buf)
        _lower_two(row, p[i], i, best1, best2, arg1, arg2)
    return _excess_load(arg1, a, b, 1)


@njit(cache=True, nogil=True, inline="always")
def _offer_moves(move, move_code, i, C, k, qk):
    """Codeword k (potential qk, relative to latent i's offset) joins latent i's candidates for every move i -> l."""
    for l in range(move.shape[1]):
        v = C[k, l] - qk
        lower = v < move[i, l]
        move[i, l] = v if lower else move[i, l]
        move_code[i, l] = k if lower else move_code[i, l]


@njit(cache=True, nogil=True)
def _shortest_paths(C, X, excess, p, codes, code_pot, count, slot, offset, move, move_code, mass_tol,
                    max_augmentations):
    """Successive shortest paths until every latent balances within mass_tol; returns (status, augmentations)."""
    K, B = C.shape
    dist = np.empty(B)
    key = np.empty(B)  # tentative distance of a latent not yet settled, +inf once settled
    closed = np.empty(B)  # 0 while a latent is open, +inf once settled: added to relaxed distances
    pred = np.empty(B, np.int64)
    order = np.empty(B, np.int64)
    hop_from = np.empty(B, np.int64)
    hop_to = np.empty(B, np.int64)
    hop_code = np.empty(B, np.int64)
    augmentations = 0
    dust = 0.1 * mass_tol  # masses this small are rounding residues, far below what the loads must balance to
    while True:
        # Dijkstra from every overloaded latent to the nearest underloaded one.
        any_over = False
        for j in range(B):
            over = excess[j] > mass_tol
            key[j] = 0.0 if over else INF
            any_over |= over
            closed[j] = 0.0
            pred[j] = -1
        if not any_over:
            break
        if augmentations >= max_augmentations:
            return NO_PROGRESS, augmentations
        target = -1
        reach = 0.0
        settled = 0
        while True:
            i = 0
            di = key[0]
            for j in range(1, B):
                kj = key[j]
                lower = kj < di
                di = kj if lower else di
                i = j if lower else i
            if di == INF:
                return NO_PROGRESS, augmentations
            if excess[i] < -mass_tol:
                target = i
                reach = di
                break
            dist[i] = di
            key[i] = INF
            closed[i] = INF
            order[settled] = i
            settled += 1
            base = di - offset[i]
            for j in range(B):
                nd = base + move[i, j] - p[j] + closed[j]
                lower = nd < key[j]
                key[j] = nd if lower else key[j]
                pred[j] = i if lower else pred[j]
        # Potentials: reduced costs stay >= 0 and the path becomes tight.
        for r in range(settled):
            j = order[r]
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
                _offer_moves(move, move_code, j, C, k, code_pot[j, c])
            rest = X[i, k] - delta
            if rest <= dust:
                # The whole entry moves: a rounding residue left behind would be the bottleneck of later paths,
                # each moving only that residue (seen: millions of paths of 1e-18). The two loads absorb it.
                X[j, k] += rest
                excess[i] -= rest
                excess[j] += rest
                X[i, k] = 0.0
                r = slot[k, i]
                c = count[i] - 1
                last = codes[i, c]
                codes[i, r] = last
                code_pot[i, r] = code_pot[i, c]
                slot[last, i] = r
                slot[k, i] = -1
                count[i] = c
                stale = False
                for l in range(B):
                    stale |= move_code[i, l] == k
                if stale:  # recompute latent i's row of moves, one contiguous cost row per codeword
                    for l in range(B):
                        move[i, l] = INF
                        move_code[i, l] = -1
                    for s in range(c):
                        _offer_moves(move, move_code, i, C, codes[i, s], code_pot[i, s])
            else:
                X[i, k] = rest
        excess[target] = 0.0 if delta >= -excess[target] else excess[target] + delta
        excess[root] = 0.0 if delta >= excess[root] else excess[root] - delta
        augmentations += 1

    return OK, augmentations


@njit(cache=True, nogil=True)
def _solve_position(CT, a, b, X, q, p, mass_tol, gap_tol):
    """``solve_position``, also returning the plan's support: latent i holds codewords codes[i, :count[i]]."""
    B, K = CT.shape
    C = np.empty((K, B))
    finite = True
    for k0 in range(0, K, 8):  # blocked transpose: a cache line of CT at a time
        k1 = min(k0 + 8, K)
        for i in range(B):
            for k in range(k0, k1):
                C[k, i] = CT[i, k]
    for i in range(B):
        for k in range(K):
            if not abs(CT[i, k]) < INF:
                finite = False
    positive = 0
    for k in range(K):
        if not abs(a[k]) < INF:
            finite = False
        if a[k] > 0:
            positive += 1
    if not finite:
        return 0.0, NON_FINITE, 0, np.empty((0, 0), np.int32), np.empty(0, np.int64)
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
    # Start from p = 0 or from each latent's mean cost, whichever leaves fewer codewords in excess. The mean
    # cancels the |latent|^2 part of the cost, which decides every codeword's preference while the codebook is
    # still near the origin (a fresh tokenizer: imbalance 494 -> 180 codewords of 512, 20-25% faster solves);
    # with a trained codebook p = 0 is better (155 against 382).
    if B > 1:
        centred = np.empty(B)
        for i in range(B):
            total = 0.0
            for k in range(0, K, 8):
                total += CT[i, k]
            centred[i] = total / ((K + 7) // 8)
        if _sampled_imbalance(CT, centred, unit_a, b, 8) < _sampled_imbalance(CT, p, unit_a, b, 8):
            p[:] = centred
    # Sweeps while the loads are far from balanced. One sweep costs about as much as 2K/B shortest paths and
    # removes 40-60% of the imbalance: a trained tokenizer's latents need 1-2 (imbalance 156 -> 87 -> 56 codewords
    # of 512 at B = 32), a fresh one's, with every codeword near the origin, 3 (494 -> 198 -> 87 -> 43).
    sweeps = 0
    while B > 1 and sweeps < _MAX_SWEEPS:
        sweeps += 1
        if _balance_potentials(CT, unit_a, b, p) <= 4.0 * K / B:
            break

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
    near = np.empty(K, np.int64)
    _nearest_latents(CT, p, 1, q, near)
    for k in range(K):
        if a[k] > 0:
            b1 = q[k]
            i1 = near[k]
            X[i1, k] = unit_a[k]
            excess[i1] += unit_a[k]
            c = count[i1]
            slot[k, i1] = c
            codes[i1, c] = k
            code_pot[i1, c] = b1
            count[i1] = c + 1
            _offer_moves(move, move_code, i1, C, k, b1)

    # Stage 1 with every codeword at the same mass: an integral problem that needs few augmentations (each moves a
    # whole codeword). Its optimal potentials are close to those of the real weights, which are near uniform in
    # practice; stage 2 rescales the masses in place (same support, so the potentials stay feasible and tight) and
    # finishes with the true weights. Exactness does not depend on this: it only shortens the path count.
    max_augmentations = 50 * (K + B) + 1000
    status, augmentations = _shortest_paths(C, X, excess, p, codes, code_pot, count, slot, offset, move, move_code,
                                            mass_tol, max_augmentations)
    if status != OK:
        return 0.0, status, augmentations, codes, count
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
            return 0.0, status, augmentations, codes, count

    for i in range(B):
        for s in range(count[i]):
            q[codes[i, s]] = code_pot[i, s] + offset[i]
    for k in range(K):
        if a[k] <= 0:  # no mass: the largest feasible potential
            lowest = INF
            for j in range(B):
                lowest = min(lowest, C[k, j] - p[j])
            q[k] = lowest

    # Certificate: dual feasibility and zero duality gap (the plan is zero off the latents' lists).
    cost = 0.0
    for i in range(B):
        for s in range(count[i]):
            k = codes[i, s]
            cost += X[i, k] * C[k, i]
    # Per-codeword running extremes (elementwise, so the loop vectorizes), reduced once at the end.
    largest = np.zeros(K)
    slack = np.zeros(K)
    for j in range(B):
        row = CT[j]
        pj = p[j]
        for k in range(K):
            c = row[k]
            largest[k] = max(largest[k], c)
            slack[k] = min(slack[k], c - q[k] - pj)
    scale = largest.max()
    worst = slack.min()
    dual = 0.0
    for k in range(K):
        if a[k] > 0:
            dual += a[k] * q[k]
    for j in range(B):
        dual += b[j] * p[j]
    tol = gap_tol * max(scale, 1e-300)
    if abs(cost - dual) > tol or worst < -tol:
        return cost, GAP, augmentations, codes, count
    return cost, OK, augmentations, codes, count


@njit(cache=True, nogil=True)
def solve_position(CT, a, b, X, q, p, mass_tol, gap_tol):
    """Exact OT for one position. CT (B, K) the transposed cost, a (K,) >= 0, b (B,) > 0, equal sums (normalized to 1).

    Writes the transposed plan X (B, K), codeword potentials q and latent potentials p; returns (cost, status, augmentations).
    ``status`` is OK only when the plan balances within ``mass_tol`` and its cost equals the dual objective
    a.q + b.p within ``gap_tol`` (relative), with q + p <= C up to the same tolerance: a certificate of
    optimality computed from the outputs themselves."""
    cost, status, augmentations, _, _ = _solve_position(CT, a, b, X, q, p, mass_tol, gap_tol)
    return cost, status, augmentations


@njit(cache=True, nogil=True, inline="always")
def _add_entry_products(x, k, z_row, codebook, pc_row, ptz, pcol):
    """Plan entry x between codeword k and a latent z_row: its share of the products ``solve_positions`` returns."""
    pcol[k] += x
    for d in range(z_row.shape[0]):
        pc_row[d] += x * codebook[k, d]
        ptz[k, d] += x * z_row[d]


@njit(cache=True, nogil=True)
def solve_positions(C_t, A, b, Z, codebook, positions, costs, U, V, status, Pc, Ps, PTz, Pcol, mass_tol, gap_tol):
    """``solve_position`` over ``positions`` (one call per run of positions a thread takes), returning what the
    gradients need instead of the (mostly zero) plans. C_t (M, B, K) costs (float32 or float64), A (M, K) weights,
    Z (M, B, D) latents, codebook (K, D). Per position m: costs[m], potentials U[m] (K,) and V[m] (B,), centred as
    POT's ``center_ot_dual`` does (a.u = b.v), status[m]; with P_m the plan (B, K): Pc[m] = P_m codebook (B, D) and
    Ps[m] = P_m's row sums (B,). Summed over the positions solved here (added to what the arrays hold):
    PTz += P_m^T Z[m] (K, D) and Pcol += P_m's column sums (K,). Products only for positions solved with status OK."""
    Mn, B, K = C_t.shape
    X = np.empty((B, K))
    for r in range(positions.shape[0]):
        m = positions[r]
        cost, st, _, codes, count = _solve_position(C_t[m], A[m], b, X, U[m], V[m], mass_tol, gap_tol)
        costs[m] = cost
        status[m] = st
        if st != OK:
            continue
        au = 0.0
        total = 0.0
        for k in range(K):
            au += A[m, k] * U[m, k]
            total += A[m, k]
        bv = 0.0
        for j in range(B):
            bv += b[j] * V[m, j]
            total += b[j]
        shift = (bv - au) / total
        for k in range(K):
            U[m, k] += shift
        for j in range(B):
            V[m, j] -= shift
        # The plan is zero off the latents' lists: K + B entries or so out of K * B.
        for i in range(B):
            Pc[m, i, :] = 0.0
            row = 0.0
            for s in range(count[i]):
                k = codes[i, s]
                row += X[i, k]
                _add_entry_products(X[i, k], k, Z[m, i], codebook, Pc[m, i], PTz, Pcol)
            Ps[m, i] = row


@njit(cache=True, nogil=True)
def add_plan_products(plan_t, z, codebook, pc, ps, ptz, pcol):
    """``solve_positions``' products for one position from a dense plan (B, K) (POT's, where this solver is not
    used): pc = plan codebook (B, D), ps = row sums (B,); ptz += plan^T z (K, D), pcol += column sums (K,). A loop
    over the nonzeros: numpy's matrix products would start BLAS threads inside the solver threads."""
    B, K = plan_t.shape
    for i in range(B):
        pc[i, :] = 0.0
        row = 0.0
        for k in range(K):
            x = plan_t[i, k]
            if x == 0.0:
                continue
            row += x
            _add_entry_products(x, k, z[i], codebook, pc[i], ptz, pcol)
        ps[i] = row
