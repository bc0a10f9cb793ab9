"""Draw images from a trained prior + tokenizer and score them with FID against the real test split.

    python -m pipelines.sample --tokenizer runs/default/tokenizer --prior runs/default/prior --output runs/default/samples \
        num_samples=1000 temperature=1.0 top_k=0 top_p=1.0 guidance_scale=1.0 seed=0

Codes are drawn with the key/value cache, decoded by the tokenizer, and written as PNG under `<output>/images/`
(the folder appears only once every image is written, so an interrupted run never leaves a partial set that looks
complete), plus `grid.png` and `metrics.json` (FID with its feature extractor and image counts, the settings, and
how long sampling took).
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import io
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Subset

from configio.cli import JobArgumentParser
from configio.config import incidental_settings, load_config, to_dict
from configio.devices import pick_device
from configio.errors import ConfigError
from configio.files import atomic_write_json, file_sha256, write_directory_atomically
from eval.fid import FIDError, to_uint8
from eval.plots import save_png
from eval.report import FIDReference
from stage1_tokenizer.model import WEIGHTS_NAME, Tokenizer
from stage2_prior.model import CodePrior

from .datasets import DataConfig, build_splits
from .generation import SampleConfig, check_pair, sample_labels
from .generation import draw as draw_images
from .resources import check_fits_sampling
from .run_folder import claim_folder
from .runs import job_seed, tokenizer_data_config


def png_bytes(image: torch.Tensor) -> bytes:
    array = to_uint8(image).permute(1, 2, 0).cpu().numpy()  # the quantisation FID applies to tensors
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="png")
    return buffer.getvalue()


def score_fid(images: torch.Tensor, data_cfg: DataConfig, cfg: SampleConfig, seed: int) -> dict:
    """FID of `images` (float in [0, 1]) against the first test images, scored as `make eval` scores (FIDReference)."""
    started = time.perf_counter()
    test = build_splits(data_cfg, seed=seed)["test"]
    count = len(test) if cfg.fid_reference_images is None else min(cfg.fid_reference_images, len(test))
    reference = FIDReference(Subset(test, range(count)), data_cfg.name, data_cfg.image_size,
                             Path(data_cfg.root) / "fid_stats", extractor_path=cfg.extractor,
                             batch_size=cfg.fid_batch_size)
    result = reference.score(reference.features(images, desc="FID features (samples)"), "samples")
    return {**result, "num_samples": result["num_images"], "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--output", required=True, help="e.g. runs/default/samples")
    parser.add_argument("--config", default=None, help="YAML with sampling settings")
    parser.add_argument("overrides", nargs="*", help="num_samples=..., temperature=..., top_k=..., top_p=..., label=...")
    args = parser.parse_args(argv)
    cfg = load_config(SampleConfig, args.config, args.overrides)
    tokenizer_dir, prior_dir, output = Path(args.tokenizer), Path(args.prior), Path(args.output)
    device = pick_device(cfg.device)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir, map_location=device)
    prior = CodePrior.from_pretrained(prior_dir, map_location=device)
    check_pair(tokenizer, tokenizer_dir, prior, prior_dir)
    check_fits_sampling(prior.config, cfg.num_samples, min(cfg.batch_size, cfg.num_samples),
                        tokenizer.config.channels * tokenizer.config.image_size**2, "cpu" if device.type == "cpu" else "auto")
    labels = sample_labels(prior, cfg)
    data_cfg = tokenizer_data_config(tokenizer_dir, [])
    settings = {"settings": to_dict(cfg), "tokenizer_sha256": file_sha256(tokenizer_dir / WEIGHTS_NAME),
                "prior_sha256": file_sha256(prior_dir / WEIGHTS_NAME)}
    with claim_folder(output, "sample", settings, inputs=(tokenizer_dir, prior_dir), ignore=incidental_settings(SampleConfig, "settings.")):
        if (output / "metrics.json").is_file():
            print(f"samples: {output} is finished with these settings; nothing to do")
            return
        write_samples(cfg, tokenizer, tokenizer_dir, prior, prior_dir, labels, data_cfg, device, output)


def write_samples(cfg: SampleConfig, tokenizer: Tokenizer, tokenizer_dir: Path, prior: CodePrior, prior_dir: Path,
                  labels: torch.Tensor | None, data_cfg: DataConfig, device: torch.device, output: Path) -> None:
    drawn = draw_images(tokenizer, prior, cfg, labels, device)
    images, sampling_seconds, decode_seconds = drawn.images, drawn.sampling_seconds, drawn.decode_seconds

    def fill(folder: Path) -> None:
        for i, image in enumerate(images):
            (folder / f"{i:06d}.png").write_bytes(png_bytes(image))

    metrics_path = output / "metrics.json"
    write_directory_atomically(output / "images", fill)
    order = torch.argsort(labels[:64], stable=True) if labels is not None else torch.arange(min(64, len(images)))
    save_png(images[:64][order], output / "grid.png", nrow=8)
    metrics = {
        "num_samples": cfg.num_samples,
        "settings": to_dict(cfg),
        "class_conditional": prior.config.class_conditional,
        "num_classes": prior.config.num_classes if prior.config.class_conditional else 0,
        "sampling_seconds": round(sampling_seconds, 2),
        "sequences_per_second": round(cfg.num_samples / sampling_seconds, 1),
        "decode_seconds": round(decode_seconds, 2),
        "device": str(device),
        "tokenizer": str(tokenizer_dir),
        "prior": str(prior_dir),
    }
    if cfg.fid:
        try:
            metrics["fid"] = score_fid(images, data_cfg, cfg, job_seed(tokenizer_dir))
        except FIDError as err:
            raise ConfigError(f"FID: {err}") from None
    atomic_write_json(metrics_path, metrics)
    fid = f"FID {metrics['fid']['fid']:.2f} ({metrics['fid']['num_samples']} samples vs {metrics['fid']['num_reference_images']} test images)" if cfg.fid else "FID skipped"
    print(f"samples: {cfg.num_samples} in {sampling_seconds:.1f}s; {fid}; wrote {output}")


if __name__ == "__main__":
    from configio.cli import run_cli

    run_cli(main)
