import json

import pytest
import torch

from stage1_tokenizer.model import Tokenizer, TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import QuantizerConfig


@pytest.mark.parametrize("quantizer", ["vqwae", "vqvae"])
def test_save_load_round_trip(tmp_path, quantizer):
    cfg = TokenizerConfig(32, 3, NetworkConfig(hidden_channels=32, residual_channels=8), QuantizerConfig(name=quantizer, codebook_size=32))
    model = Tokenizer(cfg).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 32
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = Tokenizer.from_pretrained(tmp_path)
    x = torch.rand(3, 3, 32, 32)
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert torch.equal(codes, loaded.encode(x))
    torch.testing.assert_close(model.decode(codes), loaded.decode(codes))
    recon, idx = model.reconstruct(x)
    torch.testing.assert_close(recon, model.decode(idx))


def test_forward_losses_and_bad_shapes():
    model = Tokenizer(TokenizerConfig(28, 1, NetworkConfig(hidden_channels=32, residual_channels=8), QuantizerConfig(codebook_size=16)))
    out = model(torch.rand(4, 1, 28, 28))
    assert set(out.losses) == {"reconstruction", "wasserstein", "kl"}
    assert out.indices.shape == (4, 7, 7) and out.reconstruction.shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="code grids"):
        model.decode(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="code indices"):
        model.decode(torch.full((1, 7, 7), 99))


def test_mixed_precision_keeps_quantizer_in_float32():
    model = Tokenizer(TokenizerConfig(32, 1, NetworkConfig(hidden_channels=32, residual_channels=8), QuantizerConfig(codebook_size=16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 32, 32))
    assert out.losses["wasserstein"].dtype == torch.float32 and out.losses["kl"].dtype == torch.float32
    assert out.reconstruction.dtype == torch.bfloat16
