"""Wasserstein VQ (stage1_tokenizer/quantizers/wasserstein_vq.py): nearest codewords plus the closed-form Gaussian W2
between a queue of recent latents and the codebook, checked against scipy's matrix square root."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from configio.config import from_dict, load_config
from configio.errors import ConfigError
from helpers import TINY_TOKENIZER_ARGS, job
from pipelines import chain, compare
from pipelines.settings import TokenizerJobConfig
from stage1_tokenizer.model import Tokenizer, TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import QuantizerConfig, build_quantizer
from stage1_tokenizer.quantizers.wasserstein_vq import (
    WassersteinVQQuantizer,
    gaussian_w2_squared,
    mean_and_covariance,
)

DIM = 6


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(**values) -> WassersteinVQQuantizer:
    cfg = from_dict(QuantizerConfig, {"name": "wasserstein-vq", "codebook_size": 16, "wvq_queue_size": 64, **values})
    return build_quantizer(cfg, DIM, 6)


def test_known_everywhere_through_the_registry():
    cfg = load_config(TokenizerJobConfig, None, ["quantizer.name=wasserstein-vq", "quantizer.wvq_queue_size=4096"])
    assert cfg.quantizer.resolved_beta == 0.1 and cfg.quantizer.wvq_weight == 0.5 and cfg.quantizer.wvq_queue_size == 4096
    assert chain.MODELS["wasserstein-vq"] == ["quantizer.name=wasserstein-vq"]
    assert "Wasserstein VQ" in chain.DESCRIPTIONS["wasserstein-vq"]
    summary = compare.quantizer_summary({"name": "wasserstein-vq"})
    assert "beta 0.1" in summary and "wvq_weight 0.5" in summary and "wvq_queue_size 16384" in summary


@pytest.mark.parametrize("key, value", [("wvq_weight", -1.0), ("wvq_queue_size", 1), ("wvq_queue_size", "many"),
                                        ("rotation_trick", True)])
def test_bad_settings_are_one_line_config_errors(key, value):
    with pytest.raises(ConfigError, match=key) as err:
        from_dict(QuantizerConfig, {"name": "wasserstein-vq", key: value}, prefix="quantizer.")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("training", [True, False])
def test_shapes_losses_and_gradients(training):
    torch.manual_seed(0)
    q = build().train(training)
    z = (2 * torch.randn(5, DIM, 3, 2)).requires_grad_()
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == (5, 3, 2) and out.indices.dtype == torch.long
    assert set(out.losses) == {"codebook", "commitment", "wasserstein"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v)
               for v in [*out.losses.values(), *out.stats.values()])
    assert not any(v.requires_grad for v in out.stats.values())
    assert int(q.queue_filled) == (30 if training else 0)  # evaluation leaves the queue alone
    # Nearest codewords, as quantize and lookup give them.
    assert torch.equal(q.quantize(z)[1], out.indices.flatten())
    torch.testing.assert_close(out.quantized, q.lookup(out.indices))
    # The W2 term moves the codebook only; the encoder gets the straight-through and commitment gradients.
    w_codebook, w_latents = torch.autograd.grad(out.losses["wasserstein"], [q.codebook, z], allow_unused=True,
                                                retain_graph=True)
    assert w_codebook.abs().sum() > 0 and (w_latents is None or not w_latents.any())
    ((out.quantized * torch.randn_like(z)).sum() + sum(out.losses.values())).backward()
    assert z.grad.abs().sum() > 0 and q.codebook.grad.abs().sum() > 0


def test_float32_under_autocast():
    q = build().train()
    z = torch.randn(2, DIM, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        _, _, grid = q.quantize(z)
    assert out.quantized.dtype == grid.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def scipy_w2_squared(mean_a, cov_a, mean_b, cov_b):
    root = scipy.linalg.sqrtm(cov_a)
    cross = scipy.linalg.sqrtm(root @ cov_b @ root)
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(cross)))


@pytest.mark.parametrize("num_codes", [40, 4])  # 4 < DIM: a rank-deficient codebook covariance
def test_the_distance_is_the_closed_form_gaussian_w2(num_codes):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(200, DIM, generator=generator, dtype=torch.float64) @ torch.randn(DIM, DIM, generator=generator,
                                                                                           dtype=torch.float64)
    codebook = 0.5 * torch.randn(num_codes, DIM, generator=generator, dtype=torch.float64) + 1.0
    mean, covariance = mean_and_covariance(features)
    code_mean, code_covariance = mean_and_covariance(codebook)
    expected = scipy_w2_squared(mean.numpy(), covariance.numpy(), code_mean.numpy(), code_covariance.numpy())
    assert float(gaussian_w2_squared(mean, covariance, codebook)) == pytest.approx(expected, rel=1e-6)
    # The quantizer's W: the distance itself, both sides divided by the features' largest per-dimension std.
    q = build(codebook_size=num_codes)
    with torch.no_grad():
        q.codebook.copy_(codebook.float())
    scale = float(features.std(dim=0).max())
    assert float(q.wasserstein(features.float()).detach()) == pytest.approx(expected**0.5 / scale, rel=1e-4)


def test_the_distance_is_zero_for_identical_distributions_and_its_gradient_is_finite():
    torch.manual_seed(2)
    q = build(codebook_size=32)
    features = q.codebook.detach().clone()
    assert float(gaussian_w2_squared(*mean_and_covariance(features.double()), features)) == pytest.approx(0.0, abs=1e-12)
    distance = q.wasserstein(features)
    assert float(distance.detach()) < 1e-5
    (grad,) = torch.autograd.grad(distance, q.codebook)
    assert torch.isfinite(grad).all()
    # A collapsed codebook (every code the same): covariance of rank 0, still a finite gradient.
    with torch.no_grad():
        q.codebook.copy_(torch.ones(32, DIM))
    (grad,) = torch.autograd.grad(q.wasserstein(torch.randn(100, DIM)), q.codebook)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_queue_fills_wraps_and_is_saved():
    q = build(wvq_queue_size=10)
    rows = torch.arange(14 * DIM, dtype=torch.float32).view(14, DIM)
    q.enqueue(rows[:4])
    assert int(q.queue_filled) == 4 and int(q.queue_next) == 4 and torch.equal(q.queued(), rows[:4])
    q.enqueue(rows[4:8])
    q.enqueue(rows[8:12])  # wraps: rows 10 and 11 overwrite rows 0 and 1
    assert int(q.queue_filled) == 10 and int(q.queue_next) == 2
    assert torch.equal(q.queued(), torch.cat([rows[10:12], rows[2:10]]))
    q.enqueue(rows[:14])  # more than the queue holds: the last 10, from slot 2 on
    assert int(q.queue_next) == 2 and torch.equal(torch.cat([q.queue[2:], q.queue[:2]]), rows[4:14])
    # Persistent buffers: a restored quantizer has the same queue, and the same next step.
    state = q.state_dict()
    assert {"queue", "queue_filled", "queue_next"} <= set(state)
    restored = build(wvq_queue_size=10)
    restored.load_state_dict(state)
    z = torch.randn(2, DIM, 3, 2)
    a, b = q.train()(z), restored.train()(z)
    assert torch.equal(a.losses["wasserstein"], b.losses["wasserstein"]) and torch.equal(q.queue, restored.queue)


def test_a_tiny_tokenizer_trains_saves_and_loads(tmp_path):
    torch.manual_seed(3)
    network = NetworkConfig(hidden_channels=16, residual_channels=4, num_residual_layers=1, embedding_dim=DIM)
    quantizer = from_dict(QuantizerConfig, {"name": "wasserstein-vq", "codebook_size": 64, "wvq_queue_size": 96})
    model = Tokenizer(TokenizerConfig(8, 1, network, quantizer))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 8, 8)
    for _ in range(4):
        out = model.train()(x)
        loss = sum(out.losses.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert int(model.quantizer.queue_filled) == 96  # 4 steps of 32 latents, wrapped
    model.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(loaded.quantizer.queue, model.quantizer.queue)
    assert torch.equal(loaded.encode(x), model.eval().encode(x))


@pytest.mark.slow
def test_trains_from_the_command_line(tmp_path, data_root):
    job("pipelines.train_tokenizer", "--output", tmp_path / "tok", f"data.root={data_root}", *TINY_TOKENIZER_ARGS,
        "quantizer.name=wasserstein-vq", "quantizer.wvq_queue_size=256", "train.max_steps=3", "train.eval_every=3")
    metrics = json.loads((tmp_path / "tok" / "metrics.json").read_text())
    assert metrics["quantizer"] == "wasserstein-vq" and metrics["steps"] == 3 and np.isfinite(metrics["mse"])
