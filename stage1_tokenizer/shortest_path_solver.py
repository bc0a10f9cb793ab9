"""Exact optimal transport between K weighted codewords and B uniform latents, for K much larger than B.

Why a solver of our own: POT's network simplex treats the K x B problem as a generic graph of K + B nodes.
Here the latent side is small (B = 32 against K = 512 to 16,384), so the dual can be searched over the B latent
potentials alone: every codeword goes whole to its cheapest latent under the current potentials, and only the
latents' loads are out of balance. Successive shortest paths then move codeword mass between latents over a B x B
graph whose edge (i, j) is the cheapest move of one of latent i's codewords to latent j. Each step keeps reduced
costs nonnegative and the plan on tight edges, so the result is an exact optimum (not an approximation), certified
at the end by the duality gap; see ``solve_position``.

What keeps the cost near-linear in K x B (``make bench`` has the figures):
- The whole problem starts from the optimal latent potentials of a subsample of the codewords (every 8th, or 64th
  and then 8th), solved the same way: exact potentials of a subsample are close to the whole problem's, where
  coordinate ascent from scratch stalls when the latents lie close together (a trained tokenizer's).
- A sweep of coordinate ascent balances the loads before the first path; each latent's price is an order
  statistic, found by group bounds and a linear-time selection (a quadratic step here once made a sweep grow
  with K^2 / B).
- The problem is first solved with every codeword at the same mass: an integral problem in which each path moves
  one whole codeword; the true (learned) masses then only need corrections. With the true masses from the start,
  fractional leftovers multiply the paths.
- Each edge keeps its cheapest and its second-cheapest move. A codeword that leaves a latent passes its moves to
  the runner-up; only a move whose runner-up is unknown is recomputed, from one cost row over that latent's
  codewords (recomputing the latent's whole row of moves made every path cost O(K)).
- Work arrays are allocated once per run of problems and cleared only where a problem wrote (large allocations
  per problem cost page faults that threads contend for), and float32 costs stay float32.
- The plan leaves the solver compactly (one latent and mass per codeword, plus the few split codewords), and the
  products the gradients need are formed codeword-major over all positions (``plan_products``) instead of one
  K x D accumulation per position.
The passes over all K x B costs are written branch-free over contiguous rows so that they vectorize, and the
compiled code is cached (numba ``cache=True``), so only the first run on a machine pays the compilation.

Layout: C[k, i] = ||codebook[k] - latent[i]||^2 with codeword weights ``a`` (K,) and latent weights ``b`` (B,);
the solver takes C transposed, CT (B, K), and writes the plan transposed, X (B, K): the layout in which one matrix
product gives every position's costs as one contiguous block. Outputs besides X: codeword potentials q (K,),
latent potentials p (B,), with q[k] + p[i] <= C[k, i] everywhere and equality wherever X[i, k] > 0.
``solve_positions`` (the batched entry point) hands back the plans compactly (``plan_buffers``) instead of dense.
"""

from __future__ import annotations

import numpy as np
from numba import njit

INF = np.inf
# Statuses of solve_position: the caller falls back to POT on NO_PROGRESS, GAP or OVERFLOW (more split codewords
# than ``plan_buffers`` holds), and rejects NON_FINITE input.
OK, NO_PROGRESS, GAP, NON_FINITE, OVERFLOW = 0, 1, 2, 3, 4
STATUS_NAMES = {OK: "optimal", NO_PROGRESS: "no augmenting path", GAP: "duality gap above tolerance",
                NON_FINITE: "cost or weights not finite", OVERFLOW: "more split codewords than the plan buffer holds"}
