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
  statistic, found by group bounds and a linear-time selection, so that a sweep stays linear in K.
- The problem is first solved with every codeword at the same mass: an integral problem in which each path moves
  one whole codeword; the true (learned) masses then only need corrections. With the true masses from the start,
  fractional leftovers multiply the paths.
- Each edge keeps its cheapest and its second-cheapest move. A codeword that leaves a latent passes its moves to
  the runner-up; only a move whose runner-up is unknown is recomputed over that latent's codewords, so that a path
  does not cost O(K).
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

The solve of one position, stage by stage (``_solve_position``): the costs transposed and checked
(``_transpose_costs``); the start, from subsamples (``_coarse_start``) or of its own (``_start_potentials``); every
codeword to its cheapest latent (``_assign_nearest``); the shortest paths with equal masses, then with the true
ones (``_shortest_paths``, ``_rescale_masses``); the codeword potentials and the certificate (``_code_potentials``,
``_certificate``). The arrays travel between the stages in named tuples (``Workspace``, ``PathState``).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

INF = np.inf
# Statuses of solve_position: the caller falls back to POT on NO_PROGRESS, GAP or OVERFLOW (more split codewords
# than ``plan_buffers`` holds), and rejects NON_FINITE input.
OK, NO_PROGRESS, GAP, NON_FINITE, OVERFLOW = 0, 1, 2, 3, 4
STATUS_NAMES = {OK: "optimal", NO_PROGRESS: "no augmenting path", GAP: "duality gap above tolerance",
                NON_FINITE: "cost or weights not finite", OVERFLOW: "more split codewords than the plan buffer holds"}
_MAX_SWEEPS = 4
# Coarse-to-fine start (``_coarse_start``): subsample strides grow by this factor while every latent still gets at
# least _COARSEST codewords.
_COARSE_FACTOR, _COARSEST = 8, 8
# ``_smallest``: up to this many candidates, the quadratic count instead of a selection.
_FEW_CANDIDATES = 256
# ``_withdraw_moves``: a whole row of moves is recomputed once at least 1 / _WHOLE_ROW_SHARE of its targets need it.
_WHOLE_ROW_SHARE = 8


@njit(cache=True, nogil=True, inline="always")
def _keep_two(v, code, b1, c1, b2, c2):
    """(value, code) v, code offered to the two smallest (b1, c1) <= (b2, c2); returns the new two. Branch-free, so
    the loops that call it vectorize."""
    lo = v < b1
    mid = v < b2
    return ((v if lo else b1), (code if lo else c1),
            (b1 if lo else (v if mid else b2)), (c1 if lo else (code if mid else c2)))


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
        best1[k], arg1[k], best2[k], arg2[k] = _keep_two(v, i, b1, a1, b2, a2)


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
    group bounds (branch-free, vectorized) leave a few times m candidates, and a selection picks the answer among
    them: linear-time for many candidates, and for a few (short lists, K / B small) a count of the candidates below
    each, quadratic but branch-free, which beats the selection's copy and branches there."""
    n = values.shape[0]
    first = buf[:n]
    second = buf[n : 2 * n]
    group_min = buf[2 * n :]
    c = _below_group_bound(values, n, m, first, group_min)
    c = _below_group_bound(first, c, m, second, group_min)
    if c > _FEW_CANDIDATES:
        return np.partition(second[:c], m - 1)[m - 1]
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


# ------------------------------------------------------------------------------------------------
# Named arrays. Numba compiles a named tuple's fields to fixed positions, where a jitclass or structref would put the
# arrays behind a reference-counted box. Reading a field still updates the array's reference count, so the loops run
# per path or per hop take their arrays out once (``_shortest_paths``).
# Renaming or removing one of these named tuples leaves numba's cache index of the functions that took it unreadable
# (numba issue 6018: an AttributeError on import): delete stage1_tokenizer/__pycache__/shortest_path_solver.*.nb[ic].

# One position: the transposed costs CT (B, K), the codeword weights a (K,) and the latent weights b (B,).
Problem = namedtuple("Problem", ["CT", "a", "b"])

