"""Train every quantizer with the same data, networks, seed and budget, evaluate each, and tabulate them (Table 1).

    python -m pipelines.compare --config configs/fashion_mnist.yaml --output runs/compare-fashion_mnist \
        [train.max_steps=2000 ...] [models=[vqvae,vqwae]] [eval.num_images=2000 eval.protocol=paper ...]

Overrides: `models=[...]` picks the quantizers (default: all below); `eval.<key>=...` goes to the evaluation
(pipelines/evaluate.py's settings); every other `key=value` goes unchanged to each training run. The only setting
that differs between the runs is the quantizer (`quantizer.name`, and `beta_on_codebook` for the authors' baseline);
`quantizer.beta` left unset resolves to each quantizer's own default (VQ-VAE commitment 0.25, VQ-WAE 1e-3).

Each model trains into `<output>/<model>/tokenizer` (a finished run with the same settings is reused, an interrupted
one resumes) and is evaluated into `<output>/<model>/eval/`. The comparison is written to `<output>/table.md`,
`<output>/table.json` and `<output>/codebook_usage.png` (sorted code histograms side by side).
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from configio.config import from_dict, load_config, parse_override, to_dict
from configio.errors import ConfigError
from configio.files import atomic_write_json, atomic_write_text, file_sha256
from eval.plots import save_usage_histograms
from eval.report import PROTOCOL_TEXT
from stage1_tokenizer.model import WEIGHTS_NAME

from .evaluate import EvalConfig, evaluate_run
from .train_tokenizer import TokenizerJobConfig

ROOT = Path(__file__).resolve().parents[1]

# Each model differs from the others by these overrides only.
MODELS: dict[str, list[str]] = {
    "vqvae": ["quantizer.name=vqvae", "quantizer.beta_on_codebook=false"],
    "vqvae-reference": ["quantizer.name=vqvae", "quantizer.beta_on_codebook=true"],
    "vqwae": ["quantizer.name=vqwae"],
}
DEFAULT_MODELS = ["vqvae", "vqvae-reference", "vqwae"]
DESCRIPTIONS = {
    "vqvae": "VQ-VAE (beta on the commitment term, as van den Oord et al.)",
    "vqvae-reference": "VQ-VAE as in the VQ-WAE authors' code (beta on the codebook term)",
    "vqwae": "VQ-WAE (this paper)",
}


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(models, evaluation overrides, training overrides)."""
    models, eval_overrides, train_overrides = list(DEFAULT_MODELS), [], []
    for text in overrides:
        path, value = parse_override(text)
        if path == ["models"]:
            names = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
            unknown = [n for n in names if n not in MODELS]
            if not names or unknown:
                raise ConfigError(f"models: {unknown[0] if unknown else 'empty'!r} is not a model here; choose from {', '.join(MODELS)}")
            models = list(dict.fromkeys(names))
        elif path[0] == "eval":
            eval_overrides.append(text.split(".", 1)[1])
        elif path[:2] in (["quantizer", "name"], ["quantizer", "beta_on_codebook"]):
            raise ConfigError(f"override '{text}': compare sets the quantizer per model; pick models with models=[{','.join(MODELS)}]")
        else:
            train_overrides.append(text)
    return models, eval_overrides, train_overrides


def job_configs(config: str | None, models: list[str], train_overrides: list[str]) -> dict[str, TokenizerJobConfig]:
    """Every model's training config, built and checked before anything runs."""
    cfgs = {}
    for name in models:
        cfg = load_config(TokenizerJobConfig, config, [*train_overrides, *MODELS[name]])
        cfg.tokenizer_config()
        cfgs[name] = cfg
    return cfgs


def is_finished(tokenizer_dir: Path, cfg: TokenizerJobConfig) -> bool:
    job = tokenizer_dir / "job_config.yaml"
    if not (tokenizer_dir / WEIGHTS_NAME).is_file() or not (tokenizer_dir / "metrics.json").is_file() or not job.is_file():
        return False
    try:  # read back through the config class: settings added since the run started take their defaults
        saved = to_dict(from_dict(TokenizerJobConfig, yaml.safe_load(job.read_text()) or {}))
    except ConfigError:
        return False
    current = to_dict(cfg)
    # train.resume only says how the run was started; everything else must match for the run to count as done.
    saved.get("train", {}).pop("resume", None)
    current["train"].pop("resume", None)
    return saved == current and json.loads((tokenizer_dir / "metrics.json").read_text()).get("steps") == cfg.train.max_steps


