"""The semi-discrete VQ-WAE transport: its certificate against POT, its gradients, its potentials and moved codewords."""
import ot
import pytest
import torch

from configio.config import from_dict
from configio.errors import ConfigError
from stage1_tokenizer.quantizers import QuantizerConfig, build_quantizer
from stage1_tokenizer.semidiscrete import SemiDiscreteTransport, certificate


def _exact(latents, codebook, weights):
    costs = ot.dist(codebook.double().numpy(), latents.double().numpy())
    return ot.emd2(weights.double().numpy(), torch.full((len(latents),), 1 / len(latents)).double().numpy(), costs)


def _balanced_potentials(latents, codebook, weights, steps=400):
    """The potentials after many ascent steps on one fixed batch (codewords never moved: none is ever idle long
    enough)."""
    transport = SemiDiscreteTransport(len(codebook), step_size=0.1)
    costs = torch.cdist(latents, codebook).pow(2)
    storage = codebook.clone()
    for _ in range(steps):
        transport.idle_steps.fill_(-steps)
        transport(latents, codebook, weights, costs, codebook_storage=storage)
    assert torch.equal(storage, codebook)
    return transport.potentials


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sizes", [(40, 12), (30, 90), (400, 64)])
def test_certificate_brackets_the_exact_value(seed, sizes):
    generator = torch.Generator().manual_seed(seed)
    n, k = sizes
    latents = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    codebook = torch.randn(k, 5, generator=generator, dtype=torch.float64) * 0.7
    weights = torch.softmax(torch.randn(k, generator=generator, dtype=torch.float64), 0)
    exact = _exact(latents, codebook, weights)
    for potentials in (torch.zeros(k, dtype=torch.float64), torch.randn(k, generator=generator, dtype=torch.float64),
                       _balanced_potentials(latents, codebook, weights)):
        bounds = certificate(latents, codebook, weights, potentials)
        assert bounds.lower <= exact * (1 + 1e-12) and exact <= bounds.upper * (1 + 1e-12)
    if n >= 3 * k:  # with fewer latents than codewords no assignment is near a plan (each latent must split)
        # The ascent closes most of the gap that zero potentials (nearest codewords) leave.
        start = certificate(latents, codebook, weights, torch.zeros(k, dtype=torch.float64)).relative_gap
        assert bounds.relative_gap < 0.5 * start


def test_certificate_in_blocks_equals_one_block(monkeypatch):
    import stage1_tokenizer.semidiscrete as semidiscrete

    generator = torch.Generator().manual_seed(3)
    latents, codebook = torch.randn(300, 4, generator=generator), torch.randn(50, 4, generator=generator)
    weights, potentials = torch.full((50,), 1 / 50), torch.randn(50, generator=generator) * 0.1
    whole = certificate(latents, codebook, weights, potentials)
    monkeypatch.setattr(semidiscrete, "_BLOCK_ENTRIES", 50 * 7)
    assert certificate(latents, codebook, weights, potentials) == pytest.approx(whole, rel=1e-12)
    costs = torch.cdist(latents.double(), codebook.double()).pow(2)
    assert certificate(latents, codebook, weights, potentials, costs=costs) == pytest.approx(whole, rel=1e-9)