# The arrays one problem works in, allocated once for a run of problems (``_workspace``): C, the costs CT transposed
# (K, B) in the input's float type; latent i's list of codewords codes[i, :count[i]], with code_pot[i, s] the
# potential of codes[i, s] relative to latent i's offset (``PathState``) and slot[k, i] codeword k's place on that
# list (-1 where k is not on it: all -1 between problems); the sweeps' work space sweep_floats (7K,) float32 and
# sweep_ints (2K,) int32 (``_balance_potentials``); per codeword (K,): equal_weights (the weights with every positive
# one set to their mean), nearest_cost (``_sampled_imbalance``), largest_cost and slack (``_certificate``).
Workspace = namedtuple("Workspace", ["C", "codes", "code_pot", "slot", "sweep_floats", "sweep_ints", "equal_weights",
                                     "nearest_cost", "largest_cost", "slack"])

# What the shortest-path stages change: the plan X (B, K), the latent potentials p, the latents' loads beyond b
# (excess), the latents' lists (codes, code_pot, count, slot: ``Workspace``) and the offsets that make a potential
# update O(B): codeword k = codes[i, s] has potential q[k] = code_pot[i, s] + offset[i]. move[0, i, j] is the min over
# latent i's codewords k of C[k, j] - q[k] + offset[i] (the cheapest move of one of i's codewords to j, of reduced
# cost move[0, i, j] - offset[i] - p[j]) and move_code[0, i, j] that k; move[1], move_code[1]: the runner-up. C and
# CT are the problem's costs in both layouts.
PathState = namedtuple("PathState", ["C", "CT", "X", "p", "excess", "offset", "codes", "code_pot", "count", "slot",
                                     "move", "move_code"])


# Per position of a batch (``solve_positions``): costs (M,), code_potentials (M, K), latent_potentials (M, B),
# status (M,) and the plans' row sums (M, B).
PositionResults = namedtuple("PositionResults", ["costs", "code_potentials", "latent_potentials", "status",
                                                 "row_sums"])

# A batch's plans, compactly (``plan_buffers``).
CompactPlans = namedtuple("CompactPlans", ["owner", "share", "extra_code", "extra_latent", "extra_share",
                                           "extra_count"])


# ------------------------------------------------------------------------------------------------
# the latents' lists of codewords and their cheapest moves


@njit(cache=True, nogil=True, inline="always")
def _offer_moves(move, move_code, i, C, k, qk):
    """Codeword k (potential qk, relative to latent i's offset) joins latent i's candidates for every move i -> l:
    move[0, i, l] / move_code[0, i, l] keep the cheapest, move[1] / move_code[1] the second cheapest (branch-free)."""
    for l in range(move.shape[2]):
        move[0, i, l], move_code[0, i, l], move[1, i, l], move_code[1, i, l] = _keep_two(
            C[k, l] - qk, k, move[0, i, l], move_code[0, i, l], move[1, i, l], move_code[1, i, l])


@njit(cache=True, nogil=True, inline="always")
def _cheapest_two_to(l, i, C, codes, code_pot, count):
    """The cheapest and second-cheapest move of one of latent i's codewords (codes[i, :count]) to latent l:
    (value, codeword) of each."""
    b1 = INF
    b2 = INF
    c1 = -1
    c2 = -1
    for s in range(count):
        kk = codes[i, s]
        b1, c1, b2, c2 = _keep_two(C[kk, l] - code_pot[i, s], kk, b1, c1, b2, c2)
    return b1, c1, b2, c2


@njit(cache=True, nogil=True)
def _withdraw_moves(move, move_code, i, C, k, codes, code_pot, count):
    """Codeword k has left latent i (whose list is codes[i, :count]): where it held the cheapest move i -> l, the
    runner-up takes its place; a runner-up that leaves, or is promoted, leaves its place unknown (-inf, which
    ``_offer_moves`` fills only with the old first). A move whose runner-up is unknown is recomputed over latent i's
    list: target by target (a gather per codeword) when few are, else latent i's whole row of moves at once, one
    contiguous cost row C[kk] per codeword (as fast per entry as the gathers are slow: short lists, K / B small)."""
    B = move.shape[2]
    unknown = 0
    for l in range(B):
        unknown += (move_code[0, i, l] == k) & (move_code[1, i, l] < 0)
    if unknown * _WHOLE_ROW_SHARE >= B:
        for l in range(B):
            move[0, i, l] = INF
            move[1, i, l] = INF
            move_code[0, i, l] = -1
            move_code[1, i, l] = -1
        for s in range(count):
            _offer_moves(move, move_code, i, C, codes[i, s], code_pot[i, s])
        return
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
        move[0, i, l], move_code[0, i, l], move[1, i, l], move_code[1, i, l] = _cheapest_two_to(
            l, i, C, codes, code_pot, count)