def train(name: str, tokenizer_dir: Path, config: str | None, train_overrides: list[str]) -> None:
    """One training run in its own process, so every model starts from the same fresh interpreter and seed."""
    args = [sys.executable, "-m", "pipelines.train_tokenizer", "--output", str(tokenizer_dir)]
    if config:
        args += ["--config", str(config)]
    args += ["train.resume=latest", *train_overrides, *MODELS[name]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(args, env=env)
    if proc.returncode != 0:
        raise ConfigError(f"training {name} failed (exit {proc.returncode}, its message is above); fix it and re-run "
                          "the same command (finished models are reused)")


def evaluation_is_current(run: Path, eval_cfg: EvalConfig) -> dict[str, Any] | None:
    path = run / "eval" / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = (report.get("settings") == to_dict(eval_cfg)
            and report.get("tokenizer_sha256") == file_sha256(run / "tokenizer" / WEIGHTS_NAME)
            and "code_counts" in report)
    return report if same else None


def _cell(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "n/a"


def table_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, report in reports.items():
        section = report["tokenizer_eval"]
        book = section["codebook"]
        lp, rfid = section["lpips"], section["rfid"]
        rows.append({
            "model": name,
            "description": DESCRIPTIONS[name],
            "quantizer": report["quantizer_settings"],
            "ssim": section["ssim"],
            "psnr": section["psnr"],
            "lpips": lp["lpips"] if lp.get("available") else None,
            "lpips_unavailable_reason": None if lp.get("available") else lp.get("reason"),
            "rfid": rfid["fid"] if rfid.get("available") else None,
            "perplexity": book["perplexity"],
            "usage": book["usage"],
            "dead_codes": book["dead_codes"],
            "codebook_size": book["codebook_size"],
            "codes_used_per_position": book["per_position"]["codes_used_per_position"]["mean"],
            "train_seconds": report["training"].get("train_seconds"),
            "steps": report["training"].get("steps"),
            "num_test_images": report["num_test_images"],
            "report": str(Path(report["run"]) / "eval" / "report.md"),
        })
    return rows


def quantizer_summary(settings: dict[str, Any]) -> str:
    """The settings that matter for this quantizer, with beta resolved to the value training used."""
    from stage1_tokenizer.quantizers import QuantizerConfig

    q = QuantizerConfig(**settings)
    if q.name == "vqvae":
        term = "codebook" if q.beta_on_codebook else "commitment"
        return f"beta {q.resolved_beta:g} on the {term} term"
    return f"beta {q.resolved_beta:g}, kl_weight {q.kl_weight:g}, weights {q.weights}, form {q.form}, init {q.init}"


def render_table(rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]], budget: dict[str, Any]) -> str:
    first = next(iter(reports.values()))
    rfid = next((r["tokenizer_eval"]["rfid"] for r in reports.values() if r["tokenizer_eval"]["rfid"].get("available")), None)
    lines = [
        f"# Quantizers compared on {budget['dataset']} ({budget['image_size']} px)",
        "",
        f"Same data, networks, seed ({budget['seed']}) and budget for every model: {budget['steps']} steps of batch "
        f"{budget['batch_size']}, K = {budget['codebook_size']}, latent grid {first['latent_grid'][0]}x{first['latent_grid'][1]}; "
        f"only the quantizer differs. Test split: {first['num_test_images']} of {first['test_split_size']} images"
        f"{' (limited by eval.num_images)' if first['limited'] else ''}.",
        "",
        f"Protocol: {PROTOCOL_TEXT[first['protocol']]}.",
    ]
    if rfid:
        lines.append(f"rFID: {rfid['feature_extractor']} (sha256 `{rfid['feature_extractor_sha256']}`), "
                     f"{rfid['num_images']} reconstructions vs {rfid['num_reference_images']} test images.")
    lines += [
        "",
        "| Model | SSIM | PSNR (dB) | LPIPS | rFID | Perplexity | Usage | Dead codes | Codes/position | Train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['ssim']:.4f} | {row['psnr']:.2f} | {_cell(row['lpips'], '.4f')} | {_cell(row['rfid'], '.2f')} | "
            f"{row['perplexity']:.1f} / {row['codebook_size']} | {100 * row['usage']:.1f}% | {row['dead_codes']} | "
            f"{row['codes_used_per_position']:.1f} | {_cell(row['train_seconds'], '.1f')} |"
        )
    lines.append("")
    lines += [f"- {row['model']}: {row['description']}; {quantizer_summary(row['quantizer'])}; report `{row['report']}`"
              for row in rows]
    reasons = {row["lpips_unavailable_reason"] for row in rows if row["lpips_unavailable_reason"]}
    lines += [f"- LPIPS unavailable: {reason}" for reason in reasons]
    lines += ["- Train time: wall-clock seconds of the training loop on the machine that trained it (evaluation excluded).",
              "- Code usage histograms side by side: `codebook_usage.png`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="tokenizer YAML shared by every model, e.g. configs/fashion_mnist.yaml")
    parser.add_argument("--output", required=True, help="e.g. runs/compare-fashion_mnist")
    parser.add_argument("overrides", nargs="*", help="training key=value, models=[...], eval.key=value")
    args = parser.parse_args(argv)
    models, eval_overrides, train_overrides = split_overrides(args.overrides)
    # Comparison runs have no samples; FID of samples is left to `make eval` on a full run.
    eval_cfg = load_config(EvalConfig, None, ["fid=false", *eval_overrides])
    cfgs = job_configs(args.config, models, train_overrides)
    output = Path(args.output)

    for name in models:
        tokenizer_dir = output / name / "tokenizer"
        if is_finished(tokenizer_dir, cfgs[name]):
            print(f"{name}: reusing the finished run in {tokenizer_dir}")
        else:
            train(name, tokenizer_dir, args.config, train_overrides)

    reports = {}
    for name in models:
        run = output / name
        report = evaluation_is_current(run, eval_cfg)
        if report is None:
            report = evaluate_run(run, eval_cfg)
        else:
            print(f"{name}: reusing the evaluation in {run / 'eval'}")
        reports[name] = report

    cfg = cfgs[models[0]]
    budget = {"dataset": cfg.data.name, "image_size": cfg.data.image_size, "seed": cfg.seed, "steps": cfg.train.max_steps,
              "batch_size": cfg.train.batch_size, "codebook_size": cfg.quantizer.codebook_size,
              "config": args.config, "training_overrides": train_overrides}
    rows = table_rows(reports)
    atomic_write_json(output / "table.json", {"budget": budget, "protocol": eval_cfg.protocol,
                                              "protocol_description": PROTOCOL_TEXT[eval_cfg.protocol],
                                              "evaluation": to_dict(eval_cfg), "models": rows})
    atomic_write_text(output / "table.md", render_table(rows, reports, budget))
    save_usage_histograms({name: torch.tensor(reports[name]["code_counts"]) for name in models}, output / "codebook_usage.png")
    print(f"compared {', '.join(models)}; wrote {output / 'table.md'} and {output / 'codebook_usage.png'}")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
