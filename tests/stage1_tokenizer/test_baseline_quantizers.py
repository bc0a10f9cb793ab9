"""The baseline quantizers sqvae, vqvae-ema and fsq: the shared quantizer interface, and each one's own behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F

from configio.config import from_dict
from configio.errors import ConfigError
from stage1_tokenizer.model import Tokenizer, TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import (
    EMAVectorQuantizer,
    FSQQuantizer,
    QuantizerConfig,
    build_quantizer,
)

BASELINES = ["sqvae", "vqvae-ema", "fsq"]
DIM = 8
FSQ_LEVELS = [5, 4, 3]  # 60 codes: small, and not a power of two


def quantizer_config(name: str, **values) -> QuantizerConfig:
    if name == "fsq":
        values = {"codebook_size": math.prod(FSQ_LEVELS), "fsq_levels": FSQ_LEVELS, **values}
    return QuantizerConfig(name=name, **{"codebook_size": 16, **values})


def build(name: str, h: int = 3, w: int = 2, **values):
    cfg = quantizer_config(name, **values)
    return build_quantizer(cfg, embedding_dim=DIM, num_positions=h * w, data_dim=3 * 16 * h * w)


def tiny_tokenizer(name: str, channels: int = 3, **values) -> Tokenizer:
    network = NetworkConfig(hidden_channels=16, residual_channels=4, num_residual_layers=1, embedding_dim=DIM)
    return Tokenizer(TokenizerConfig(8, channels, network, quantizer_config(name, **values)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread, and on a busy 2-core machine its barriers cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("training", [True, False])
def test_interface_shapes_losses_and_gradients(name, training):
    torch.manual_seed(0)
    q = build(name).train(training)
    z = (2 * torch.randn(5, DIM, 3, 2)).requires_grad_()
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == (5, 3, 2) and out.indices.dtype == torch.long
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
    for value in [*out.losses.values(), *out.stats.values()]:
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    assert 1.0 <= float(out.stats["perplexity"]) <= q.codebook_size
    assert not any(v.requires_grad for v in out.stats.values())
    upstream = torch.randn_like(z)
    loss = (out.quantized * upstream).sum() + sum(out.losses.values(), torch.zeros(()))
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", BASELINES)
def test_encode_and_decode_paths_agree_with_evaluation(name):
    torch.manual_seed(1)
    q = build(name)
    z = 2 * torch.randn(4, DIM, 3, 2)
    q.train()(z)  # vqvae-ema: the k-means initialisation happens here
    q.eval()
    out = q(z)
    flat, indices, grid = q.quantize(z)
    assert flat.shape == (24, DIM) and indices.shape == (24,) and grid.shape == z.shape
    assert torch.equal(indices.view(4, 3, 2), out.indices)
    # Decoding goes indices -> codes -> latent exactly like the forward pass.
    torch.testing.assert_close(q.lookup(out.indices), out.quantized, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grid, out.quantized, rtol=1e-6, atol=1e-6)
    assert q.codebook.shape == (q.codebook_size, DIM)
    torch.testing.assert_close(q.lookup(torch.arange(q.codebook_size).view(1, -1, 1)),
                               q.codebook.t().unsqueeze(0).unsqueeze(-1), rtol=1e-6, atol=1e-6)
    for bad in (-1, q.codebook_size):
        with pytest.raises(ValueError, match="code indices"):
            q.lookup(torch.full((1, 3, 2), bad))


@pytest.mark.parametrize("name", BASELINES)
def test_tokenizer_round_trip_and_save_load(name, tmp_path):
    torch.manual_seed(2)
    model = tiny_tokenizer(name).train()
    x = torch.rand(6, 3, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        out = model(x)
        assert set(out.losses) >= {"reconstruction"} and out.reconstruction.shape == x.shape
        loss = sum(out.losses.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())
        assert next(model.encoder.parameters()).grad.abs().sum() > 0
        optimizer.step()
    # Encoding is deterministic and changes nothing, in training mode too (sqvae samples only in forward).
    state = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.encode(x)
    assert codes.shape == (6, 2, 2) and codes.dtype == torch.long
    assert torch.equal(codes, model.encode(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    images = model.decode(codes)
    assert images.shape == x.shape
    recon, indices = model.reconstruct(x)
    assert torch.equal(indices, codes) and torch.equal(recon, images)
    model.eval()
    assert torch.equal(model(x).indices, codes)

    model.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.config.quantizer == model.config.quantizer
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(loaded.encode(x), codes)
    torch.testing.assert_close(loaded.decode(codes), images)


@pytest.mark.parametrize("name", BASELINES)
def test_float32_under_autocast(name):
    q = build(name).train()
    z = torch.randn(2, DIM, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        _, _, grid = q.quantize(z)
    assert out.quantized.dtype == grid.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())


# ---------------------------------------------------------------------------------------------- SQ-VAE

def test_sqvae_losses_are_the_weighted_elbo_terms():
    torch.manual_seed(3)
    q = build("sqvae", sqvae_variance_init=3.0, sqvae_data_variance=0.01).eval()
    z = 2 * torch.randn(4, DIM, 3, 2)
    out = q(z)
    variance = 1.0 + 3.0
    assert float(out.stats["variance"]) == pytest.approx(variance)
    flat = z.permute(0, 2, 3, 1).reshape(-1, DIM)
    distances = torch.cdist(flat, q.codebook.detach()).pow(2)
    probs = F.softmax(-distances / (2 * variance), dim=1)
    weight = 2 * 0.01 / q.data_dim
    kl_discrete = ((probs * probs.log()).sum() / 4 + 6 * math.log(16)) * weight
    nearest = q.codebook.detach()[distances.argmin(1)]
    kl_continuous = (flat - nearest).pow(2).sum() / 4 / (2 * variance) * weight
    assert out.losses["kl_discrete"].detach().item() == pytest.approx(kl_discrete.item(), rel=1e-4)
    assert out.losses["kl_continuous"].detach().item() == pytest.approx(kl_continuous.item(), rel=1e-4)
    assert out.losses["kl_discrete"].detach().item() >= 0  # a KL to the uniform prior over the codes


def test_sqvae_stochastic_in_training_with_a_temperature_schedule():
    torch.manual_seed(4)
    q = build("sqvae", sqvae_temperature=2.0, sqvae_temperature_decay=0.1)
    z = torch.randn(64, DIM, 3, 2, requires_grad=True)
    first, second = q(z), q(z)
    assert not torch.equal(first.indices, second.indices)  # samples, not the nearest codeword
    assert not torch.equal(first.quantized, second.quantized)
    assert int(q.training_steps) == 2
    assert float(second.stats["temperature"]) == pytest.approx(2.0 * math.exp(-0.2), rel=1e-6)
    # The relaxed sample carries gradients to the codebook and the variance (no straight-through).
    (second.quantized.sum() + sum(second.losses.values())).backward()
    assert q.codebook.grad.abs().sum() > 0 and q.log_variance_scale.grad != 0
    q.eval()
    q(z), q.quantize(z)
    assert int(q.training_steps) == 2  # evaluation and encoding do not advance the schedule


def test_sqvae_variance_is_learned_and_anneals_itself():
    """A short run on toy images: the ELBO's reconstruction, seen through the relaxed sample, shrinks sigma^2."""
    torch.manual_seed(0)
    model = tiny_tokenizer("sqvae", channels=1).train()
    assert "quantizer.log_variance_scale" in dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    initial = float(model.quantizer.variance.detach())
    assert initial == pytest.approx(21.0)  # the authors' init for K = 512, D = 64: 1 + 20
    for _ in range(80):
        # Each latent position sees one 4x4 block, black or white: a code per block reconstructs the image.
        blocks = (torch.rand(16, 1, 2, 2) > 0.5).float()
        out = model(blocks.repeat_interleave(4, 2).repeat_interleave(4, 3))
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        optimizer.step()
    assert float(model.quantizer.variance.detach()) < 0.9 * initial
    assert float(out.stats["variance"]) == pytest.approx(float(model.quantizer.variance.detach()), rel=0.05)


