import pytest
import torch

from stage1_tokenizer.networks import Decoder, Encoder, NetworkConfig


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_round_trip(size, channels):
    cfg = NetworkConfig()  # 28-pixel images give a 7x7 grid
    enc, dec = Encoder(cfg, channels), Decoder(cfg, channels)
    x = torch.rand(2, channels, size, size)
    z = enc(x)
    assert z.shape == (2, cfg.embedding_dim, size // cfg.downsample, size // cfg.downsample)
    assert dec(z).shape == x.shape


def test_paper_32_layout():
    enc = Encoder(NetworkConfig(), 3)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs[:3]] == [
        (3, 64, 4, 2), (64, 128, 4, 2), (128, 128, 3, 1)
    ]
    assert convs[-1].out_channels == 64 and convs[-1].kernel_size == (1, 1)


def test_paper_64_layout_has_batch_norm_and_sigmoid():
    cfg = NetworkConfig(hidden_channels=64, residual_channels=64, num_residual_layers=6, batch_norm=True, output_activation="sigmoid")
    enc, dec = Encoder(cfg, 3), Decoder(cfg, 3)
    x = torch.rand(2, 3, 64, 64)
    z = enc(x)
    assert z.shape == (2, 64, 16, 16)
    y = dec(z)
    assert y.shape == x.shape and float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())


@pytest.mark.parametrize("factor, grid", [(2, 16), (8, 4)])
def test_downsample_factor_sets_the_grid(factor, grid):
    cfg = NetworkConfig(downsample=factor)
    z = Encoder(cfg, 1)(torch.rand(1, 1, 32, 32))
    assert z.shape[-2:] == (grid, grid)
    assert Decoder(cfg, 1)(z).shape == (1, 1, 32, 32)
