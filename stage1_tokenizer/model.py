"""The tokenizer: encoder -> quantizer -> decoder, saved the Hugging Face way (config.json + model.safetensors).

    tokenizer = Tokenizer(TokenizerConfig(image_size=32, channels=1))
    tokenizer.save_pretrained("runs/default/tokenizer"); Tokenizer.from_pretrained("runs/default/tokenizer")
    tokenizer.push_to_hub("you/fashion-mnist-vqwae")   # when a hub is reachable
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from configio.config import from_dict, to_dict
from configio.errors import ConfigError
from configio.hub import WEIGHTS_NAME, HubModel

from .networks import Decoder, Encoder, NetworkConfig
from .quantizers import QuantizerConfig, build_quantizer

CONFIG_NAME = "config.json"
__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "Tokenizer", "TokenizerConfig", "TokenizerOutput"]


@dataclass
class TokenizerConfig:
    image_size: int
    channels: int
    network: NetworkConfig = field(default_factory=NetworkConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def validate(self) -> None:
        if self.channels < 1 or self.image_size < 1:
            raise ConfigError(f"image_size and channels must be positive, got {self.image_size} and {self.channels}")
        self.network.check_fits(self.image_size, self.channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.network.downsample

    @property
    def num_positions(self) -> int:
        return self.latent_size**2


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


class Tokenizer(nn.Module, HubModel, library_name="vq-wae", tags=["vq-wae", "image-tokenizer"]):
    what = "tokenizer"
    make_hint = "train one with 'make tokenizer' or check the path"

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        # from_pretrained hands over the JSON config with its nested sections as dicts: rebuild and check them.
        cfg = from_dict(TokenizerConfig, to_dict(config) if dataclasses.is_dataclass(config) else dict(config))
        self.config = cfg
        self.encoder = Encoder(cfg.network, cfg.channels)
        self.quantizer = build_quantizer(
            cfg.quantizer, cfg.network.embedding_dim, cfg.num_positions, data_dim=cfg.channels * cfg.image_size**2
        )
        self.decoder = Decoder(cfg.network, cfg.channels)

    @property
    def codebook_size(self) -> int:
        """The quantizer's real number of codes (FSQ's recommended levels may give fewer than quantizer.codebook_size)."""
        return int(self.quantizer.codebook_size)

    def check_images(self, x: torch.Tensor) -> None:
        expected = (self.config.channels, self.config.image_size, self.config.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"this tokenizer takes images of shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        z = self.encoder(x)
        # Quantizer and transport math stay in float32 under mixed precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = self.quantizer(z.float())
        reconstruction = self.decoder(q.quantized)
        mse = F.mse_loss(reconstruction.float(), x.float())
        losses = {"reconstruction": mse, **self.quantizer.losses_given_reconstruction(q.losses, mse)}
        return TokenizerOutput(reconstruction, q.indices, losses, q.stats)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> code indices (B, S/f, S/f)."""
        self.check_images(x)
        z = self.encoder(x).float()
        _, indices, _ = self.quantizer.quantize(z)
        return indices.view(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images (B, C, S, S)."""
        side = self.config.latent_size
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (side, side):
            raise ValueError(f"this tokenizer decodes code grids of shape (batch, {side}, {side}), got {tuple(indices.shape)}")
        return self.decoder(self.quantizer.lookup(indices.long()))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.encode(x)
        return self.decode(indices), indices
