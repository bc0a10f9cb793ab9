"""SimVQ (stage1_tokenizer/quantizers/simvq.py): the quantizer added as one module; the config, the CLI, compare and
the reports know it through the registry alone."""
import torch

from configio.config import from_dict, load_config
from pipelines import chain, compare
from pipelines.settings import TokenizerJobConfig
from stage1_tokenizer.model import Tokenizer, TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import QuantizerConfig, build_quantizer
from stage1_tokenizer.quantizers.simvq import SimVQQuantizer


def test_known_everywhere_through_the_registry():
    cfg = load_config(TokenizerJobConfig, None, ["quantizer.name=simvq", "quantizer.rotation_trick=true"])
    assert cfg.quantizer.resolved_beta == 0.25 and cfg.quantizer.rotation_trick
    assert chain.MODELS["simvq"] == ["quantizer.name=simvq"] and "SimVQ" in chain.DESCRIPTIONS["simvq"]
    assert "rotation_trick True" in compare.quantizer_summary({"name": "simvq", "rotation_trick": True})


def test_forward_codes_losses_and_lookup():
    torch.manual_seed(0)
    q = build_quantizer(from_dict(QuantizerConfig, {"name": "simvq", "codebook_size": 32}), 8, 16)
    assert isinstance(q, SimVQQuantizer)
    z = torch.randn(3, 8, 4, 4, requires_grad=True)
    out = q(z)
    assert out.indices.shape == (3, 4, 4) and set(out.losses) == {"commitment"}
    # The forward value is the nearest codeword; lookup and quantize agree with it.
    torch.testing.assert_close(out.quantized, q.lookup(out.indices))
    assert torch.equal(q.quantize(z)[1], out.indices.flatten())
    (out.quantized.square().sum() + out.losses["commitment"]).backward()
    assert z.grad.abs().sum() > 0


def test_every_code_moves_with_one_step():
    """The codebook is a frozen basis times a learned linear map: one step moves codes no latent picked."""
    torch.manual_seed(0)
    q = build_quantizer(from_dict(QuantizerConfig, {"name": "simvq", "codebook_size": 64}), 8, 4)
    before = q.codebook.detach().clone()
    out = q(torch.randn(1, 8, 2, 2))
    optimizer = torch.optim.SGD(q.parameters(), lr=0.1)
    (out.quantized.sum() + out.losses["commitment"]).backward()
    optimizer.step()
    unused = torch.ones(64, dtype=torch.bool)
    unused[out.indices.flatten()] = False
    assert unused.sum() >= 60 and (q.codebook.detach()[unused] - before[unused]).abs().amax(1).gt(0).all()


def test_rotation_trick_changes_the_gradient_not_the_value():
    grads = {}
    for rotation in (False, True):
        torch.manual_seed(0)  # the same codebook both times
        q = build_quantizer(from_dict(QuantizerConfig, {"name": "simvq", "codebook_size": 16, "rotation_trick": rotation}),
                            4, 4)
        z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = q(z)
        (out.quantized * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
        grads[rotation] = (out.quantized.detach(), z.grad)
    torch.testing.assert_close(grads[False][0], grads[True][0])
    assert not torch.allclose(grads[False][1], grads[True][1])


def test_a_tokenizer_with_simvq_saves_and_loads(tmp_path):
    cfg = TokenizerConfig(32, 1, NetworkConfig(hidden_channels=16, residual_channels=4),
                          from_dict(QuantizerConfig, {"name": "simvq", "codebook_size": 16}))
    model = Tokenizer(cfg)
    model.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(model.eval().encode(x), loaded.encode(x))
