"""OptVQ (stage1_tokenizer/quantizers/optvq.py): Sinkhorn assignment of the whole batch in training, checked against
POT; nearest codeword otherwise; k-means initialisation once, recorded in the checkpoint."""
import json

import numpy as np
import ot
import pytest
import torch

from configio.config import from_dict, load_config
from configio.errors import ConfigError
from helpers import TINY_TOKENIZER_ARGS, job
from pipelines import chain, compare
from pipelines.settings import TokenizerJobConfig
from stage1_tokenizer.model import Tokenizer, TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import QuantizerConfig, build_quantizer
from stage1_tokenizer.quantizers.optvq import (
    OptVQQuantizer,
    normalised_cost,
    optimal_transport_assignment,
    sinkhorn_potentials,
    transport_plan,
)

DIM = 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(**values) -> OptVQQuantizer:
    return build_quantizer(from_dict(QuantizerConfig, {"name": "optvq", "codebook_size": 16, **values}), DIM, 6)


def test_known_everywhere_through_the_registry():
    cfg = load_config(TokenizerJobConfig, None, ["quantizer.name=optvq", "quantizer.optvq_epsilon=5"])
    assert cfg.quantizer.resolved_beta == 0.25 and cfg.quantizer.optvq_iterations == 5
    assert chain.MODELS["optvq"] == ["quantizer.name=optvq"] and "OptVQ" in chain.DESCRIPTIONS["optvq"]
    summary = compare.quantizer_summary({"name": "optvq", "optvq_epsilon": 5.0})
    assert "beta 0.25" in summary and "optvq_epsilon 5.0" in summary and "optvq_kmeans_init True" in summary


@pytest.mark.parametrize("key, value", [("optvq_epsilon", 0), ("optvq_iterations", 0), ("optvq_kmeans_init", "yes"),
                                        ("rotation_trick", True)])
def test_bad_settings_are_one_line_config_errors(key, value):
    with pytest.raises(ConfigError, match=key) as err:
        from_dict(QuantizerConfig, {"name": "optvq", key: value}, prefix="quantizer.")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("training", [True, False])
def test_shapes_losses_and_straight_through_gradients(training):
    torch.manual_seed(0)
    q = build().train(training)
    z = (2 * torch.randn(5, DIM, 3, 2)).requires_grad_()
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == (5, 3, 2) and out.indices.dtype == torch.long
    assert set(out.losses) == {"codebook", "commitment"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in [*out.losses.values(), *out.stats.values()])
    assert ("reassigned" in out.stats) == training and not any(v.requires_grad for v in out.stats.values())
    # The forward value is the chosen codeword; lookup decodes the indices to it.
    torch.testing.assert_close(out.quantized, q.lookup(out.indices))
    upstream = torch.randn_like(z)
    ((out.quantized * upstream).sum() + sum(out.losses.values())).backward()
    assert z.grad.abs().sum() > 0
    assert q.embedding.grad.abs().sum() > 0 and q.projection.weight.grad.abs().sum() > 0
    if not training:  # evaluation: nearest codeword, the same as quantize
        assert torch.equal(q.quantize(z)[1], out.indices.flatten())