@njit(cache=True, nogil=True)
def _clear_support(X, slot, codes, count):
    """Back to an all-zero X and an all -1 slot, clearing only the plan's support (its lists' entries) instead of all
    K x B entries."""
    for i in range(count.shape[0]):
        for s in range(count[i]):
            k = codes[i, s]
            X[i, k] = 0.0
            slot[k, i] = -1


# ------------------------------------------------------------------------------------------------
# successive shortest paths. The helpers run once per path or per hop: they take their arrays one by one and are
# inlined, since a call or a named tuple's field read (a reference count update) at that rate costs a measurable
# share of the solve.


@njit(cache=True, nogil=True, inline="always")
def _open_search(excess, key, closed, pred, mass_tol):
    """Dijkstra's start: every overloaded latent a root at distance 0. False when no latent is overloaded."""
    any_over = False
    for j in range(excess.shape[0]):
        over = excess[j] > mass_tol
        key[j] = 0.0 if over else INF
        any_over |= over
        closed[j] = 0.0
        pred[j] = -1
    return any_over


@njit(cache=True, nogil=True, inline="always")
def _lowest(key):
    """(argmin, min) of key, branch-free."""
    i = 0
    di = key[0]
    for j in range(1, key.shape[0]):
        kj = key[j]
        lower = kj < di
        di = kj if lower else di
        i = j if lower else i
    return i, di


@njit(cache=True, nogil=True, inline="always")
def _relax(move, p, closed, key, pred, i, base):
    """Latent i settled at distance base + offset[i]: the edges i -> j lower the open latents' tentative distances."""
    for j in range(key.shape[0]):
        nd = base + move[0, i, j] - p[j] + closed[j]
        lower = nd < key[j]
        key[j] = nd if lower else key[j]
        pred[j] = i if lower else pred[j]


@njit(cache=True, nogil=True, inline="always")
def _tighten(p, offset, order, dist, reach, settled):
    """Potentials of the latents settled before the path's target (at distance reach): reduced costs stay >= 0 and
    the path becomes tight."""
    for r in range(settled):
        j = order[r]
        shift = reach - dist[j]
        p[j] -= shift
        offset[j] += shift


@njit(cache=True, nogil=True, inline="always")
def _trace_path(X, excess, move_code, pred, giver, receiver, code, target):
    """The path from the target back to its root, hop h moving codeword code[h] from latent giver[h] to receiver[h];
    returns (hops, root, the mass the path can carry)."""
    hops = 0
    node = target
    delta = -excess[target]
    while pred[node] != -1:
        i = pred[node]
        k = move_code[0, i, node]
        giver[hops] = i
        receiver[hops] = node
        code[hops] = k
        hops += 1
        if X[i, k] < delta:
            delta = X[i, k]
        node = i
    if excess[node] < delta:
        delta = excess[node]
    return hops, node, delta


@njit(cache=True, nogil=True, inline="always")
def _join_list(codes, code_pot, count, slot, j, k, relative_pot):
    """Codeword k joins latent j's list with potential relative_pot (relative to j's offset); returns its place."""
    c = count[j]
    slot[k, j] = c
    codes[j, c] = k
    code_pot[j, c] = relative_pot
    count[j] = c + 1
    return c


@njit(cache=True, nogil=True, inline="always")
def _leave_list(codes, code_pot, count, slot, i, k):
    """Codeword k leaves latent i's list, whose last entry takes its place; returns the list's new length."""
    r = slot[k, i]
    c = count[i] - 1
    last = codes[i, c]
    codes[i, r] = last
    code_pot[i, r] = code_pot[i, c]
    slot[last, i] = r
    slot[k, i] = -1
    count[i] = c
    return c


