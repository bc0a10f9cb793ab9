"""The tokenizer: encoder -> quantizer -> decoder, saved as safetensors plus a readable YAML config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from configio.config import from_dict, to_dict
from configio.errors import CheckpointError, ConfigError
from configio.files import (
    atomic_save_safetensors,
    atomic_write_text,
    load_safetensors,
    read_stored_mapping,
)

from .networks import Decoder, Encoder, NetworkConfig
from .quantizers import QuantizerConfig, build_quantizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


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


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = Encoder(cfg.network, cfg.channels)
        self.quantizer = build_quantizer(cfg.quantizer, cfg.network.embedding_dim, cfg.num_positions)
        self.decoder = Decoder(cfg.network, cfg.channels)

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

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
        losses = {"reconstruction": F.mse_loss(reconstruction.float(), x.float()), **q.losses}
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

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        atomic_save_safetensors(self.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt", "model": "vq-tokenizer"})
        atomic_write_text(directory / CONFIG_NAME, yaml.safe_dump(to_dict(self.config), sort_keys=False))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "Tokenizer":
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        values = read_stored_mapping(config_path, "tokenizer", "train one with 'make tokenizer' or check the path")
        try:
            cfg = from_dict(TokenizerConfig, values)
        except ConfigError as err:
            raise CheckpointError(f"tokenizer config '{config_path}' is invalid: {err}") from None
        model = cls(cfg)
        state = load_safetensors(directory / WEIGHTS_NAME)
        missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise CheckpointError(
                f"tokenizer weights '{directory / WEIGHTS_NAME}' do not match its config "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"tokenizer weights '{directory / WEIGHTS_NAME}' do not match its config: {str(err).splitlines()[-1].strip()}") from None
        return model.to(map_location).eval()