def test_float32_under_autocast():
    q = build().train()
    z = torch.randn(2, DIM, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        _, _, grid = q.quantize(z)
    assert out.quantized.dtype == grid.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def small_problem(n=7, k=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    points, codes = torch.randn(n, 3, generator=generator), torch.randn(k, 3, generator=generator)
    return normalised_cost(torch.cdist(points, codes))


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("iterations", [1, 5, 40])
def test_the_plan_is_pots_sinkhorn_with_the_same_epsilon(log_domain, iterations):
    cost = small_problem()
    n, k = cost.shape
    a, b = np.full(n, 1 / n), np.full(k, 1 / k)
    # OptVQ's epsilon multiplies the cost: POT's reg is 1 / epsilon. POT also starts with the codes' side.
    expected = ot.sinkhorn(a, b, cost.double().numpy(), reg=1 / 10.0, numItermax=iterations, stopThr=0.0, warn=False)
    plan = transport_plan(cost, 10.0, iterations, log_domain=log_domain)
    np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-4, atol=1e-9)


def test_marginals_are_uniform():
    cost = small_problem(n=48, k=12, seed=1)
    plan = transport_plan(cost, 10.0, 5)
    # The tokens' side is normalised last: exact. The codes' side after OptVQ's 5 iterations is only on its way at
    # epsilon = 10 (every code has a share, within a factor 2 of 1/K here), closer than after one iteration.
    torch.testing.assert_close(plan.sum(1), torch.full((48,), 1 / 48, dtype=torch.float64))
    error = (plan.sum(0) * 12 - 1).abs().max()
    assert error < 1.0 and error < (transport_plan(cost, 10.0, 1).sum(0) * 12 - 1).abs().max()
    converged = transport_plan(cost, 10.0, 300)
    torch.testing.assert_close(converged.sum(0), torch.full((12,), 1 / 12, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(converged.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_where_the_float32_kernel_underflows_the_log_domain_gives_pots_log_plan():
    # One token far from every code: its whole kernel row underflows in float32 at epsilon = 100.
    cost = small_problem(n=6, k=4, seed=2)
    cost[0] += 5.0
    a, b = np.full(6, 1 / 6), np.full(4, 1 / 4)
    expected = ot.bregman.sinkhorn_log(a, b, cost.double().numpy(), reg=1 / 100.0, numItermax=5, stopThr=0.0,
                                       warn=False)
    plan = transport_plan(cost, 100.0, 5)  # picks the log domain itself
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-4, atol=1e-12)
    log_u, log_v = sinkhorn_potentials(cost, 100.0, 5)
    assert torch.isfinite(log_u).all() and torch.isfinite(log_v).all()
    forced = sinkhorn_potentials(cost, 100.0, 5, log_domain=True)
    assert torch.equal(log_u, forced[0]) and torch.equal(log_v, forced[1])  # it did fall back


def test_the_assignment_spreads_over_more_codes_than_the_nearest_one():
    """A collapsed codebook: 4 codes near the latents, 60 far away. Nearest assignment uses at most the 4; the
    transport gives every code its share of the 256 latents and so reaches far more of them."""
    torch.manual_seed(3)
    latents = torch.randn(256, DIM)
    codebook = torch.cat([0.1 * torch.randn(4, DIM), 10 + torch.randn(60, DIM)])
    indices, nearest = optimal_transport_assignment(latents, codebook, 10.0, 5)
    assert nearest.unique().numel() <= 4
    assert indices.unique().numel() >= 40
    # The quantizer itself: training assigns by transport, evaluation by nearest codeword.
    q = build(codebook_size=64, optvq_kmeans_init=False, optvq_projection=False)
    with torch.no_grad():
        q.embedding.copy_(codebook)
    z = latents.view(4, 8, 8, DIM).permute(0, 3, 1, 2)
    assert q.train()(z).indices.unique().numel() >= 40 and q.eval()(z).indices.unique().numel() <= 4


@pytest.mark.parametrize("codebook_size", [16, 96])
def test_kmeans_initialisation_runs_once_and_is_saved(codebook_size):
    torch.manual_seed(4)
    q = build(codebook_size=codebook_size)
    assert not bool(q.initialised)
    z = torch.randn(8, DIM, 3, 2) + 3
    q.eval()(z)
    assert not bool(q.initialised)  # evaluation does not initialise
    q.train()(z)
    assert bool(q.initialised)
    codebook = q.codebook.detach().clone()
    latents = z.permute(0, 2, 3, 1).reshape(-1, DIM)
    # The projection is the identity now: the codewords are the centroids, among the latents (48 of them).
    assert torch.equal(q.projection.weight.detach(), torch.eye(DIM))
    assert (codebook.mean(0) - latents.mean(0)).abs().max() < 1.0
    differences = (codebook[:, None] - codebook[None]).abs().amax(-1) + torch.eye(codebook_size)
    assert differences.min() > 1e-4  # all distinct, also with more codes than latents
    # A second training step, and a quantizer restored from the state dict, keep that codebook.
    q.train()(z + 1)
    assert torch.equal(q.codebook.detach(), codebook)
    restored = build(codebook_size=codebook_size)
    restored.load_state_dict(q.state_dict())
    restored.train()(z)
    assert bool(restored.initialised) and torch.equal(restored.codebook.detach(), codebook)


def test_a_tiny_tokenizer_trains_saves_and_loads(tmp_path):
    torch.manual_seed(5)
    network = NetworkConfig(hidden_channels=16, residual_channels=4, num_residual_layers=1, embedding_dim=DIM)
    model = Tokenizer(TokenizerConfig(8, 1, network, from_dict(QuantizerConfig, {"name": "optvq", "codebook_size": 64})))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 8, 8)
    losses = []
    for _ in range(4):
        out = model.train()(x)
        loss = sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and bool(model.quantizer.initialised)
    model.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert bool(loaded.quantizer.initialised) and torch.equal(loaded.encode(x), model.eval().encode(x))


@pytest.mark.slow
def test_trains_from_the_command_line(tmp_path, data_root):
    job("pipelines.train_tokenizer", "--output", tmp_path / "tok", f"data.root={data_root}", *TINY_TOKENIZER_ARGS,
        "quantizer.name=optvq", "train.max_steps=3", "train.eval_every=3")
    metrics = json.loads((tmp_path / "tok" / "metrics.json").read_text())
    assert metrics["quantizer"] == "optvq" and metrics["steps"] == 3 and np.isfinite(metrics["mse"])
