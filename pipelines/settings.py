"""The settings of the two training jobs, assembled from the classes beside the code each part configures (DataConfig in
datasets.py, TrainConfig in training.py, the tokenizer's and the prior's in their packages), so that the jobs that
run others (compare, sweep, chain) share them without importing each other. Sampling's settings are in
generation.py, evaluation's in eval/report.py. Each job's YAML/`key=value` overrides are read into these by
`configio.config.load_config`; a run folder's job_config.yaml is one of them written out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
