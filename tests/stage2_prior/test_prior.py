"""The stage-2 prior: training signal, cached vs uncached sampling, conditioning, guidance, persistence, bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from configio.config import from_dict
from configio.errors import CheckpointError, ConfigError
from stage2_prior import CodePrior, PriorConfig, filter_logits, sample_codes

K, L, C = 32, 16, 8


def tiny_config(arch: str = "gpt2", conditional: bool = True, **overrides) -> PriorConfig:
    values = dict(
        architecture=arch, num_layers=2, num_heads=4, hidden_size=64, dropout=0.0, label_dropout=0.0,
        class_conditional=conditional, codebook_size=K, sequence_length=L, num_classes=C if conditional else 0,
    )
    values.update(overrides)
    return PriorConfig(**values)


def fixed_codes() -> torch.Tensor:
    return torch.randint(0, K, (C, L), generator=torch.Generator().manual_seed(1))


def train(prior: CodePrior, codes, labels, steps: int = 300, lr: float = 3e-3, stop: float = 0.02) -> tuple[float, float]:
    """Adam on one fixed batch until the loss is below `stop` times its start (or `steps` run out)."""
    torch.manual_seed(0)
    prior.train()
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    first = last = None
    for _ in range(steps):
        loss = prior(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if first is None else first
        if last < stop * first:
            break
    prior.eval()
    return first, last


def overfit(arch: str) -> tuple[CodePrior, float, float]:
    torch.manual_seed(0)
    prior = CodePrior(tiny_config(arch))
    assert prior.model.config.vocab_size == K + 2 + C
    first, last = train(prior, fixed_codes(), torch.arange(C))  # class i <-> sequence i
    return prior, first, last


@pytest.fixture(scope="module")
def overfit_gpt2() -> tuple[CodePrior, float, float]:
    return overfit("gpt2")


@pytest.fixture(scope="module")
def trained_gpt2(overfit_gpt2) -> CodePrior:
    return overfit_gpt2[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- configuration and token layout ---

def test_token_layout_and_config_checks():
    cfg = tiny_config()
    assert (cfg.start_token, cfg.null_token, cfg.class_token(0), cfg.class_token(C - 1)) == (K, K + 1, K + 2, K + 1 + C)
    assert cfg.vocab_size == K + 2 + C
    assert tiny_config(conditional=False).vocab_size == K + 2
    with pytest.raises(ValueError, match="class label 12 is not known to this prior, which has 8 classes"):
        cfg.class_token(12)
    with pytest.raises(ConfigError, match="prior.hidden_size must be divisible by prior.num_heads"):
        tiny_config(hidden_size=66).validate()
    with pytest.raises(ConfigError, match="prior.num_classes must be >= 1"):
        tiny_config(num_classes=0).check_complete()
    with pytest.raises(ConfigError, match="prior.label_dropout must lie in"):
        tiny_config(label_dropout=1.5).validate()
    with pytest.raises(ConfigError, match="architecture: 'mamba' is not one of"):
        from_dict(PriorConfig, {"architecture": "mamba"})
    with pytest.raises(ConfigError, match="unknown config key 'num_layer'"):
        from_dict(PriorConfig, {"num_layer": 3})


# --- training signal ---

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_prior_overfits_a_tiny_code_set(arch, request):
    _, first, last = request.getfixturevalue("overfit_gpt2") if arch == "gpt2" else overfit(arch)
    assert first > 3.0  # about ln(32) at initialisation
    assert last < 0.1 * first, (first, last)


def test_unconditional_prior_learns_and_reports_bits_per_code():
    torch.manual_seed(0)
    prior = CodePrior(tiny_config("gpt2", conditional=False))
    codes = fixed_codes()
    bpt_before = prior.bits_per_code(codes)
    first, last = train(prior, codes, None, steps=300, stop=0.2)
    # Without labels the first code of 8 distinct sequences stays uncertain: the floor is ln(8) / L nats per code.
    assert last < 0.25 * first, (first, last)
    nll = prior.nll_sum(codes)
    assert nll.shape == (C,)
    bpt = prior.bits_per_code(codes)
    assert bpt < 0.25 * bpt_before
    assert bpt == pytest.approx(float(nll.sum()) / (codes.numel() * torch.log(torch.tensor(2.0)).item()), rel=1e-5)


def test_label_dropout_only_in_training_mode():
    torch.manual_seed(0)
    prior = CodePrior(tiny_config(label_dropout=0.5))
    codes, labels = fixed_codes(), torch.arange(C)
    prior.eval()
    assert torch.equal(prior.token_nll(codes, labels), prior.token_nll(codes, labels))
    prior.train()
    a = prior.token_nll(codes, labels, generator=seeded(0))
    b = prior.token_nll(codes, labels, generator=seeded(0))
    c = prior.token_nll(codes, labels, generator=seeded(5))
    assert torch.equal(a, b)  # reproducible with a generator
    assert not torch.equal(a, c)  # and labels really get dropped (to the null class) in training mode


# --- sampling: cache vs no cache ---

SETTINGS = [
    dict(),
    dict(top_k=5, top_p=0.9),
    dict(temperature=0.7, top_p=0.8),
    dict(top_k=1),  # greedy
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("conditional", [True, False])
def test_cached_and_uncached_sampling_agree(arch, conditional):
    torch.manual_seed(3)
    prior = CodePrior(tiny_config(arch, conditional=conditional))  # untrained: a spread-out distribution
    labels = torch.tensor([0, 3, 7, 1, 5, 2]) if conditional else None
    settings = SETTINGS + ([dict(guidance_scale=2.5, top_k=8)] if conditional else [])
    for kw in settings:
        cached = sample_codes(prior, 6, labels=labels, generator=seeded(11), use_cache=True, **kw)
        uncached = sample_codes(prior, 6, labels=labels, generator=seeded(11), use_cache=False, **kw)
        assert cached.shape == (6, L) and cached.dtype == torch.long
        assert int(cached.min()) >= 0 and int(cached.max()) < K  # special tokens are never drawn
        assert torch.equal(cached, uncached), kw
        again = sample_codes(prior, 6, labels=labels, generator=seeded(11), **kw)
        assert torch.equal(cached, again), kw  # reproducible for a seed


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_completion_keeps_the_prefix_and_agrees_with_and_without_cache(guidance_scale):
    torch.manual_seed(5)
    prior = CodePrior(tiny_config())
    prefix = torch.randint(0, K, (4, L // 2))
    kw = dict(labels=torch.tensor([0, 1, 2, 3]), guidance_scale=guidance_scale, prefix=prefix)
    cached = sample_codes(prior, 4, generator=seeded(2), use_cache=True, **kw)
    uncached = sample_codes(prior, 4, generator=seeded(2), use_cache=False, **kw)
    assert torch.equal(cached[:, : L // 2], prefix) and torch.equal(cached, uncached)
    whole = torch.randint(0, K, (4, L))
    assert torch.equal(sample_codes(prior, 4, generator=seeded(2), **{**kw, "prefix": whole}), whole)
    with pytest.raises(ValueError, match="prefix"):
        sample_codes(prior, 4, generator=seeded(2), **{**kw, "prefix": torch.full((4, 2), K)})


def test_batched_sampling_and_label_forms():
    torch.manual_seed(0)
    prior = CodePrior(tiny_config())
    whole = sample_codes(prior, 5, labels=2, generator=seeded(0))
    assert torch.equal(whole, sample_codes(prior, 5, labels=torch.full((5,), 2), generator=seeded(0)))
    chunked = sample_codes(prior, 5, labels=2, generator=seeded(0), batch_size=2)
    assert chunked.shape == (5, L)
    # batch_size 1 draws each sequence separately: the same as drawing them one by one with one generator
    g = seeded(4)
    one_by_one = torch.cat([sample_codes(prior, 1, labels=2, generator=g) for _ in range(3)])
    assert torch.equal(one_by_one, sample_codes(prior, 3, labels=2, generator=seeded(4), batch_size=1))


# --- conditioning and guidance ---

def test_label_reaches_the_model(trained_gpt2):
    codes = fixed_codes()
    a = trained_gpt2.logits_for(codes[:1], torch.tensor([0]))
    b = trained_gpt2.logits_for(codes[:1], torch.tensor([1]))
    assert not torch.allclose(a, b)
    # each class samples its own memorised pattern: exactly when greedy, mostly at temperature 1
    greedy = sample_codes(trained_gpt2, C, labels=torch.arange(C), generator=seeded(0), top_k=1)
    assert torch.equal(greedy, codes)
    plain = sample_codes(trained_gpt2, 4 * C, labels=torch.arange(C).repeat(4), generator=seeded(0))
    # (at temperature 1 a sample can drift into another pattern after a rare slip, but it starts on its own)
    assert (plain[:, 0] == codes[:, 0].repeat(4)).float().mean() >= 0.9


def reference_sampler(prior: CodePrior, first_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Plain ancestral sampling straight from the transformers model: no cache, no filtering, no guidance."""
    tokens = first_tokens[:, None]
    with torch.no_grad():
        for _ in range(L):
            logits = prior.model(input_ids=tokens).logits[:, -1, :K].float()
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, 1:]


