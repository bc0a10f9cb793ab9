
import ot
import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizers import (
    QuantizerConfig,
    VQVAEQuantizer,
    VQWAEQuantizer,
    build_quantizer,
)
from stage1_tokenizer.quantizers.vqwae import reference_logits


@pytest.mark.parametrize("quantizer", ["vqvae", "vqwae"])
@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (8, 8)])
def test_nearest_codeword_and_straight_through(quantizer, grid):
    h, w = grid
    q = build_quantizer(QuantizerConfig(name=quantizer, codebook_size=16), embedding_dim=4, num_positions=h * w)
    with torch.no_grad():
        q.codebook.normal_()
    z = torch.randn(6, 4, h, w, requires_grad=True)
    out = q(z)
    assert out.indices.shape == (6, h, w) and out.quantized.shape == z.shape
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, q.codebook.detach()).argmin(1).view(6, h, w)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.quantized, q.codebook.detach()[expected].permute(0, 3, 1, 2))
    # Straight-through: the decoder's gradient reaches z unchanged.
    upstream = torch.randn_like(z)
    (g,) = torch.autograd.grad((out.quantized * upstream).sum(), z)
    torch.testing.assert_close(g, upstream)


def test_vqvae_losses_and_beta_placement():
    torch.manual_seed(0)
    z = torch.randn(4, 3, 2, 2)
    for beta_on_codebook in (False, True):
        q = VQVAEQuantizer(8, 3, beta=0.3, beta_on_codebook=beta_on_codebook)
        out = q(z)
        codewords = q.codebook.detach()[out.indices].permute(0, 3, 1, 2)
        mse = F.mse_loss(codewords, z).item()
        if beta_on_codebook:
            assert out.losses["codebook"].item() == pytest.approx(0.3 * mse)
            assert out.losses["commitment"].item() == pytest.approx(mse)
        else:
            assert out.losses["codebook"].item() == pytest.approx(mse)
            assert out.losses["commitment"].item() == pytest.approx(0.3 * mse)
    # The codebook term moves only the codebook; the commitment term only the encoder side.
    q = VQVAEQuantizer(8, 3)
    zz = z.clone().requires_grad_()
    out = q(zz)
    assert torch.autograd.grad(out.losses["codebook"], zz, allow_unused=True)[0] is None
    assert torch.autograd.grad(out.losses["commitment"], q.codebook, allow_unused=True)[0] is None


def test_vqwae_loss_is_the_paper_formula():
    torch.manual_seed(0)
    positions, k, d, b = 6, 10, 3, 5
    q = VQWAEQuantizer(k, d, positions, beta=0.01, kl_weight=2.0)
    with torch.no_grad():
        q.logits.normal_()
        q.codebook.normal_()
    z = torch.randn(b, d, 2, 3, dtype=torch.float64).float()
    out = q(z)
    pi = F.softmax(q.logits.detach().double(), 1)
    latents = z.double().permute(2, 3, 0, 1).reshape(positions, b, d)
    w = sum(
        ot.emd2(pi[m], torch.full((b,), 1 / b, dtype=torch.float64), torch.cdist(q.codebook.detach().double(), latents[m]) ** 2)
        for m in range(positions)
    )
    assert out.losses["wasserstein"].item() == pytest.approx(0.01 * float(w), rel=1e-5)
    kl = (pi * (pi * k).log()).sum().item()
    assert out.losses["kl"].item() == pytest.approx(2.0 * kl / k, rel=1e-5)
    assert "commitment" not in out.losses
    # The codebook learns only from the transport term, and pi only from transport + KL.
    loss = sum(out.losses.values())
    g_code, g_logits = torch.autograd.grad(loss, [q.codebook, q.logits])
    assert g_code.abs().sum() > 0 and g_logits.abs().sum() > 0


def test_vqwae_variants():
    fixed = VQWAEQuantizer(8, 2, 4, learn_weights=False)
    out = fixed(torch.randn(3, 2, 2, 2))
    assert "kl" not in out.losses and not any(p is fixed.logits for p in fixed.parameters())
    torch.testing.assert_close(fixed.code_distributions(), torch.full((4, 8), 1 / 8))
    glob = VQWAEQuantizer(8, 2, 4, global_transport=True)
    assert glob.code_distributions().shape == (1, 8)
    assert torch.isfinite(sum(glob(torch.randn(3, 2, 2, 2)).losses.values()))
    ref = reference_logits(64, 512)
    assert torch.equal(ref.sum(1), torch.full((64,), 8.0)) and torch.equal(ref.sum(0), torch.ones(512))
    assert ref[0, :8].sum() == 8 and ref[1, 8:16].sum() == 8
    with pytest.raises(ValueError, match="positions"):
        VQWAEQuantizer(8, 2, 4)(torch.randn(3, 2, 3, 3))


def test_vqwae_solver_setting_reaches_the_transport():
    from configio.config import from_dict
    from configio.errors import ConfigError

    torch.manual_seed(0)
    z = torch.randn(5, 3, 2, 3)
    losses = {}
    for solver in ("exact", "dense"):
        q = build_quantizer(from_dict(QuantizerConfig, {"codebook_size": 10, "solver": solver}), 3, 6)
        assert q.solver == solver
        with torch.no_grad():
            q.codebook.copy_(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)))
        losses[solver] = q(z).losses["wasserstein"].item()
    assert losses["exact"] == pytest.approx(losses["dense"], rel=1e-6)
    # Removed (no measured case where they won): the Sinkhorn solver, epsilon and the background solve.
    for values in ({"solver": "sinkhorn"}, {"epsilon": 0.01}, {"overlap": "on"}):
        with pytest.raises(ConfigError):
            from_dict(QuantizerConfig, values)
