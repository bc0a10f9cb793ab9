"""The paper's convolutional encoder and decoder, with sizes as settings rather than constants.

With the defaults (hidden 128, two stride-2 stages, two residual layers, no batch norm) these are the networks the
paper used for 32x32 images; `hidden_channels=64, num_residual_layers=6, batch_norm=True,
output_activation=sigmoid` gives its 64x64 (CelebA) networks. The latent grid is always input_size / downsample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from configio.errors import ConfigError


@dataclass
class NetworkConfig:
    hidden_channels: int = 128
    residual_channels: int = 32
    num_residual_layers: int = 2
    downsample: int = 4  # a power of two: the number of stride-2 stages is log2(downsample)
    embedding_dim: int = 64
    batch_norm: bool = False
    output_activation: Literal["none", "sigmoid"] = "none"
    image_size: int | None = None  # when set, the size these networks were designed for: data must match
    in_channels: int | None = None  # when set, likewise for the number of image channels

    def validate(self) -> None:
        for key in ("hidden_channels", "residual_channels", "embedding_dim", "downsample"):
            if getattr(self, key) < 1:
                raise ConfigError(f"network.{key} must be positive, got {getattr(self, key)}")
        if self.num_residual_layers < 0:
            raise ConfigError(f"network.num_residual_layers must be >= 0, got {self.num_residual_layers}")
        if self.downsample & (self.downsample - 1):
            raise ConfigError(f"network.downsample must be a power of two (1, 2, 4, 8, ...), got {self.downsample}")
        stages = int(math.log2(self.downsample))
        if stages and self.hidden_channels % (2 ** (stages - 1)):
            raise ConfigError(
                f"network.hidden_channels={self.hidden_channels} must be divisible by {2 ** (stages - 1)} "
                f"for downsample={self.downsample}"
            )

    @property
    def num_stages(self) -> int:
        return int(math.log2(self.downsample))

    def stage_channels(self) -> list[int]:
        """Channels after each stride-2 stage, doubling up to hidden_channels (64, 128 for the paper's 32x32 nets)."""
        return [self.hidden_channels // 2 ** (self.num_stages - 1 - i) for i in range(self.num_stages)]

    def check_fits(self, image_size: int, channels: int) -> None:
        """Raise ConfigError if images of this size and channel count cannot go through these networks."""
        if self.image_size is not None and self.image_size != image_size:
            raise ConfigError(
                f"the networks are configured for {self.image_size}x{self.image_size} images "
                f"(network.image_size) but the data is {image_size}x{image_size}; set data.image_size={self.image_size} "
                f"or use a config made for {image_size}-pixel images"
            )
        if self.in_channels is not None and self.in_channels != channels:
            raise ConfigError(
                f"the networks are configured for {self.in_channels}-channel images (network.in_channels) "
                f"but the data has {channels}; remove network.in_channels or pick matching data"
            )
        if image_size % self.downsample:
            raise ConfigError(
                f"data.image_size={image_size} is not divisible by network.downsample={self.downsample}; "
                f"pick an image size that is a multiple of {self.downsample}"
            )


def _norm(channels: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()


class ResidualLayer(nn.Module):
    def __init__(self, channels: int, residual_channels: int, batch_norm: bool):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, residual_channels, 3, padding=1, bias=not batch_norm),
            _norm(residual_channels, batch_norm),
            nn.ReLU(),
            nn.Conv2d(residual_channels, channels, 1, bias=not batch_norm),
            _norm(channels, batch_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_stack(cfg: NetworkConfig) -> list[nn.Module]:
    return [ResidualLayer(cfg.hidden_channels, cfg.residual_channels, cfg.batch_norm) for _ in range(cfg.num_residual_layers)]


class Encoder(nn.Module):
    def __init__(self, cfg: NetworkConfig, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out in cfg.stage_channels():
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), _norm(out, cfg.batch_norm), nn.ReLU()]
            channels = out
        layers += [nn.Conv2d(channels, cfg.hidden_channels, 3, padding=1), *_residual_stack(cfg), nn.ReLU()]
        layers.append(nn.Conv2d(cfg.hidden_channels, cfg.embedding_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: NetworkConfig, out_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.embedding_dim, cfg.hidden_channels, 3, padding=1), *_residual_stack(cfg)]
        widths = list(reversed(cfg.stage_channels()))
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            out = out_channels if last else widths[i + 1]
            layers += [nn.ReLU(), nn.ConvTranspose2d(width, out, 4, stride=2, padding=1)]
            if not last:
                layers.append(_norm(out, cfg.batch_norm))
        if not widths:
            layers += [nn.ReLU(), nn.Conv2d(cfg.hidden_channels, out_channels, 3, padding=1)]
        if cfg.output_activation == "sigmoid":
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