def test_guidance_scale_one_is_plain_conditional_sampling():
    torch.manual_seed(2)
    prior = CodePrior(tiny_config()).eval()
    labels = torch.tensor([0, 1, 2, 3, 4])
    cond_tokens = labels + K + 2
    expected = reference_sampler(prior, cond_tokens, seeded(7))
    for use_cache in (True, False):
        got = sample_codes(prior, 5, labels=labels, guidance_scale=1.0, generator=seeded(7), use_cache=use_cache)
        assert torch.equal(got, expected)
    # guidance 0 keeps only the unconditional (null-class) logits: sampling from the null class
    null_expected = reference_sampler(prior, torch.full((5,), K + 1), seeded(7))
    assert torch.equal(sample_codes(prior, 5, labels=labels, guidance_scale=0.0, generator=seeded(7)), null_expected)
    # any other scale changes the draw
    assert not torch.equal(sample_codes(prior, 5, labels=labels, guidance_scale=4.0, generator=seeded(7)), expected)


def test_guidance_sharpens_towards_the_class(trained_gpt2):
    codes = fixed_codes()
    # the null class was never trained here, but guided sampling must still follow the class
    samples = sample_codes(trained_gpt2, C, labels=torch.arange(C), guidance_scale=3.0, top_k=1, generator=seeded(0))
    assert (samples == codes).float().mean() > 0.9


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    # probabilities ~ [0.64, 0.23, 0.09, 0.03, 0.01]: the first two are needed to reach 0.7
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=1e-6))).sum() == 1  # the best token always stays
    assert torch.allclose(filter_logits(logits, temperature=2.0).softmax(-1), (logits.double() / 2).softmax(-1))