def test_sqvae_needs_the_data_dimension():
    with pytest.raises(ValueError, match="data_dim"):
        build_quantizer(QuantizerConfig(name="sqvae", codebook_size=16), embedding_dim=DIM, num_positions=4)


# ---------------------------------------------------------------------------------------------- library baselines

def test_vqvae_ema_settings_reach_the_library():
    torch.manual_seed(5)
    q = build("vqvae-ema")
    assert isinstance(q, EMAVectorQuantizer) and not list(q.parameters())  # the EMA moves the codebook, not Adam
    assert q.vq.commitment_weight == pytest.approx(QuantizerConfig(name="vqvae-ema").resolved_beta) == 0.25
    assert not q.codebook.any()  # k-means initialises it on the first training batch
    z = torch.randn(8, DIM, 3, 2, requires_grad=True)
    out = q(z)
    assert q.codebook.abs().sum() > 0
    # Plain straight-through (the library's default would be the rotation trick).
    upstream = torch.randn_like(z)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum(), z)
    torch.testing.assert_close(grad, upstream)
    assert out.losses["commitment"].detach() > 0 and out.losses["commitment"].requires_grad

    # Dead codes: with a fast EMA, codes the batch does not use are replaced by latents of the batch.
    q = build("vqvae-ema", vqvae_ema_kmeans_init=False, vqvae_ema_decay=0.5, vqvae_ema_dead_code_threshold=2.0)
    latents = torch.randn(8, DIM, 3, 2) + 10.0
    used = set(q(latents).indices.flatten().tolist())
    unused = torch.tensor(sorted(set(range(q.codebook_size)) - used))
    assert len(unused) > 0
    flat = latents.permute(0, 2, 3, 1).reshape(-1, DIM)
    assert (q.codebook[unused][:, None, :] == flat[None, :, :]).all(dim=2).any(dim=1).all()


