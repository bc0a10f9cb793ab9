"""Exactness of the batched OT loss against a naive per-position loop of POT's ot.emd2 (torch backend)."""

from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from stage1_tokenizer.transport import SOLVERS, _pairwise_sqdist, wasserstein_loss

SHAPES = [  # (M, K, B)
    (1, 8, 2),
    (3, 64, 7),
    (3, 8, 32),  # K < B
    (4, 8, 64),  # K < B
    (64, 512, 32),  # reference setting
]


def _problem(m, k, b, d=16, weights="peaked", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, b, d, generator=g, dtype=torch.float64)
    c = 0.7 * torch.randn(k, d, generator=g, dtype=torch.float64)
    if weights == "uniform":
        w = torch.full((m, k), 1.0 / k, dtype=torch.float64)
    else:  # softmax of large logits: generic weights, unique optimal duals
        w = torch.softmax(3.0 * torch.randn(m, k, generator=g, dtype=torch.float64), 1)
    return [t.to(dtype).requires_grad_() for t in (z, c, w)]


def _grads(fn, z, c, w):
    for t in (z, c, w):
        t.grad = None
    loss = fn(z, c, w)
    loss.backward()
    return loss.detach(), z.grad.clone(), c.grad.clone(), w.grad.clone()


def _naive(z, c, w):
    cost = _pairwise_sqdist(c, z)
    b = torch.full((z.shape[1],), 1.0 / z.shape[1], dtype=z.dtype)
    return sum(ot.emd2(w[m], b, cost[m]) for m in range(z.shape[0]))


def _close(x, y, rtol=1e-9):
    scale = max(1.0, float(y.abs().max()))
    assert float((x - y).abs().max()) <= rtol * scale, float((x - y).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_pot_peaked_weights(shape):
    z, c, w = _problem(*shape, weights="peaked", seed=sum(shape))
    ref = _grads(_naive, z, c, w)
    for solver in SOLVERS:
        out = _grads(lambda *x: wasserstein_loss(*x, solver=solver), z, c, w)
        for o, r in zip(out, ref):  # value, d/dlatents, d/dcodebook, d/dweights: all unique here
            _close(o, r)


def test_large_batch_matches_pot_on_sampled_positions():
    """M=256, K=512, B=64 in one call; the (slow) naive POT loop is run on 24 of the positions, whose
    latents/weights gradient rows are independent of the others."""
    z, c, w = _problem(256, 512, 64, weights="peaked", seed=11)
    rows = torch.arange(0, 256, 11)
    zs = z.detach()[rows].clone().requires_grad_()
    cs = c.detach().clone().requires_grad_()
    ws = w.detach()[rows].clone().requires_grad_()
    ref = _grads(_naive, zs, cs, ws)
    for solver in SOLVERS:
        out = _grads(lambda *x: wasserstein_loss(*x, solver=solver), z, c, w)
        _close(out[1][rows], ref[1])
        _close(out[3][rows], ref[3])
        sub = _grads(lambda *x: wasserstein_loss(*x, solver=solver), zs, cs, ws)
        for o, r in zip(sub, ref):
            _close(o, r)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape", [(3, 64, 7), (3, 8, 32), (64, 512, 32)])
def test_uniform_weights_degenerate(shape, solver):
    """Degenerate problem: value and plan-driven gradients are unique; the dual is only checked for validity."""
    z, c, w = _problem(*shape, weights="uniform", seed=1 + sum(shape))
    ref = _grads(_naive, z, c, w)
    loss, gz, gc, gw = _grads(lambda *x: wasserstein_loss(*x, solver=solver), z, c, w)
    _close(loss, ref[0])
    _close(gz, ref[1])
    _close(gc, ref[2])
    # weights gradient: centred, and an optimal dual: with v its c-transform (hence feasible on every
    # edge), the dual objective equals the primal optimum, position by position.
    _close(gw.sum(1), torch.zeros(gw.shape[0], dtype=gw.dtype))
    cost = _pairwise_sqdist(c, z).detach()
    b = 1.0 / z.shape[1]
    v = (cost - gw[:, :, None]).min(1).values
    dual = (w.detach() * gw).sum(1) + b * v.sum(1)
    primal = torch.stack([ot.emd2(w[m].detach(), torch.full((z.shape[1],), b, dtype=z.dtype), cost[m]) for m in range(z.shape[0])])
    _close(dual, primal)


def test_float32_matches_float64():
    z, c, w = _problem(8, 512, 32, d=64, weights="peaked", seed=3)
    out64 = _grads(wasserstein_loss, z, c, w)
    z32, c32, w32 = [t.detach().float().requires_grad_() for t in (z, c, w)]
    out32 = _grads(wasserstein_loss, z32, c32, w32)
    assert out32[0].dtype == torch.float32 and z32.grad.dtype == torch.float32
    assert abs(float(out32[0]) - float(out64[0])) <= 1e-5 * abs(float(out64[0]))
    for o32, o64 in zip(out32[1:3], out64[1:3]):
        assert float((o32.double() - o64).abs().max()) <= 1e-3 * float(o64.abs().max())


def test_unnormalized_float32_softmax_rows_are_fine():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 32, 64, generator=g)
    c = torch.randn(512, 64, generator=g)
    w = torch.softmax(torch.randn(4, 512, generator=g) * 5, 1)  # rows sum to 1 only within ~1e-7
    loss = wasserstein_loss(z, c, w)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_shape_and_input_errors():
    z = torch.randn(4, 8, 3)
    c = torch.randn(16, 3)
    w = torch.full((4, 16), 1 / 16)
    with pytest.raises(ValueError, match="latents"):
        wasserstein_loss(z[0], c, w)
    with pytest.raises(ValueError, match="codebook"):
        wasserstein_loss(z, torch.randn(16, 4), w)
    with pytest.raises(ValueError, match=r"weights must have shape \(M, K\) = \(4, 16\)"):
        wasserstein_loss(z, c, w[:3])
    for solver in ("lp", "sinkhorn", "auto"):  # names a config file may still carry
        with pytest.raises(ValueError, match="solver must be one of"):
            wasserstein_loss(z, c, w, solver=solver)
    with pytest.raises(ValueError, match="nonnegative"):
        wasserstein_loss(z, c, -w)