@njit(cache=True, nogil=True)
def _shortest_paths(state, mass_tol, max_augmentations):
    """Successive shortest paths until every latent balances within mass_tol; returns (status, augmentations). Each
    path runs from the overloaded latents to the nearest underloaded one (Dijkstra over the edges' cheapest moves)
    and moves as much mass as its hops and ends allow."""
    C, X, p, excess, offset = state.C, state.X, state.p, state.excess, state.offset
    codes, code_pot, count, slot, move, move_code = (state.codes, state.code_pot, state.count, state.slot, state.move,
                                                     state.move_code)
    B = p.shape[0]
    # Dijkstra's labels: tentative distance key (+inf once settled), closed (0 while open, +inf once settled: added
    # to relaxed distances), distance dist once settled, settling order, predecessor pred; and the path's hops.
    key, closed, dist = np.empty(B), np.empty(B), np.empty(B)
    pred, order = np.empty(B, np.int64), np.empty(B, np.int64)
    giver, receiver, code = np.empty(B, np.int64), np.empty(B, np.int64), np.empty(B, np.int64)
    dust = 0.1 * mass_tol  # masses this small are rounding residues, far below what the loads must balance to
    augmentations = 0
    while _open_search(excess, key, closed, pred, mass_tol):
        if augmentations >= max_augmentations:
            return NO_PROGRESS, augmentations
        settled = 0
        while True:  # Dijkstra, until it settles an underloaded latent
            i, reach = _lowest(key)
            if reach == INF:
                return NO_PROGRESS, augmentations
            if excess[i] < -mass_tol:
                break
            dist[i] = reach
            key[i] = INF
            closed[i] = INF
            order[settled] = i
            settled += 1
            _relax(move, p, closed, key, pred, i, reach - offset[i])
        target = i  # the path's end; its potentials, hops and mass
        _tighten(p, offset, order, dist, reach, settled)
        hops, root, delta = _trace_path(X, excess, move_code, pred, giver, receiver, code, target)
        for h in range(hops):  # the mass moves; codewords join and leave the latents' lists
            i, j, k = giver[h], receiver[h], code[h]
            X[j, k] += delta
            if slot[k, j] < 0:
                c = _join_list(codes, code_pot, count, slot, j, k, code_pot[i, slot[k, i]] + offset[i] - offset[j])
                _offer_moves(move, move_code, j, C, k, code_pot[j, c])
            rest = X[i, k] - delta
            if rest <= dust:
                # The whole entry moves: a rounding residue left behind would be the bottleneck of later paths,
                # each moving only that residue. The two loads absorb it.
                X[j, k] += rest
                excess[i] -= rest
                excess[j] += rest
                X[i, k] = 0.0
                c = _leave_list(codes, code_pot, count, slot, i, k)
                _withdraw_moves(move, move_code, i, C, k, codes, code_pot, c)
            else:
                X[i, k] = rest
        excess[target] = 0.0 if delta >= -excess[target] else excess[target] + delta
        excess[root] = 0.0 if delta >= excess[root] else excess[root] - delta
        augmentations += 1
    return OK, augmentations


# ------------------------------------------------------------------------------------------------
# one problem, stage by stage


@njit(cache=True, nogil=True)
def _workspace(B, K, dtype):
    """``Workspace`` for problems of B latents and K codewords, allocated once for a run of problems: large
    allocations freed and made again per problem cost page faults, which threads solving side by side contend for."""
    return Workspace(np.empty((K, B), dtype), np.empty((B, K), np.int32), np.empty((B, K)),
                     np.full((K, B), -1, np.int32), np.empty(7 * K, np.float32), np.empty(2 * K, np.int32),
                     np.empty(K), np.empty(K), np.empty(K), np.empty(K))


@njit(cache=True, nogil=True)
def _first_codewords(work, n):
    """The part of ``work`` that a problem over n codewords uses."""
    return Workspace(work.C[:n], work.codes[:, :n], work.code_pot[:, :n], work.slot[:n], work.sweep_floats[: 7 * n],
                     work.sweep_ints[: 2 * n], work.equal_weights[:n], work.nearest_cost[:n], work.largest_cost[:n],
                     work.slack[:n])