def test_gradients_are_the_semi_duals():
    """Each latent toward its Laguerre codeword, each codeword toward its cell's latents, pi toward u."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 3, generator=generator, requires_grad=True)
    codebook = torch.randn(8, 3, generator=generator, requires_grad=True)
    logits = torch.zeros(8, requires_grad=True)
    transport = SemiDiscreteTransport(8, step_size=0.1)
    transport.potentials.copy_(torch.randn(8, generator=generator) * 0.3)
    costs = torch.cdist(latents, codebook).pow(2).detach()
    weights = torch.softmax(logits, 0)
    value = transport(latents, codebook, weights, costs)
    value.backward()
    assignment = (costs - transport.potentials).argmin(1)
    difference = latents.detach() - codebook.detach()[assignment]
    torch.testing.assert_close(latents.grad, 2 * difference / 64)
    expected = torch.zeros(8, 3).index_add_(0, assignment, -2 * difference / 64)
    torch.testing.assert_close(codebook.grad, expected)
    potentials = transport.potentials
    torch.testing.assert_close(logits.grad, weights.detach() * (potentials - (weights.detach() * potentials).sum()))
    bounds = certificate(latents.detach(), codebook.detach(), weights.detach(), potentials)
    assert value.item() == pytest.approx(bounds.lower, rel=1e-5)  # the loss is the certificate's lower bound
    # Without a codebook storage nothing moves: evaluation leaves the state as it was.
    assert int(transport.idle_steps.sum()) == 0


def test_potentials_balance_the_loads_of_a_fixed_batch():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(512, 2, generator=generator)
    codebook = torch.randn(16, 2, generator=generator) * 0.3  # crowded in the middle: outer codewords take most
    weights = torch.full((16,), 1 / 16)
    costs = torch.cdist(latents, codebook).pow(2)
    before = torch.bincount(costs.argmin(1), minlength=16).float() / 512
    potentials = _balanced_potentials(latents, codebook, weights, steps=600)
    after = torch.bincount((costs - potentials).argmin(1), minlength=16).float() / 512
    assert (after - weights).abs().max() < 0.5 * (before - weights).abs().max()


def test_idle_codewords_move_onto_latents_and_resume_from_the_state():
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(32, 3, generator=generator)
    codebook = torch.randn(64, 3, generator=generator)
    codebook[:8] += 100.0  # far from every latent: never chosen
    transport = SemiDiscreteTransport(64, step_size=0.1)
    transport.initialized.fill_(True)
    weights = torch.full((64,), 1 / 64)
    for _ in range(2):  # K / N = 2 batches without a latent: idle
        transport(latents, codebook, weights, torch.cdist(latents, codebook).pow(2), codebook_storage=codebook)
    moved = codebook[:8]
    assert moved.abs().max() < 10  # onto latents
    assert all(bool((latents == row).all(1).any()) for row in moved)
    state = transport.state_dict()
    assert set(state) == {"potentials", "initialized", "idle_steps"}
    resumed = SemiDiscreteTransport(64, step_size=0.1)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.state_dict()[name], value) for name, value in state.items())


def test_first_training_step_draws_the_codebook_from_the_latents():
    q = build_quantizer(from_dict(QuantizerConfig, {"codebook_size": 32, "form": "global", "solver": "semidiscrete"}),
                        embedding_dim=4, num_positions=4)
    q.train()
    z = torch.randn(8, 4, 2, 2) * 5 + 3
    before = q.codebook.detach().clone()
    out = q(z)
    assert not torch.equal(q.codebook.detach(), before)
    latents = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (torch.cdist(q.codebook.detach(), latents).min(1).values < 5).all()
    assert torch.isfinite(out.losses["wasserstein"])
    assert q.semidiscrete.initialize_codebook(q.codebook.data, latents) is False  # once


def test_semidiscrete_needs_the_global_form():
    with pytest.raises(ConfigError, match="form=global"):
        from_dict(QuantizerConfig, {"solver": "semidiscrete"})
    with pytest.raises(ConfigError):
        from_dict(QuantizerConfig, {"solver": "semidiscrete", "form": "global", "potential_step": 0})


@pytest.mark.parametrize("settings, form, solver", [
    ({}, "per_position", "exact"),  # the paper's form at K = 512
    ({"codebook_size": 8192}, "per_position", "exact"),
    ({"codebook_size": 16384}, "global", "semidiscrete"),  # where it was measured to win
    ({"codebook_size": 16384, "form": "per_position"}, "per_position", "exact"),  # an explicit choice stands
    ({"codebook_size": 16384, "form": "global", "solver": "dense"}, "global", "dense"),
    ({"form": "global"}, "global", "exact"),
])
def test_auto_form_and_solver_follow_the_codebook_size(settings, form, solver):
    cfg = from_dict(QuantizerConfig, settings)
    assert (cfg.form, cfg.solver) == (form, solver)


def test_a_loaded_uninitialised_state_initialises_the_codebook_again():
    """The flag that spares a device sync per step follows a loaded state: an uninitialised one is initialised."""
    from stage1_tokenizer.semidiscrete import SemiDiscreteTransport

    transport = SemiDiscreteTransport(8, 0.1)
    fresh = {key: value.clone() for key, value in transport.state_dict().items()}
    codebook, latents = torch.zeros(8, 3), torch.randn(16, 3)
    assert transport.initialize_codebook(codebook, latents) and not transport.initialize_codebook(codebook, latents)
    transport.load_state_dict(fresh)
    assert transport.initialize_codebook(codebook, latents)
