"""Evaluate a run: its tokenizer on the test split (rFID, PSNR, SSIM, LPIPS, codebook usage) and its samples (FID).

    python -m pipelines.evaluate --run runs/default [num_images=2000] [protocol=clean|paper] [key=value ...]

Reads `<run>/tokenizer` (and `<run>/samples/images` when `make sample` has made them) and writes
`<run>/eval/report.json` and a readable `<run>/eval/report.md` that states the protocol, the feature extractor (name
and sha256) and the image counts behind every FID. The data settings are the tokenizer's own (its job_config.yaml),
so the test split is the one it was trained against. Inception runs at about 10 images/s on a 2-core CPU: cap the
test images with num_images=N (recorded in the report) for a quick look.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

from configio.cli import JobArgumentParser
from configio.config import incidental_settings, load_config, to_dict
from configio.devices import pick_device
from configio.errors import CheckpointError, ConfigError
from configio.files import atomic_write_json, atomic_write_text, file_sha256
from eval.fid import FIDError, list_images
from eval.report import (
    EvalConfig,
    PROTOCOL_TEXT,
    FIDReference,
    evaluate_reconstructions,
    evaluate_samples,
    time_per_thousand,
)
from stage1_tokenizer.model import CONFIG_NAME, WEIGHTS_NAME, Tokenizer

from .datasets import build_splits
from .run_folder import claim_folder
from .runs import job_seed, tokenizer_data_config


def check_run(run: Path) -> Path:
    if not run.is_dir():
        raise ConfigError(f"run folder '{run}' does not exist; train it first with 'make tokenizer RUN={run}'")
    tokenizer_dir = run / "tokenizer"
    if not (tokenizer_dir / CONFIG_NAME).is_file() or not (tokenizer_dir / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"'{run}' holds no trained tokenizer ({tokenizer_dir}/{WEIGHTS_NAME} missing); run 'make tokenizer RUN={run}'")
    return tokenizer_dir


def samples_fingerprint(folder: Path) -> str | None:
    """sha256 over the sample images' names, sizes and modification times (None when there are none)."""
    files = list_images(folder) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = os.stat(path)
        digest.update(f"{os.path.basename(path)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def evaluate_run(run: Path, cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate `run` into `<run>/eval/` (report.json + report.md) under the run-folder rule; returns the report.

    The tokenizer, the sample images and the settings define the report: the same ones do nothing. The report keeps
    the pooled code histogram (`code_counts`) so comparisons can plot it without re-evaluating.
    """
    run = Path(run)
    tokenizer_dir = check_run(run)
    samples_dir = Path(cfg.samples) if cfg.samples else run / "samples" / "images"
    if cfg.fid and cfg.samples and len(list_images(samples_dir) if samples_dir.is_dir() else []) < 2:
        raise ConfigError(f"samples={cfg.samples} holds fewer than 2 images; point it at a folder of sample images "
                          "or set fid=false")
    settings = {"settings": to_dict(cfg), "tokenizer_sha256": file_sha256(tokenizer_dir / WEIGHTS_NAME),
                "samples": samples_fingerprint(samples_dir) if cfg.fid else None}
    inputs = (tokenizer_dir, samples_dir) if samples_dir.is_dir() else (tokenizer_dir,)
    with claim_folder(run / "eval", "evaluate", settings, inputs=inputs, ignore=incidental_settings(EvalConfig, "settings.")):
        report_path = run / "eval" / "report.json"
        if report_path.is_file() and (run / "eval" / "report.md").is_file():
            try:
                return json.loads(report_path.read_text())
            except ValueError:
                pass
        return _evaluate(run, tokenizer_dir, samples_dir, cfg, progress)


def _evaluate(run: Path, tokenizer_dir: Path, samples_dir: Path, cfg: EvalConfig, progress: bool) -> dict[str, Any]:
    device = pick_device(cfg.device)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir, map_location=device)
    data_cfg = tokenizer_data_config(tokenizer_dir, [])
    test = build_splits(data_cfg, seed=job_seed(tokenizer_dir))["test"]
    count = len(test) if cfg.num_images is None else min(cfg.num_images, len(test))
    if count < 2:
        raise ConfigError(f"the test split has {count} image(s); evaluation needs at least 2 (raise data.limit)")
    subset = test if count == len(test) else Subset(test, range(count))

    started = time.perf_counter()
    reference = None
    try:
        if cfg.rfid or cfg.fid:
            fid_count = count if cfg.rfid_images is None else min(cfg.rfid_images, count)
            reference_images = subset if fid_count == count else Subset(subset, range(fid_count))
            reference = FIDReference(reference_images, data_cfg.name, data_cfg.image_size,
                                     Path(data_cfg.root) / "fid_stats", cfg.protocol, cfg.extractor, device,
                                     cfg.fid_batch_size)
        section, counts = evaluate_reconstructions(
            tokenizer, subset, batch_size=cfg.batch_size, device=device, protocol=cfg.protocol, lpips=cfg.lpips,
            fid_reference=reference if cfg.rfid else None, progress=progress,
        )
        if cfg.fid:
            samples = evaluate_samples(samples_dir, reference)
        else:
            samples = {"available": False, "reason": "disabled (fid=false)"}
    except FIDError as err:
        raise ConfigError(f"FID: {err}") from None

    train_metrics_path = tokenizer_dir / "metrics.json"
    train_metrics = json.loads(train_metrics_path.read_text()) if train_metrics_path.is_file() else {}
    report: dict[str, Any] = {
        "protocol": cfg.protocol,
        "protocol_description": PROTOCOL_TEXT[cfg.protocol],
        "run": str(run),
        "tokenizer": str(tokenizer_dir),
        "tokenizer_sha256": file_sha256(tokenizer_dir / WEIGHTS_NAME),
        "quantizer": tokenizer.config.quantizer.name,
        "quantizer_settings": to_dict(tokenizer.config.quantizer),
        "codebook_size": tokenizer.codebook_size,
        "latent_grid": [tokenizer.config.latent_size, tokenizer.config.latent_size],
        "dataset": data_cfg.name,
        "image_size": data_cfg.image_size,
        "test_split_size": len(test),
        "num_test_images": count,
        "limited": count < len(test),
        "device": str(device),
        "settings": to_dict(cfg),
        "tokenizer_eval": section,
        "samples_fid": samples,
        "training": {k: train_metrics[k] for k in ("steps", "train_seconds", "weights", "processes") if k in train_metrics},
        "seconds": round(time.perf_counter() - started, 1),
        "code_counts": counts.tolist(),
    }
    report["seconds_per_1000_images"] = timings_per_thousand(report)
    # report.md first, report.json (what a reader checks for) last.
    atomic_write_text(run / "eval" / "report.md", render_markdown(report))
    atomic_write_json(run / "eval" / "report.json", report)
    return report


def timings_per_thousand(report: dict[str, Any]) -> dict[str, float]:
    """Seconds per 1,000 test images for each metric, from the timings of this evaluation."""
    section = report["tokenizer_eval"]
    n, s = section["num_images"], section["seconds"]
    out = {"tokenizer + PSNR/SSIM + codebook": time_per_thousand(s["reconstruction_psnr_ssim_codebook"], n)}
    if section["lpips"].get("available"):
        out["LPIPS"] = time_per_thousand(s["lpips"], n)
    if report["protocol"] == "paper":
        out["PSNR/SSIM at 256 px"] = time_per_thousand(s["paper_psnr_ssim"], n)
    if section["rfid"].get("available"):
        out["Inception features (rFID, generated side)"] = time_per_thousand(s["rfid_features"],
                                                                             section["rfid"]["num_images"])
        if not section["rfid"]["reference_cached"]:
            out["Inception features (reference side, then cached)"] = time_per_thousand(
                section["rfid"]["reference_seconds"], section["rfid"]["num_reference_images"])
    samples = report["samples_fid"]
    if samples.get("available"):
        out["Inception features (samples)"] = time_per_thousand(samples["feature_seconds"], samples["num_images"])
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fid_cell(fid: dict[str, Any]) -> str:
    if not fid.get("available"):
        return "unavailable"
    return f"{fid['fid']:.2f}"


def _fid_lines(title: str, fid: dict[str, Any]) -> list[str]:
    if not fid.get("available"):
        return [f"- **{title}**: unavailable: {fid.get('reason')}"]
    lines = [
        f"- **{title}**: {fid['fid']:.3f} ({fid['num_images']} images vs {fid['num_reference_images']} reference images: "
        f"{fid['reference']}; {fid['mode']}, resolution {fid['resolution']})",
        f"  - feature extractor: {fid['feature_extractor']}, sha256 `{fid['feature_extractor_sha256']}`",
        f"  - Frechet distance: {fid['frechet_method']}; reference statistics "
        f"{'read from the cache' if fid['reference_cached'] else 'computed and cached'}",
    ]
    lines += [f"  - warning: {w}" for w in fid.get("warnings", [])]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    section = report["tokenizer_eval"]
    book = section["codebook"]
    per_pos = book["per_position"]
    lp = section["lpips"]
    lines = [
        f"# Evaluation of `{report['run']}`",
        "",
        f"**Protocol: {report['protocol_description']}.**",
        "",
        f"Tokenizer `{report['tokenizer']}` (sha256 `{report['tokenizer_sha256'][:16]}...`): quantizer "
        f"{report['quantizer']}, K = {report['codebook_size']}, latent grid {report['latent_grid'][0]}x{report['latent_grid'][1]}; "
        f"{report['dataset']} at {report['image_size']} px, test split: {report['num_test_images']} of "
        f"{report['test_split_size']} images{' (limited by num_images)' if report['limited'] else ''}; device {report['device']}.",
        "",
        "| PSNR (dB) | SSIM | LPIPS | rFID | FID (samples) | perplexity | usage | dead codes |",
        "|---|---|---|---|---|---|---|---|",
        f"| {section['psnr']:.2f} | {section['ssim']:.4f} | {_fmt(lp['lpips']) if lp.get('available') else 'unavailable'} | "
        f"{_fid_cell(section['rfid'])} | {_fid_cell(report['samples_fid'])} | {book['perplexity']:.1f} / {book['codebook_size']} | "
        f"{100 * book['usage']:.1f}% | {book['dead_codes']} |",
        "",
        f"- PSNR / SSIM: {section['image_metrics']}.",
        "- LPIPS: " + (f"{lp['lpips']:.4f}, {lp['reduction']} over {lp['num_images']} images ({lp['metric']}; trunk "
                        f"sha256 `{lp['trunk_sha256'][:16]}...`)" if lp.get("available") else f"unavailable: {lp['reason']}"),
        f"- Codebook: perplexity {book['perplexity']:.2f} and usage {100 * book['usage']:.1f}% from the code histogram "
        f"{book['histogram']}; {book['dead_codes']} of {book['codebook_size']} codes never used.",
        f"- Per latent position ({per_pos['num_positions']} positions): codes used "
        f"{per_pos['codes_used_per_position']['mean']:.1f} on average (min {per_pos['codes_used_per_position']['min']}, "
        f"max {per_pos['codes_used_per_position']['max']}); perplexity of each position's histogram "
        f"{per_pos['perplexity_per_position']['mean']:.1f} on average (min {per_pos['perplexity_per_position']['min']:.1f}, "
        f"max {per_pos['perplexity_per_position']['max']:.1f}).",
    ]
    if "learned_pi_perplexity" in per_pos:
        pi = per_pos["learned_pi_perplexity"]
        lines.append(f"- VQ-WAE code distributions pi ({pi['form']}, {'learned' if pi['learned'] else 'fixed uniform'}): "
                     f"perplexity {pi['mean']:.1f} on average (min {pi['min']:.1f}, max {pi['max']:.1f}) of {report['codebook_size']}.")
    lines += _fid_lines("rFID (test images vs their reconstructions)", section["rfid"])
    lines += _fid_lines("FID of samples (vs the test split)", report["samples_fid"])
    training = report.get("training") or {}
    if training:
        lines.append(f"- Training: {training.get('steps')} steps, {training.get('train_seconds')} s, weights: {training.get('weights')}.")
    lines += ["", f"Timings on {report['device']} (this evaluation took {report['seconds']} s), seconds per 1,000 images:", ""]
    lines += [f"- {k}: {v}" for k, v in report["seconds_per_1000_images"].items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder holding tokenizer/ (and samples/images), e.g. runs/default")
    parser.add_argument("--config", default=None, help="YAML with evaluation settings")
    parser.add_argument("overrides", nargs="*", help="num_images=..., protocol=paper, lpips=false, rfid=false, fid=false, ...")
    args = parser.parse_args(argv)
    cfg = load_config(EvalConfig, args.config, args.overrides)
    report = evaluate_run(Path(args.run), cfg)
    section = report["tokenizer_eval"]
    rfid = f"{section['rfid']['fid']:.2f}" if section["rfid"].get("available") else "skipped"
    print(
        f"eval ({report['protocol']} protocol, {report['num_test_images']} test images): PSNR {section['psnr']:.2f} dB, "
        f"SSIM {section['ssim']:.4f}, rFID {rfid}, perplexity {section['codebook']['perplexity']:.1f}; "
        f"wrote {Path(args.run) / 'eval' / 'report.md'}"
    )

if __name__ == "__main__":
    from configio.cli import run_cli

    run_cli(main)