@pytest.mark.parametrize("temperature, scale", [(1e-300, 1.0), (1.0, 1e300), (1e-300, 1e300), (5e-324, 1.7e308)])
def test_extreme_temperature_and_guidance_give_probabilities_not_nan(temperature, scale):
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, -50.0]])
    probs = filter_logits(logits, temperature=temperature, scale=scale).softmax(-1)
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [0, 2] and torch.allclose(probs.sum(-1), torch.ones(2, dtype=torch.float64))


# --- persistence ---

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    prior = CodePrior(tiny_config(arch)).eval()
    prior.save_pretrained(tmp_path / "prior")
    files = {p.name for p in (tmp_path / "prior").iterdir()}
    assert files == {"model.safetensors", "config.json", "README.md"}  # one config file: the PriorConfig
    assert json.loads((tmp_path / "prior" / "config.json").read_text())["architecture"] == arch
    loaded = CodePrior.from_pretrained(tmp_path / "prior")
    assert loaded.config == prior.config
    codes, labels = fixed_codes(), torch.arange(C)
    assert torch.equal(loaded.logits_for(codes, labels), prior.logits_for(codes, labels))
    assert torch.equal(
        sample_codes(loaded, 3, labels=1, generator=seeded(0)), sample_codes(prior, 3, labels=1, generator=seeded(0))
    )


def test_missing_or_corrupt_checkpoints(tmp_path):
    prior = CodePrior(tiny_config())
    with pytest.raises(CheckpointError, match="no such folder.*make prior"):
        CodePrior.from_pretrained(tmp_path / "nowhere")

    def fresh(name):
        path = tmp_path / name
        prior.save_pretrained(path)
        return path

    path = fresh("truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        CodePrior.from_pretrained(path)

    path = fresh("no_weights")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors missing"):
        CodePrior.from_pretrained(path)

    path = fresh("bad_json")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CodePrior.from_pretrained(path)

    path = fresh("bad_value")
    values = json.loads((path / "config.json").read_text())
    values["num_heads"] = 5
    (path / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="num_heads"):
        CodePrior.from_pretrained(path)

    path = fresh("mismatch")  # weights of another shape under a valid config
    values = json.loads((path / "config.json").read_text())
    values["codebook_size"] = K * 2
    (path / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="do not match its config"):
        CodePrior.from_pretrained(path)

    path = fresh("no_config")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json missing"):
        CodePrior.from_pretrained(path)


# --- bad inputs ---

def test_bad_inputs_give_clear_errors():
    prior = CodePrior(tiny_config())
    unconditional = CodePrior(tiny_config(conditional=False))
    codes = fixed_codes()
    bad = codes.clone()
    bad[0, 3] = K
    with pytest.raises(ValueError, match=r"code 32 is outside this prior's vocabulary \[0, 32\)"):
        prior(bad, torch.arange(C))
    bad[0, 3] = -1
    with pytest.raises(ValueError, match="code -1 is outside"):
        prior(bad, torch.arange(C))
    with pytest.raises(ValueError, match="sequences of 16 codes"):
        prior(codes[:, :10], torch.arange(C))
    with pytest.raises(ValueError, match="integer tensor"):
        prior(codes.float(), torch.arange(C))
    labels = torch.arange(C)
    labels[2] = 12
    with pytest.raises(ValueError, match="class label 12 is not known to this prior, which has 8 classes"):
        prior(codes, labels)
    with pytest.raises(ValueError, match="class label 12 is not known"):
        sample_codes(prior, 2, labels=12)
    with pytest.raises(ValueError, match="expected 8 class labels"):
        prior(codes, torch.arange(3))
    with pytest.raises(ValueError, match="class-conditional.*pass one class label"):
        prior(codes)
    with pytest.raises(ValueError, match="unconditional.*do not pass class labels"):
        unconditional(codes, torch.arange(C))
    with pytest.raises(ValueError, match="unconditional"):
        sample_codes(unconditional, 2, labels=1)
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a class-conditional prior"):
        sample_codes(unconditional, 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\].*got 1.5"):
        sample_codes(prior, 2, labels=0, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        sample_codes(prior, 2, labels=0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1"):
        sample_codes(prior, 2, labels=0, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        sample_codes(prior, 2, labels=0, top_k=-3)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        sample_codes(prior, 0, labels=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        sample_codes(prior, 2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="batch_size"):
        sample_codes(prior, 2, labels=0, batch_size=0)