def test_zero_weight_codewords_follow_pot():
    z, c, w = _problem(3, 16, 5, weights="peaked", seed=7)
    w0 = w.detach().clone()
    w0[:, :4] = 0
    w0 = (w0 / w0.sum(1, keepdim=True)).requires_grad_()
    ref = _grads(_naive, z, c, w0)
    for solver in SOLVERS:
        out = _grads(lambda *x: wasserstein_loss(*x, solver=solver), z, c, w0)
        for o, r in zip(out[:3], ref[:3]):
            _close(o, r)


def test_reference_size_values_match_pot():
    """The reference setting (64 positions, B = 32, K = 512, D = 64), uniform and peaked weights."""
    for seed, kind in [(100, "peaked"), (101, "uniform")]:
        z, c, w = _problem(64, 512, 32, d=64, weights=kind, seed=seed)
        with torch.no_grad():
            _close(wasserstein_loss(z, c, w), _naive(z, c, w), rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# the shortest-path solver against POT's network simplex, problem by problem


def _random_position(kind, K, B, rng):
    z = rng.normal(size=(B, 8))
    c = 0.7 * rng.normal(size=(K, 8))
    if kind == "clustered":  # a trained encoder's latents at one position: a tight cluster
        z = 0.05 * z + rng.normal(size=8)
    if kind == "ties":  # repeated latents and codewords: a degenerate problem
        z[B // 2 :] = z[: B - B // 2]
        c[K // 2 :] = c[: K - K // 2]
    a = {
        "near_uniform": lambda: np.full(K, 1.0 / K) * (1 + 0.03 * rng.uniform(-1, 1, size=K)),
        "uniform": lambda: np.full(K, 1.0 / K),
        "peaked": lambda: np.exp(3.0 * rng.normal(size=K)),
        "zeros": lambda: np.where(rng.uniform(size=K) < 0.3, 0.0, rng.uniform(size=K)),
    }["uniform" if kind in ("clustered", "ties") else kind]()
    a = a / a.sum()
    C = ((c[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return C, a


@pytest.mark.parametrize("kind", ["near_uniform", "uniform", "peaked", "zeros", "clustered", "ties"])
def test_shortest_path_solver_is_certified_optimal(kind):
    from stage1_tokenizer.shortest_path_solver import OK, solve_position

    rng = np.random.default_rng(len(kind))
    for K, B in [(8, 2), (64, 16), (256, 7), (512, 32), (512, 128), (4096, 32)]:
        C, a = _random_position(kind, K, B, rng)
        b = np.full(B, 1.0 / B)
        X, q, p = np.empty((B, K)), np.empty(K), np.empty(B)
        cost, status, _ = solve_position(np.ascontiguousarray(C.T), a, b, X, q, p, 1e-13, 1e-9)
        assert status == OK, (K, B)
        ref = ot.emd2(a, b, C, numItermax=100_000)
        assert abs(cost - ref) <= 1e-10 * max(1.0, ref), (K, B, cost, ref)
        # the certificate, checked here independently: a feasible plan, feasible duals, zero gap
        assert np.all(X >= 0)
        np.testing.assert_allclose(X.sum(1), b, atol=1e-12)
        np.testing.assert_allclose(X.sum(0), a, atol=1e-12)
        assert (C - q[:, None] - p[None, :]).min() >= -1e-9 * C.max()
        assert abs((X.T * C).sum() - (a @ q + b @ p)) <= 1e-9 * C.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_codebook_matches_pot(dtype):
    # K = 4096: latents hold ~128 codewords each, so paths withdraw codewords whose moves pass to the runner-up
    z, c, w = _problem(3, 4096, 32, d=64, weights="peaked", seed=21, dtype=dtype)
    ref = _grads(lambda *x: wasserstein_loss(*x, solver="dense"), z, c, w)
    out = _grads(lambda *x: wasserstein_loss(*x, solver="exact"), z, c, w)
    for o, r in zip(out, ref):
        _close(o, r, rtol=1e-9 if dtype == torch.float64 else 1e-4)


def test_clustered_latents_match_pot():
    # A trained tokenizer's latents at one position lie close together: the start from a subsample's potentials
    # (every 8th codeword at K = 4096, B = 32) carries the solve there, and must not change the optimum.
    z, c, w = _problem(2, 4096, 32, d=64, weights="peaked", seed=5)
    with torch.no_grad():
        z.copy_(z[:, :1] + 0.02 * z)
    ref = _grads(lambda *x: wasserstein_loss(*x, solver="dense"), z, c, w)
    out = _grads(lambda *x: wasserstein_loss(*x, solver="exact"), z, c, w)
    for o, r in zip(out, ref):
        _close(o, r)


def test_precomputed_costs_give_the_same_loss():
    from stage1_tokenizer.transport import transport_costs

    z, c, w = _problem(4, 256, 16, weights="peaked", seed=13)
    ref = _grads(wasserstein_loss, z, c, w)
    out = _grads(lambda *x: wasserstein_loss(*x, costs=transport_costs(x[1].detach(), x[0].detach())), z, c, w)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    with pytest.raises(ValueError, match="costs must be transport_costs"):
        wasserstein_loss(z, c, w, costs=transport_costs(c.detach(), z.detach())[:, :, :-1])


def test_compact_plans_give_the_dense_plans_products():
    from stage1_tokenizer.shortest_path_solver import (
        OK,
        OVERFLOW,
        plan_buffers,
        plan_extra_products,
        plan_products,
        result_buffers,
        solve_position,
        solve_positions,
    )

    M, K, B, D = 3, 300, 12, 5
    rng = np.random.default_rng(4)
    Z, codebook = rng.normal(size=(M, B, D)), rng.normal(size=(K, D))
    C_t = np.ascontiguousarray((((Z[:, :, None, :] - codebook[None, None]) ** 2).sum(-1)))
    A = np.exp(2.0 * rng.normal(size=(M, K)))
    A /= A.sum(1, keepdims=True)
    b = np.full(B, 1.0 / B)
    results = result_buffers(M, K, B)
    plan = plan_buffers(M, K, B)
    solve_positions(C_t, A, b, np.arange(M), results, plan, 1e-13, 1e-9)
    assert (results.status == OK).all() and plan.extra_count.max() > 0  # heavy-tailed weights split codewords
    Pc, PTz, Pcol = np.zeros((M, B, D)), np.empty((K, D)), np.empty(K)
    plan_products(plan, Z, codebook, 0, 170, Pc, PTz, Pcol)  # two ranges, as two threads would take them
    plan_products(plan, Z, codebook, 170, K, Pc, PTz, Pcol)
    plan_extra_products(plan, Z, codebook, Pc, PTz, Pcol)
    dense = []
    for m in range(M):
        X, q, p = np.empty((B, K)), np.empty(K), np.empty(B)
        solve_position(C_t[m], A[m], b, X, q, p, 1e-13, 1e-9)
        dense.append(X)
    np.testing.assert_allclose(Pc, np.stack([X @ codebook for X in dense]), atol=1e-12)
    np.testing.assert_allclose(results.row_sums, np.stack([X.sum(1) for X in dense]), atol=1e-12)
    np.testing.assert_allclose(PTz, sum(X.T @ z for X, z in zip(dense, Z)), atol=1e-12)
    np.testing.assert_allclose(Pcol, A.sum(0), atol=1e-12)
    # no room for split codewords: reported, for the caller to solve those positions with POT
    small = plan_buffers(M, K, B)
    small = small._replace(extra_code=small.extra_code[:, :0], extra_latent=small.extra_latent[:, :0],
                           extra_share=small.extra_share[:, :0])
    solve_positions(C_t, A, b, np.arange(M), results, small, 1e-13, 1e-9)
    assert (results.status == OVERFLOW).all()


def test_rounding_residues_do_not_stall_the_shortest_paths():
    # Heavy-tailed weights at B = 128 split codewords over many latents: rounding residues (~1e-18) left behind
    # would become the bottleneck of every later path (no progress, a POT fallback).
    from stage1_tokenizer.shortest_path_solver import OK, solve_position

    for seed in range(12):
        rng = np.random.default_rng(seed)
        K, B = 384, 128
        a = np.exp(2.0 * rng.normal(size=K))
        a /= a.sum()
        C = ((rng.normal(size=(K, 1, 4)) - rng.normal(size=(1, B, 4))) ** 2).sum(-1)
        b = np.full(B, 1.0 / B)
        X, q, p = np.empty((B, K)), np.empty(K), np.empty(B)
        cost, status, _ = solve_position(np.ascontiguousarray(C.T), a, b, X, q, p, 1e-13, 1e-9)
        assert status == OK, seed
        assert abs(cost - ot.emd2(a, b, C, numItermax=100_000)) <= 1e-10 * cost, seed
        np.testing.assert_allclose(X.sum(0), a, atol=1e-12)
        np.testing.assert_allclose(X.sum(1), b, atol=1e-12)


def _fail_position_2(monkeypatch):
    """The shortest-path solver as if it could not certify position 2: solved, but its answer (here: none) must not
    be used."""
    import stage1_tokenizer.transport as transport
    from stage1_tokenizer.shortest_path_solver import GAP

    solve = transport.solve_positions

    def failing(C_t, A, b, positions, results, *rest):
        solve(C_t, A, b, positions[positions != 2], results, *rest)
        results.status[positions[positions == 2]] = GAP

    monkeypatch.setattr(transport, "solve_positions", failing)


def test_uncertified_positions_fall_back_to_the_network_simplex(monkeypatch):
    z, c, w = _problem(4, 64, 8, weights="peaked", seed=5)
    expected = _grads(lambda *x: wasserstein_loss(*x, solver="dense"), z, c, w)
    _fail_position_2(monkeypatch)
    with pytest.warns(RuntimeWarning, match="position 2.*network simplex"):
        out = _grads(lambda *x: wasserstein_loss(*x, solver="exact"), z, c, w)
    for o, r in zip(out, expected):
        _close(o, r)


def test_a_fallback_fails_the_test_suite(monkeypatch):
    # pyproject's pytest filterwarnings makes the fallback's warning an error, so that no test passes on POT's answers
    # where the shortest-path solver's were meant to be checked.
    z, c, w = _problem(4, 64, 8, weights="peaked", seed=5)
    _fail_position_2(monkeypatch)
    with pytest.raises(RuntimeWarning, match="position 2.*network simplex"):
        wasserstein_loss(z, c, w, solver="exact")


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_inputs_are_rejected(solver):
    z, c, w = _problem(4, 64, 8, weights="peaked", seed=9)
    z = z.detach().clone()
    z[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        wasserstein_loss(z, c, w, solver=solver)


@pytest.mark.parametrize("kind", ["peaked", "zeros", "clustered"])
def test_coarse_start_runs_its_levels_and_keeps_the_optimum(kind):
    # The coarse-to-fine start runs one subsample level per factor 8 while each latent keeps 8 codewords: two levels
    # from K = 512 B, three from 4096 B. Small B reaches them at small K.
    from stage1_tokenizer.shortest_path_solver import (
        OK,
        Problem,
        _coarse_start,
        _coarsest_stride,
        _workspace,
        solve_position,
    )

    rng = np.random.default_rng(len(kind))
    for K, B, levels in [(1024, 2, 2), (4096, 8, 2), (8192, 2, 3)]:
        assert _coarsest_stride(K, B) == 8**levels
        C, a = _random_position(kind, K, B, rng)
        CT, b = np.ascontiguousarray(C.T), np.full(B, 1.0 / B)
        X, q, p = np.zeros((B, K)), np.empty(K), np.empty(B)
        work = _workspace(B, K, CT.dtype)
        warm, solved = _coarse_start(Problem(CT, a, b), X, q, p, 1e-13, 1e-9, work)
        assert warm and solved == levels, (K, B)
        assert not X.any() and (work.slot == -1).all()  # cleared for the whole problem's solve
        cost, status, _ = solve_position(CT, a, b, X, q, p, 1e-13, 1e-9)
        assert status == OK, (K, B)
        assert abs(cost - ot.emd2(a, b, C, numItermax=100_000)) <= 1e-10 * cost, (K, B)
        np.testing.assert_allclose(X.sum(0), a, atol=1e-12)
        np.testing.assert_allclose(X.sum(1), b, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_random_problems_match_pot(seed):
    """Random sizes (K from 4B, where the shortest-path solver takes over, to 1024 B or 4096: with and without the
    coarse start), masses uniform, random or with zeros, latents spread or clustered: value and gradients against a
    loop of ``ot.emd2``. The weights gradient is unique, and compared, for random masses only; otherwise it is checked
    to be an optimal dual."""
    rng = np.random.default_rng(1000 + seed)
    for masses in ("uniform", "random", "zeros"):
        for latents in ("spread", "clustered"):
            B = int(rng.integers(2, 41))
            K = min(4096, int(B * 2 ** rng.uniform(2, 10)))
            D = int(rng.choice([2, 8, 32]))
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))
            z = torch.randn(2, B, D, generator=g, dtype=torch.float64)
            if latents == "clustered":  # a trained encoder's latents at one position lie close together
                z = z[:, :1] + 0.02 * z
            c = 0.7 * torch.randn(K, D, generator=g, dtype=torch.float64)
            if masses == "uniform":
                w = torch.ones(2, K, dtype=torch.float64)
            elif masses == "random":
                w = torch.exp(2.0 * torch.randn(2, K, generator=g, dtype=torch.float64))
            else:  # about 30% of the codewords without mass
                w = torch.rand(2, K, generator=g, dtype=torch.float64) * (torch.rand(2, K, generator=g) < 0.7)
            z, c, w = (x.requires_grad_() for x in (z, c, w / w.sum(1, keepdim=True)))
            case = (masses, latents, K, B, D)
            ref = _grads(_naive, z, c, w)
            loss, gz, gc, gw = _grads(wasserstein_loss, z, c, w)
            for o, r in zip((loss, gz, gc), ref[:3]):
                assert float((o - r).abs().max()) <= 1e-9 * max(1.0, float(r.abs().max())), case
            if masses == "random":
                assert float((gw - ref[3]).abs().max()) <= 1e-9 * max(1.0, float(ref[3].abs().max())), case
                continue
            # an optimal dual: with v its c-transform (feasible on every edge), the dual objective is the optimum
            cost = _pairwise_sqdist(c, z).detach()
            v = (cost - gw[:, :, None]).min(1).values
            dual = (w.detach() * gw).sum(1) + v.sum(1) / B
            primal = torch.stack([ot.emd2(w[m].detach(), torch.full((B,), 1.0 / B, dtype=z.dtype), cost[m])
                                  for m in range(2)])
            assert float((dual - primal).abs().max()) <= 1e-9 * max(1.0, float(cost.max())), case


def test_every_solver_function_reads_in_one_screen():
    """The solver stays changeable: no function over 80 lines or with more than 8 positional parameters."""
    import ast

    for module in ("shortest_path_solver.py", "transport.py"):
        tree = ast.parse((Path(__file__).resolve().parents[2] / "stage1_tokenizer" / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                lines, positional = node.end_lineno - node.lineno + 1, len(node.args.posonlyargs) + len(node.args.args)
                assert lines <= 80 and positional <= 8, f"{module}: {node.name} has {lines} lines, {positional} parameters"