@njit(cache=True, nogil=True)
def _transpose_costs(problem, C):
    """C = CT transposed (float32 costs stay float32: half the memory traffic); False where a cost or weight is not
    finite. Blocked: a cache line of CT at a time."""
    CT, a = problem.CT, problem.a
    B, K = CT.shape
    finite = True
    for k0 in range(0, K, 16):
        k1 = min(k0 + 16, K)
        for i in range(B):
            for k in range(k0, k1):
                v = CT[i, k]
                C[k, i] = v
                finite &= abs(v) < INF
    for k in range(K):
        if not abs(a[k]) < INF:
            finite = False
    return finite


@njit(cache=True, nogil=True)
def _equal_masses(a, out):
    """The weights with every positive one set to their mean: ``a`` itself when they are equal already, else written
    to out. Returns (those weights, whether they are ``a``, their positive value)."""
    positive = 0
    for k in range(a.shape[0]):
        if a[k] > 0:
            positive += 1
    unit = 1.0 / positive
    same_mass = True
    for k in range(a.shape[0]):
        if a[k] > 0 and a[k] != unit:
            same_mass = False
    if same_mass:
        return a, True, unit
    for k in range(a.shape[0]):
        out[k] = unit if a[k] > 0 else 0.0
    return out, False, unit


@njit(cache=True, nogil=True)
def _start_potentials(problem, p, work):
    """Latent potentials to start from, with no subsample's at hand (``problem`` with equal masses)."""
    CT, a, b = problem
    B, K = CT.shape
    p[:] = 0.0
    if B == 1:
        return
    # p = 0 or each latent's mean cost, whichever leaves fewer codewords in excess. The mean cancels the |latent|^2
    # part of the cost, which decides every codeword's preference while the codebook is still near the origin (a
    # fresh tokenizer); with a trained codebook p = 0 is usually better.
    centred = np.empty(B)
    for i in range(B):
        total = 0.0
        for k in range(0, K, 8):
            total += CT[i, k]
        centred[i] = total / ((K + 7) // 8)
    best, near = work.nearest_cost, work.sweep_ints[:K]
    if _sampled_imbalance(CT, centred, a, b, 8, best, near) < _sampled_imbalance(CT, p, a, b, 8, best, near):
        p[:] = centred
    # Sweeps while the loads are far from balanced: a sweep costs a few passes over the costs and removes a large
    # share of the imbalance, hence of the shortest paths.
    for _ in range(_MAX_SWEEPS):
        if _balance_potentials(CT, a, b, p, work.sweep_floats, work.sweep_ints) <= 4.0 * K / B:
            break


@njit(cache=True, nogil=True)
def _path_state(CT, X, p, work):
    """``PathState`` for a problem of costs CT, its lists empty."""
    B = CT.shape[0]
    return PathState(work.C, CT, X, p, np.empty(B), np.zeros(B), work.codes, work.code_pot, np.zeros(B, np.int64),
                     work.slot, np.full((2, B, B), INF), np.full((2, B, B), -1, np.int32))


@njit(cache=True, nogil=True)
def _assign_nearest(state, a, b, q, near):
    """Every codeword with mass a[k] > 0 goes whole to its cheapest latent under the potentials p, onto that latent's
    list. q and near (K,): work space."""
    C, X, excess, count, slot, codes, code_pot = (state.C, state.X, state.excess, state.count, state.slot,
                                                  state.codes, state.code_pot)
    move, move_code = state.move, state.move_code
    for j in range(b.shape[0]):
        excess[j] = -b[j]
    _nearest_latents(state.CT, state.p, 1, q, near)
    for k in range(a.shape[0]):
        if a[k] > 0:
            i = near[k]
            X[i, k] = a[k]
            excess[i] += a[k]
            c = count[i]
            slot[k, i] = c
            codes[i, c] = k
            code_pot[i, c] = q[k]
            count[i] = c + 1
            _offer_moves(move, move_code, i, C, k, q[k])


@njit(cache=True, nogil=True)
def _rescale_masses(state, a, b, unit):
    """From the plan of equal masses (unit each) to one of the true masses a, on the same support: the potentials
    stay feasible and tight, and only the loads change."""
    X, excess, codes, count = state.X, state.excess, state.codes, state.count
    for j in range(b.shape[0]):
        excess[j] = -b[j]
    for i in range(b.shape[0]):
        for s in range(count[i]):
            k = codes[i, s]
            X[i, k] *= a[k] / unit
            excess[i] += X[i, k]


@njit(cache=True, nogil=True)
def _code_potentials(state, a, q):
    """The codeword potentials q from the lists; a codeword without mass gets the largest feasible one."""
    C, p, codes, code_pot, count, offset = state.C, state.p, state.codes, state.code_pot, state.count, state.offset
    for i in range(p.shape[0]):
        for s in range(count[i]):
            q[codes[i, s]] = code_pot[i, s] + offset[i]
    for k in range(a.shape[0]):
        if a[k] <= 0:
            lowest = INF
            for j in range(p.shape[0]):
                lowest = min(lowest, C[k, j] - p[j])
            q[k] = lowest


@njit(cache=True, nogil=True)
def _certificate(state, problem, q, gap_tol, work):
    """The plan's cost, and whether the duals certify it optimal: feasible (q[k] + p[i] <= C[k, i]) and of equal
    objective, both within gap_tol relative to the largest cost. The plan is zero off the latents' lists."""
    CT, a, b = problem
    C, X, p, codes, count = state.C, state.X, state.p, state.codes, state.count
    cost = 0.0
    for i in range(p.shape[0]):
        for s in range(count[i]):
            k = codes[i, s]
            cost += X[i, k] * C[k, i]
    # Per-codeword running extremes (elementwise, so the loop vectorizes), reduced once at the end.
    largest, slack = work.largest_cost, work.slack
    largest[:] = 0.0
    slack[:] = 0.0
    for j in range(p.shape[0]):
        row = CT[j]
        pj = p[j]
        for k in range(row.shape[0]):
            c = row[k]
            largest[k] = max(largest[k], c)
            slack[k] = min(slack[k], c - q[k] - pj)
    dual = 0.0
    for k in range(a.shape[0]):
        if a[k] > 0:
            dual += a[k] * q[k]
    for j in range(p.shape[0]):
        dual += b[j] * p[j]
    tol = gap_tol * max(largest.max(), 1e-300)
    return cost, abs(cost - dual) <= tol and slack.min() >= -tol


@njit(cache=True, nogil=True)
def _solve_from(problem, X, q, p, mass_tol, gap_tol, work, warm):
    """``solve_position`` from latent potentials p when ``warm`` (else from a start of its own), also returning the
    plan's support: latent i holds codewords codes[i, :count[i]]. X must be all zero on entry (clearing only the
    support afterwards is much cheaper than clearing B x K entries)."""
    CT, a, b = problem
    B, K = CT.shape
    if not _transpose_costs(problem, work.C):
        return 0.0, NON_FINITE, 0, work.codes, np.zeros(B, np.int64)
    equal, same_mass, unit = _equal_masses(a, work.equal_weights)
    # From a subsample's potentials (warm) the paths left are cheaper than the sweeps of a start of its own.
    if not warm:
        _start_potentials(Problem(CT, equal, b), p, work)
    state = _path_state(CT, X, p, work)
    _assign_nearest(state, equal, b, q, work.sweep_ints[:K])
    # Paths with every codeword at the same mass first: an integral problem that needs few augmentations (each moves
    # a whole codeword), whose optimal potentials are close to those of the true weights (near uniform in practice).
    # Then the true masses on the same support, and the paths that finish. Exactness does not depend on this: it
    # only shortens the path count.
    max_augmentations = 50 * (K + B) + 1000
    status, augmentations = _shortest_paths(state, mass_tol, max_augmentations)
    if status == OK and not same_mass:
        _rescale_masses(state, a, b, unit)
        status, more = _shortest_paths(state, mass_tol, max_augmentations)
        augmentations += more
    if status != OK:
        return 0.0, status, augmentations, work.codes, state.count
    _code_potentials(state, a, q)
    cost, certified = _certificate(state, problem, q, gap_tol, work)
    return cost, OK if certified else GAP, augmentations, work.codes, state.count


@njit(cache=True, nogil=True)
def _coarsest_stride(K, B):
    """The first subsample's stride in ``_coarse_start``: every s-th codeword, s a power of _COARSE_FACTOR, with at
    least _COARSEST codewords per latent; 1 when no subsample is that large."""
    stride = 1
    while K // (stride * _COARSE_FACTOR) >= _COARSEST * B:
        stride *= _COARSE_FACTOR
    return stride


@njit(cache=True, nogil=True)
def _coarse_start(problem, X, q, p, mass_tol, gap_tol, work):
    """Latent potentials p from subsamples, coarse to fine: the problem restricted to every s-th codeword (equal
    masses) is solved exactly for s = ..., 64, 8 (``_coarsest_stride``), each from the potentials of the one before.
    The optimal latent potentials of a subsample are close to those of the whole codebook, so the sweeps and paths
    of the whole problem only correct sampling noise, which matters most on a trained tokenizer's latents (close
    together, where the sweeps alone converge slowly). Returns (whether p holds the
    finest subsample's optimal potentials, how many subsamples were solved). X and the lists are left cleared."""
    CT, a, b = problem
    B, K = CT.shape
    stride = _coarsest_stride(K, B)
    warm = False
    levels = 0
    while stride > 1 and B > 1:
        sub = np.ascontiguousarray(CT[:, ::stride])
        n = sub.shape[1]
        equal = np.empty(n)
        total = 0.0
        for j in range(n):
            equal[j] = 1.0 if a[j * stride] > 0 else 0.0
            total += equal[j]
        if total < B:
            break
        equal /= total
        _, status, _, codes, count = _solve_from(Problem(sub, equal, b), X[:, :n], q[:n], p, mass_tol, gap_tol,
                                                 _first_codewords(work, n), warm)
        _clear_support(X, work.slot, codes, count)
        warm = status == OK
        levels += 1
        stride //= _COARSE_FACTOR
    return warm, levels


@njit(cache=True, nogil=True)
def _solve_position(problem, X, q, p, mass_tol, gap_tol, work):
    """``_solve_from`` after ``_coarse_start``. Exactness does not depend on the start."""
    warm, _ = _coarse_start(problem, X, q, p, mass_tol, gap_tol, work)
    return _solve_from(problem, X, q, p, mass_tol, gap_tol, work, warm)


@njit(cache=True, nogil=True)
def solve_position(CT, a, b, X, q, p, mass_tol, gap_tol):
    """Exact OT for one position. CT (B, K) the transposed cost, a (K,) >= 0, b (B,) > 0, equal sums (normalized to 1).

    Writes the transposed plan X (B, K), codeword potentials q and latent potentials p; returns (cost, status, augmentations).
    ``status`` is OK only when the plan balances within ``mass_tol`` and its cost equals the dual objective
    a.q + b.p within ``gap_tol`` (relative), with q + p <= C up to the same tolerance: a certificate of
    optimality computed from the outputs themselves."""
    X[:, :] = 0.0
    cost, status, augmentations, _, _ = _solve_position(Problem(CT, a, b), X, q, p, mass_tol, gap_tol,
                                                        _workspace(CT.shape[0], CT.shape[1], CT.dtype))
    return cost, status, augmentations


# ------------------------------------------------------------------------------------------------
# a batch of positions, and its plans kept compactly


def result_buffers(M, K, B):
    """``PositionResults`` for M positions of K codewords and B latents."""
    return PositionResults(np.empty(M), np.empty((M, K)), np.empty((M, B)), np.zeros(M, np.int64), np.empty((M, B)))


def plan_buffers(M, K, B):
    """Where ``solve_positions`` leaves the plans, compactly (``CompactPlans``): owner[m, k] is the latent holding
    codeword k's mass share[m, k] at position m (-1: none), and a codeword split over several latents puts the other
    parts in the extra_* lists, extra_count[m] of them (at most B - 1 per position in a basic solution; room for
    4B)."""
    room = 4 * B  # owner and share are filled position by position (record_dense_plan, solve_positions)
    return CompactPlans(np.empty((M, K), np.int32), np.empty((M, K)), np.empty((M, room), np.int64),
                        np.empty((M, room), np.int64), np.empty((M, room)), np.zeros(M, np.int64))


@njit(cache=True, nogil=True)
def _record_entry(plan, m, i, k, x):
    """Plan entry x between codeword k and latent i at position m; False when the extra lists are full."""
    if plan.owner[m, k] < 0:
        plan.owner[m, k] = i
        plan.share[m, k] = x
        return True
    n = plan.extra_count[m]
    if n >= plan.extra_code.shape[1]:
        return False
    plan.extra_code[m, n] = k
    plan.extra_latent[m, n] = i
    plan.extra_share[m, n] = x
    plan.extra_count[m] = n + 1
    return True


@njit(cache=True, nogil=True)
def record_dense_plan(plan_t, m, plan, row_sums):
    """A dense plan (B, K) (POT's, where this solver is not used) into ``plan`` at position m, its row sums into
    row_sums (B,); False when it has more split codewords than the extra lists hold."""
    B, K = plan_t.shape
    plan.owner[m, :] = -1
    plan.extra_count[m] = 0
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
def _record_support(X, codes, count, plan, m, row_sums):
    """The plan X, zero off the latents' lists (K + B entries or so out of K * B), into ``plan`` at position m and
    its row sums into row_sums; False when it has more split codewords than the extra lists hold."""
    plan.owner[m, :] = -1
    plan.extra_count[m] = 0
    recorded = True
    for i in range(count.shape[0]):
        row = 0.0
        for s in range(count[i]):
            k = codes[i, s]
            x = X[i, k]
            if x > 0.0:
                row += x
                recorded &= _record_entry(plan, m, i, k, x)
        row_sums[i] = row
    return recorded


@njit(cache=True, nogil=True)
def _centre_duals(a, b, u, v):
    """Shifts u up and v down by one constant so that a.u = b.v, as POT's ``center_ot_dual`` does."""
    au = 0.0
    total = 0.0
    for k in range(a.shape[0]):
        au += a[k] * u[k]
        total += a[k]
    bv = 0.0
    for j in range(b.shape[0]):
        bv += b[j] * v[j]
        total += b[j]
    shift = (bv - au) / total
    for k in range(u.shape[0]):
        u[k] += shift
    for j in range(v.shape[0]):
        v[j] -= shift


@njit(cache=True, nogil=True)
def solve_positions(C_t, A, b, positions, results, plan, mass_tol, gap_tol):
    """``solve_position`` over ``positions`` (one call per run of positions a thread takes). C_t (M, B, K) costs
    (float32 or float64), A (M, K) weights. Per position m into ``results`` (``result_buffers``): its cost, its
    potentials (centred, ``_centre_duals``), its status and its plan's row sums; the plan itself into ``plan``
    (``plan_buffers``; ``plan_products`` turns it into what the gradients need). Plans only for positions solved
    with status OK."""
    Mn, B, K = C_t.shape
    X = np.zeros((B, K))
    work = _workspace(B, K, C_t.dtype)
    for r in range(positions.shape[0]):
        m = positions[r]
        u, v = results.code_potentials[m], results.latent_potentials[m]
        cost, status, _, codes, count = _solve_position(Problem(C_t[m], A[m], b), X, u, v, mass_tol, gap_tol, work)
        results.costs[m] = cost
        if status == OK:
            _centre_duals(A[m], b, u, v)
            if not _record_support(X, codes, count, plan, m, results.row_sums[m]):
                status = OVERFLOW
        results.status[m] = status
        _clear_support(X, work.slot, codes, count)


@njit(cache=True, nogil=True)
def plan_products(plan, Z, codebook, first, stop, Pc, PTz, Pcol):
    """From the plans P_m (``solve_positions``) of every position, over codewords first..stop-1 (one range per
    thread): Pc += P_m codebook (M, B, D), PTz[k] = sum_m (P_m^T Z[m])[k] (K, D) and Pcol[k] = P's column sums
    summed over positions (K,). Codeword-major in blocks: a codeword's row of PTz and of the codebook is read
    once for all positions, so the pass streams the compact plans instead of a K x D array per position. The
    extra entries (split codewords) are left to ``plan_extra_products``."""
    owner, share = plan.owner, plan.share
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
    for m in range(plan.extra_count.shape[0]):
        for r in range(plan.extra_count[m]):
            k = plan.extra_code[m, r]
            i = plan.extra_latent[m, r]
            x = plan.extra_share[m, r]
            Pcol[k] += x
            for d in range(codebook.shape[1]):
                PTz[k, d] += x * Z[m, i, d]
                Pc[m, i, d] += x * codebook[k, d]