def test_fsq_is_an_implicit_grid_without_losses():
    q = build("fsq")
    assert isinstance(q, FSQQuantizer) and q.codebook_size == math.prod(FSQ_LEVELS) == 60
    z = torch.randn(16, DIM, 3, 2)
    out = q(z)
    assert out.losses == {}
    # Every grid point is reachable and decodes to a distinct latent.
    assert torch.unique(q.codebook, dim=0).shape[0] == 60


# ---------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("values, key", [
    ({"name": "fsq", "codebook_size": 100, "fsq_levels": [8, 8, 8]}, "product"),
    ({"name": "vqwae", "rotation_trick": True}, "rotation_trick applies to"),
    ({"name": "fsq", "rotation_trick": True}, "rotation_trick applies to"),
    ({"name": "fsq", "codebook_size": 512, "fsq_levels": [8, 8, 2, 4]}, "fsq_levels"),
    ({"fsq_levels": []}, "fsq_levels"),
    ({"fsq_levels": [8, 8.5]}, "fsq_levels"),
    ({"vqvae_ema_decay": 1.0}, "vqvae_ema_decay"),
    ({"vqvae_ema_decay": 0}, "vqvae_ema_decay"),
    ({"vqvae_ema_dead_code_threshold": -1}, "vqvae_ema_dead_code_threshold"),
    ({"vqvae_ema_kmeans_init": "yes"}, "vqvae_ema_kmeans_init"),
    ({"sqvae_variance_init": 0}, "sqvae_variance_init"),
    ({"sqvae_temperature": -1.0}, "sqvae_temperature"),
    ({"sqvae_temperature_decay": -1e-5}, "sqvae_temperature_decay"),
    ({"sqvae_data_variance": 0.0}, "sqvae_data_variance"),
    ({"sqvae_data_variance": float("inf")}, "sqvae_data_variance"),
    ({"name": "vqvae_ema"}, "name"),
])
def test_bad_settings_are_one_line_config_errors(values, key):
    with pytest.raises(ConfigError) as err:
        from_dict(QuantizerConfig, values)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_built_in_code_are_caught_before_a_quantizer_exists():
    with pytest.raises(ConfigError, match="sqvae_data_variance"):
        build(name="sqvae", sqvae_data_variance=float("nan"))
    with pytest.raises(ConfigError, match="product of quantizer.fsq_levels"):
        tiny_tokenizer("fsq", codebook_size=64)
    assert QuantizerConfig(name="vqwae").resolved_beta == 1e-3 and QuantizerConfig(name="vqvae").resolved_beta == 0.25


@pytest.mark.parametrize("size, levels", [(256, [8, 6, 5]), (512, [8, 8, 8]), (1024, [8, 5, 5, 5]),
                                          (4096, [7, 5, 5, 5, 5]), (16384, [8, 8, 8, 6, 5]), (65536, [8, 8, 8, 5, 5, 5])])
def test_fsq_takes_its_papers_levels_and_reports_the_real_size(size, levels):
    from stage1_tokenizer.quantizers.fsq import levels_for

    cfg = QuantizerConfig(name="fsq", codebook_size=size)
    assert levels_for(cfg) == levels
    assert build_quantizer(cfg, embedding_dim=DIM, num_positions=4).codebook_size == math.prod(levels)


def test_fsq_tokenizer_reports_the_real_codebook_size():
    assert tiny_tokenizer("fsq", codebook_size=16384, fsq_levels=None).codebook_size == 15360


@pytest.mark.parametrize("name", ["vqvae", "vqvae-ema"])
def test_rotation_trick_keeps_the_value_and_changes_the_encoder_gradient(name):
    torch.manual_seed(0)
    results = {}
    for rotation in (False, True):
        torch.manual_seed(0)
        q = build(name, rotation_trick=rotation, **({"vqvae_ema_kmeans_init": False} if name == "vqvae-ema" else {}))
        q.train()
        z = torch.randn(2, DIM, 3, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = q(z)
        (out.quantized * torch.linspace(-1, 1, DIM).view(1, DIM, 1, 1)).sum().backward()
        results[rotation] = (out.quantized.detach(), z.grad.clone())
    torch.testing.assert_close(results[False][0], results[True][0])
    assert not torch.allclose(results[False][1], results[True][1])