_MAX_SWEEPS = 4
# Coarse-to-fine start (``_solve_position``): subsample strides grow by this factor while every latent still gets at
# least _COARSEST codewords.
_COARSE_FACTOR, _COARSEST = 8, 8


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
    group bounds (branch-free, vectorized) leave a few times m candidates, and a selection (linear time) picks the
    answer among them."""
    n = values.shape[0]
    first = buf[:n]
    second = buf[n : 2 * n]
    group_min = buf[2 * n :]
    c = _below_group_bound(values, n, m, first, group_min)
    c = _below_group_bound(first, c, m, second, group_min)
    return np.partition(second[:c], m - 1)[m - 1]


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
def _sampled_imbalance(CT, p, a, b, stride, best, near):
    """The load imbalance (in codewords, as ``_balance_potentials`` returns it) under potentials p, estimated from
    every stride-th codeword: a cheap way to compare starting points. best, near: work space of K entries."""
    _nearest_latents(CT, p, stride, best, near)
    return _excess_load(near, a, b, stride)


@njit(cache=True, nogil=True)
def _balance_potentials(CT, a, b, p, floats, ints):
    """One sweep of coordinate ascent on the latent potentials, for codewords of equal mass (those of ``a`` > 0):
    latent i in turn takes the price at which as many codewords prefer it as make up b[i]. Cheap and not
    optimal (the dual is not smooth), but each sweep cuts the load imbalance, hence the number of shortest
    paths, by a large share. Returns the imbalance left, in codewords: the sum over latents of their excess load
    (approximate: from the sweep's own bookkeeping). Work space: floats (7K,) float32 and ints (2K,) int32."""
    B, K = CT.shape
    # Single precision and 32-bit indices: the potentials found here only shorten the exact stage that follows, and
    # a smaller working set stays in a core's cache.
    best1 = floats[:K]
    best2 = floats[K : 2 * K]
    thresh = floats[2 * K : 3 * K]
    massless = floats[3 * K : 4 * K]  # +inf for codewords without mass: never counted
    buf = floats[4 * K : 7 * K]
    arg1 = ints[:K]
    arg2 = ints[K : 2 * K]
    best1[:] = INF
    best2[:] = INF
    arg1[:] = -1
    arg2[:] = -1
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
            thresh[k] = np.float32(row[k] - (best2[k] if arg1[k] == i else best1[k]) + massless[k])
        p[i] = _smallest(thresh, m, buf)
        _lower_two(row, p[i], i, best1, best2, arg1, arg2)
    return _excess_load(arg1, a, b, 1)


@njit(cache=True, nogil=True, inline="always")
def _offer_moves(move, move_code, i, C, k, qk):
    """Codeword k (potential qk, relative to latent i's offset) joins latent i's candidates for every move i -> l:
    move[0, i, l] / move_code[0, i, l] keep the cheapest, move[1] / move_code[1] the second cheapest (branch-free)."""
    for l in range(move.shape[2]):
        v = C[k, l] - qk
        b1 = move[0, i, l]
        b2 = move[1, i, l]
        c1 = move_code[0, i, l]
        c2 = move_code[1, i, l]
        lo = v < b1
        mid = v < b2
        move[1, i, l] = b1 if lo else (v if mid else b2)
        move_code[1, i, l] = c1 if lo else (k if mid else c2)
        move[0, i, l] = v if lo else b1
        move_code[0, i, l] = k if lo else c1


@njit(cache=True, nogil=True)
def _withdraw_moves(move, move_code, i, CT, k, codes, code_pot, count):
    """Codeword k has left latent i (whose list is codes[i, :count]): where it held the cheapest move i -> l, the
    runner-up takes its place; a runner-up that leaves, or is promoted, leaves its place unknown (-inf, which
    ``_offer_moves`` fills only with the old first). Only a move whose runner-up is unknown is recomputed, from
    that target's cost row CT[l] over latent i's list."""
    B = move.shape[2]
    for l in range(B):
        first = move_code[0, i, l] == k
        second = move_code[1, i, l] == k
        if not (first or second):
            continue
        if second or move_code[1, i, l] >= 0:
            if first:
                move[0, i, l] = move[1, i, l]
                move_code[0, i, l] = move_code[1, i, l]
            move[1, i, l] = -INF
            move_code[1, i, l] = -1
            continue
        b1 = INF
        b2 = INF
        c1 = -1
        c2 = -1
        row = CT[l]
        for s in range(count):
            kk = codes[i, s]
            v = row[kk] - code_pot[i, s]
            lo = v < b1
            mid = v < b2
            b2 = b1 if lo else (v if mid else b2)
            c2 = c1 if lo else (kk if mid else c2)
            b1 = v if lo else b1
            c1 = kk if lo else c1
        move[0, i, l] = b1
        move[1, i, l] = b2
        move_code[0, i, l] = c1
        move_code[1, i, l] = c2


@njit(cache=True, nogil=True)
def _shortest_paths(C, CT, X, excess, p, codes, code_pot, count, slot, offset, move, move_code, mass_tol,
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
                nd = base + move[0, i, j] - p[j] + closed[j]
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
            k = move_code[0, i, node]
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
                _withdraw_moves(move, move_code, i, CT, k, codes, code_pot, c)
            else:
                X[i, k] = rest
        excess[target] = 0.0 if delta >= -excess[target] else excess[target] + delta
        excess[root] = 0.0 if delta >= excess[root] else excess[root] - delta
        augmentations += 1

    return OK, augmentations


@njit(cache=True, nogil=True)
def _workspace(B, K, dtype):
    """Arrays one problem of B latents and K codewords works in, allocated once for a run of problems: large
    allocations freed and made again per problem cost page faults, which threads solving side by side contend for.
    ``slot`` is all -1 between problems (``_release``)."""
    C = np.empty((K, B), dtype)
    codes = np.empty((B, K), np.int32)
    code_pot = np.empty((B, K))
    slot = np.full((K, B), -1, np.int32)
    floats = np.empty(7 * K, np.float32)
    ints = np.empty(2 * K, np.int32)
    extra = np.empty((3, K))
    return C, codes, code_pot, slot, floats, ints, extra


@njit(cache=True, nogil=True)
def _release(slot, codes, count):
    """Clears the entries of ``slot`` a problem set (its lists' entries), instead of all K x B."""
    for i in range(count.shape[0]):
        for s in range(count[i]):
            slot[codes[i, s], i] = -1


@njit(cache=True, nogil=True)
def _solve_from(CT, a, b, X, q, p, mass_tol, gap_tol, work, warm):
    """``solve_position`` from latent potentials p when ``warm`` (else from a start of its own), also returning the
    plan's support: latent i holds codewords codes[i, :count[i]]. X must be all zero on entry (clearing only the
    support afterwards is much cheaper than clearing B x K entries)."""
    B, K = CT.shape
    # C: CT transposed, the same values (float32 costs stay float32: half the memory traffic).
    C, codes, code_pot, slot, sweep_floats, sweep_ints, extra = work
    count = np.zeros(B, np.int64)
    finite = True
    for k0 in range(0, K, 16):  # blocked transpose: a cache line of CT at a time; the finiteness check on the way
        k1 = min(k0 + 16, K)
        for i in range(B):
            for k in range(k0, k1):
                v = CT[i, k]
                C[k, i] = v
                finite &= abs(v) < INF
    positive = 0
    for k in range(K):
        if not abs(a[k]) < INF:
            finite = False
        if a[k] > 0:
            positive += 1
    if not finite:
        return 0.0, NON_FINITE, 0, codes, count
    if not warm:
        p[:] = 0.0
    unit = 1.0 / positive
    same_mass = True
    for k in range(K):
        if a[k] > 0 and a[k] != unit:
            same_mass = False
    if same_mass:
        unit_a = a
    else:
        unit_a = extra[0]
        for k in range(K):
            unit_a[k] = unit if a[k] > 0 else 0.0
    # Start from p = 0 or from each latent's mean cost, whichever leaves fewer codewords in excess. The mean
    # cancels the |latent|^2 part of the cost, which decides every codeword's preference while the codebook is
    # still near the origin (a fresh tokenizer); with a trained codebook p = 0 is usually better.
    if B > 1 and not warm:
        centred = np.empty(B)
        for i in range(B):
            total = 0.0
            for k in range(0, K, 8):
                total += CT[i, k]
            centred[i] = total / ((K + 7) // 8)
        best, near = extra[1], sweep_ints[:K]
        if (_sampled_imbalance(CT, centred, unit_a, b, 8, best, near)
                < _sampled_imbalance(CT, p, unit_a, b, 8, best, near)):
            p[:] = centred
    # Sweeps while the loads are far from balanced: a sweep costs a few passes over the costs and removes a large
    # share of the imbalance, hence of the shortest paths. From a subsample's potentials (warm) the paths left are
    # cheaper than a sweep.
    sweeps = 0
    while B > 1 and sweeps < (0 if warm else _MAX_SWEEPS):
        sweeps += 1
        if _balance_potentials(CT, unit_a, b, p, sweep_floats, sweep_ints) <= 4.0 * K / B:
            break

    # Every codeword to its cheapest latent; lists of each latent's codewords with positive mass. A codeword's
    # potential is stored per list entry relative to the latent's offset, so a potential update is O(B).
    # q[k] = code_pot[i, s] + offset[i] for k = codes[i, s], and slot[k, i] = s (-1 where k is not on i's list).
    offset = np.zeros(B)
    excess = np.empty(B)
    for j in range(B):
        excess[j] = -b[j]
    # move[0, i, j]: min over latent i's codewords k of C[k, j] - q[k] (+ offset[i]); its reduced cost is
    # move[0, i, j] - offset[i] - p[j], and move_code[0, i, j] is that k; move[1], move_code[1]: the runner-up.
    move = np.full((2, B, B), INF)
    move_code = np.full((2, B, B), -1, np.int32)
    near = sweep_ints[:K]
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
    status, augmentations = _shortest_paths(C, CT, X, excess, p, codes, code_pot, count, slot, offset, move, move_code,
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
        status, more = _shortest_paths(C, CT, X, excess, p, codes, code_pot, count, slot, offset, move, move_code,
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
    largest = extra[1]
    slack = extra[2]
    largest[:] = 0.0
    slack[:] = 0.0
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
def _solve_position(CT, a, b, X, q, p, mass_tol, gap_tol, work):
    """``_solve_from`` started coarse to fine: the problem restricted to every s-th codeword (equal masses) is solved
    exactly for s = ..., 64, 8 (while each latent still gets ``_COARSEST`` codewords), each from the latent
    potentials of the one before, and the whole problem from the last. The optimal latent potentials of a
    subsample are close to those of the whole codebook, so the sweeps and paths of the whole problem only correct
    sampling noise: on a trained tokenizer's latents (close together, where the sweeps alone converge slowly)
    stage 1 needs a few hundred paths instead of thousands. Exactness does not depend on it."""
    B, K = CT.shape
    stride = 1
    while K // (stride * _COARSE_FACTOR) >= _COARSEST * B:
        stride *= _COARSE_FACTOR
    warm = False
    C, codes, code_pot, slot, floats, ints, extra = work
    while stride > 1 and B > 1:
        sub = np.ascontiguousarray(CT[:, ::stride])
        n = sub.shape[1]
        uniform = np.empty(n)
        total = 0.0
        for j in range(n):
            uniform[j] = 1.0 if a[j * stride] > 0 else 0.0
            total += uniform[j]
        if total < B:
            break
        uniform /= total
        sub_work = (C[:n], codes[:, :n], code_pot[:, :n], slot[:n], floats[: 7 * n], ints[: 2 * n], extra[:, :n])
        _, status, _, sub_codes, count = _solve_from(sub, uniform, b, X[:, :n], q[:n], p, mass_tol, gap_tol,
                                                     sub_work, warm)
        for i in range(B):
            for s in range(count[i]):
                X[i, sub_codes[i, s]] = 0.0
        _release(slot[:n], sub_codes, count)
        warm = status == OK
        stride //= _COARSE_FACTOR
    return _solve_from(CT, a, b, X, q, p, mass_tol, gap_tol, work, warm)


@njit(cache=True, nogil=True)
def solve_position(CT, a, b, X, q, p, mass_tol, gap_tol):
    """Exact OT for one position. CT (B, K) the transposed cost, a (K,) >= 0, b (B,) > 0, equal sums (normalized to 1).

    Writes the transposed plan X (B, K), codeword potentials q and latent potentials p; returns (cost, status, augmentations).
    ``status`` is OK only when the plan balances within ``mass_tol`` and its cost equals the dual objective
    a.q + b.p within ``gap_tol`` (relative), with q + p <= C up to the same tolerance: a certificate of
    optimality computed from the outputs themselves."""
    X[:, :] = 0.0
    cost, status, augmentations, _, _ = _solve_position(CT, a, b, X, q, p, mass_tol, gap_tol,
                                                        _workspace(CT.shape[0], CT.shape[1], CT.dtype))
    return cost, status, augmentations


def plan_buffers(M, K, B):
    """Where ``solve_positions`` leaves the plans, compactly: owner[m, k] is the latent holding codeword k's mass
    share[m, k] at position m (-1: none), and a codeword split over several latents puts the other parts in the
    extra_* lists (at most B - 1 per position in a basic solution; room for 4B)."""
    room = 4 * B  # owner and share are filled position by position (record_dense_plan, solve_positions)
    return (np.empty((M, K), np.int32), np.empty((M, K)), np.empty((M, room), np.int64),
            np.empty((M, room), np.int64), np.empty((M, room)), np.zeros(M, np.int64))


@njit(cache=True, nogil=True)
def _record_entry(plan, m, i, k, x):
    """Plan entry x between codeword k and latent i at position m; False when the extra lists are full."""
    owner, share, extra_k, extra_i, extra_x, extra_n = plan
    if owner[m, k] < 0:
        owner[m, k] = i
        share[m, k] = x
        return True
    n = extra_n[m]
    if n >= extra_k.shape[1]:
        return False
    extra_k[m, n] = k
    extra_i[m, n] = i
    extra_x[m, n] = x
    extra_n[m] = n + 1
    return True


@njit(cache=True, nogil=True)
def record_dense_plan(plan_t, m, plan, row_sums):
    """A dense plan (B, K) (POT's, where this solver is not used) into ``plan`` at position m, its row sums into
    row_sums (B,); False when it has more split codewords than the extra lists hold."""
    B, K = plan_t.shape
    plan[0][m, :] = -1
    plan[5][m] = 0
    for i in range(B):
        row = 0.0
        for k in range(K):
            x = plan_t[i, k]
            if x != 0.0:
                row += x
                if not _record_entry(plan, m, i, k, x):
                    return False
        row_sums[i] = row
    return True


@njit(cache=True, nogil=True)
def solve_positions(C_t, A, b, positions, costs, U, V, status, Ps, plan, mass_tol, gap_tol):
    """``solve_position`` over ``positions`` (one call per run of positions a thread takes). C_t (M, B, K) costs
    (float32 or float64), A (M, K) weights. Per position m: costs[m], potentials U[m] (K,) and V[m] (B,), centred as
    POT's ``center_ot_dual`` does (a.u = b.v), status[m], the plan's row sums Ps[m] (B,) and the plan itself in
    ``plan`` (``plan_buffers``; ``plan_products`` turns it into what the gradients need). Plans only for positions
    solved with status OK."""
    Mn, B, K = C_t.shape
    X = np.zeros((B, K))
    work = _workspace(B, K, C_t.dtype)
    for r in range(positions.shape[0]):
        m = positions[r]
        cost, st, _, codes, count = _solve_position(C_t[m], A[m], b, X, U[m], V[m], mass_tol, gap_tol, work)
        costs[m] = cost
        if st == OK:
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
            plan[0][m, :] = -1
            plan[5][m] = 0
            for i in range(B):
                row = 0.0
                for s in range(count[i]):
                    k = codes[i, s]
                    x = X[i, k]
                    if x > 0.0:
                        row += x
                        if not _record_entry(plan, m, i, k, x):
                            st = OVERFLOW
                Ps[m, i] = row
        status[m] = st
        for i in range(B):  # back to all zero for the next position, clearing only the lists
            for s in range(count[i]):
                X[i, codes[i, s]] = 0.0
        _release(work[3], codes, count)


@njit(cache=True, nogil=True)
def plan_products(plan, Z, codebook, first, stop, Pc, PTz, Pcol):
    """From the plans P_m (``solve_positions``) of every position, over codewords first..stop-1 (one range per
    thread): Pc += P_m codebook (M, B, D), PTz[k] = sum_m (P_m^T Z[m])[k] (K, D) and Pcol[k] = P's column sums
    summed over positions (K,). Codeword-major in blocks: a codeword's row of PTz and of the codebook is read
    once for all positions, so the pass streams the compact plans instead of a K x D array per position. The
    extra entries (split codewords) are left to ``plan_extra_products``."""
    owner, share = plan[0], plan[1]
    Mn = owner.shape[0]
    D = codebook.shape[1]
    block = 64
    for k0 in range(first, stop, block):
        k1 = min(k0 + block, stop)
        for k in range(k0, k1):
            Pcol[k] = 0.0
            PTz[k, :] = 0.0
        for m in range(Mn):
            for k in range(k0, k1):
                i = owner[m, k]
                if i < 0:
                    continue
                x = share[m, k]
                Pcol[k] += x
                for d in range(D):
                    PTz[k, d] += x * Z[m, i, d]
                    Pc[m, i, d] += x * codebook[k, d]


@njit(cache=True, nogil=True)
def plan_extra_products(plan, Z, codebook, Pc, PTz, Pcol):
    """``plan_products`` for the extra entries of every position, in order."""
    extra_k, extra_i, extra_x, extra_n = plan[2], plan[3], plan[4], plan[5]
    for m in range(extra_n.shape[0]):
        for r in range(extra_n[m]):
            k = extra_k[m, r]
            i = extra_i[m, r]
            x = extra_x[m, r]
            Pcol[k] += x
            for d in range(codebook.shape[1]):
                PTz[k, d] += x * Z[m, i, d]
                Pc[m, i, d] += x * codebook[k, d]
