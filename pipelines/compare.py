"""The paper's two tables in one command: every quantizer trained the same way, then the same prior over its codes.

    python -m pipelines.compare --config configs/fashion_mnist.yaml --output runs/compare-fashion_mnist \
        [models=[vqvae,vqwae]] [train.max_steps=2000 ...] [prior.train.max_steps=500 ...] \
        [sample.num_samples=1000 sample.fid_reference_images=2000] [eval.num_images=1000 ...] [generation=false]

Overrides: `models=[...]` picks the quantizers (default: all of MODELS); `eval.<key>` goes to the reconstruction
evaluation (pipelines/evaluate.py), `prior.<key>` to the prior job (pipelines/train_prior.py, on top of
--prior-config), `sample.<key>` to sampling (pipelines/sample.py); every other `key=value` goes unchanged to each
tokenizer's training. Only the quantizer differs between the models (`quantizer.name`, plus `beta_on_codebook` for
the authors' VQ-VAE baseline); `quantizer.beta` left unset resolves to each quantizer's own default.

For each model, under `<output>/<model>/`, the same steps as `make sample` (each a job in its own process, so every
model starts from the same fresh interpreter and seed): tokenizer/ (train), eval/ (reconstruction metrics, rFID),
codes/ (extract train/val/test), prior/ (same prior config, seed and step budget), samples/ (same count, settings and
seed; FID against the same reference images). Every step is its job under the run-folder rule (pipelines/run_folder.py): a
finished step with the same settings does nothing, an interrupted one resumes, a changed one starts over with the
old result set aside. The comparison: `table.md`, `table.json`, `codebook_usage.png` and `samples.png` (one row per class).
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads; the jobs this one starts inherit it

from pathlib import Path
from typing import Any

import torch

from configio.cli import run_cli
from configio.config import from_dict, load_config, to_dict
from configio.files import atomic_write_json, atomic_write_text
from eval.plots import save_sample_panels, save_usage_histograms
from eval.report import PROTOCOL_TEXT, EvalConfig
from stage1_tokenizer.quantizers import QuantizerConfig

from .chain import (
    DEFAULT_EVAL,
    MODELS,
    ModelRun,
    add_step_time_ratios,
    comparison_parser,
    generation_text,
    model_list,
    section_configs,
    split_overrides,
    table_row,
    true_or_false,
)
from .run_folder import claim_folder
from .generation import SampleConfig
from .settings import PriorJobConfig, TokenizerJobConfig


# What compare itself writes in its folder (the rest are the model folders, each step's own).
COMPARE_OUTPUTS = ("table.md", "table.json", "codebook_usage.png", "samples.png")


def _cell(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def quantizer_summary(settings: dict[str, Any]) -> str:
    """The settings that matter for this quantizer, as its registry entry states them."""
    cfg = from_dict(QuantizerConfig, settings, prefix="quantizer.")
    return cfg.spec.summary(cfg)


def render_table(rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]], budget: dict[str, Any]) -> str:
    first = next(iter(reports.values()))
    rfid = next((r["tokenizer_eval"]["rfid"] for r in reports.values() if r["tokenizer_eval"]["rfid"].get("available")), None)
    lines = [
        f"# Quantizers compared on {budget['dataset']} ({budget['image_size']} px)",
        "",
        f"Same data, networks, seed ({budget['seed']}) and budget for every model: {budget['steps']} tokenizer steps of "
        f"batch {budget['batch_size']}, K = {budget['codebook_size']}, latent grid {first['latent_grid'][0]}x"
        f"{first['latent_grid'][1]}; only the quantizer differs. Test split: {first['num_test_images']} of "
        f"{first['test_split_size']} images{' (limited by eval.num_images)' if first['limited'] else ''}.",
        "",
        f"Protocol: {PROTOCOL_TEXT[first['protocol']]}.",
    ]
    if rfid:
        lines.append(f"rFID: {rfid['feature_extractor']} (sha256 `{rfid['feature_extractor_sha256']}`), "
                     f"{rfid['num_images']} reconstructions vs {rfid['num_reference_images']} test images.")
    if budget.get("generation"):
        lines.append(generation_text(budget["generation"], "Generation"))
    lines += [
        "",
        "| Model | SSIM | PSNR (dB) | LPIPS | rFID | Perplexity | Usage | Dead codes | Prior val/test bits/code | "
        "Generation FID | Sampling (s) | Train time (s) | Step time vs vqvae |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['ssim']:.4f} | {row['psnr']:.2f} | {_cell(row['lpips'], '.4f')} | "
            f"{_cell(row['rfid'], '.2f')} | {row['perplexity']:.1f} / {row['codebook_size']} | {100 * row['usage']:.1f}% | "
            f"{row['dead_codes']} | {_cell(row['prior_val_bits_per_code'], '.3f')} / {_cell(row['prior_test_bits_per_code'], '.3f')} | "
            f"{_cell(row['generation_fid'], '.2f')} | {_cell(row['sampling_seconds'], '.1f')} | {_cell(row['train_seconds'], '.1f')} | "
            f"{_cell(row.get('step_time_vs_vqvae'), '.2f')} |"
        )
    lines.append("")
    lines += [f"- {row['model']}: {row['description']}; {quantizer_summary(row['quantizer'])}; report `{row['report']}`"
              for row in rows]
    reasons = {row["lpips_unavailable_reason"] for row in rows if row["lpips_unavailable_reason"]}
    lines += [f"- LPIPS unavailable: {reason}" for reason in reasons]
    lines += ["- Train time: wall-clock seconds of the tokenizer's training loop on the machine that trained it; step "
              "time vs vqvae: its seconds per step over vqvae's in this comparison (n/a without vqvae).",
              "- Code usage histograms side by side: `codebook_usage.png`; samples, one row per class: `samples.png`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__, "runs/compare-fashion_mnist",
                               "training key=value, models=[...], eval.k=v, prior.k=v, sample.k=v")
    args = parser.parse_args(argv)
    output = Path(args.output)
    options, sections, train_overrides = split_overrides(args.overrides, ("models", "generation"))
    models = model_list(options.get("models", list(MODELS)))
    generation = true_or_false("generation", options.get("generation", True))
    eval_cfg, prior_cfg, sample_cfg = section_configs(args.prior_config, sections, DEFAULT_EVAL)
    cfgs = {}
    for name in models:
        cfgs[name] = load_config(TokenizerJobConfig, args.config, [*train_overrides, *MODELS[name]])
        cfgs[name].tokenizer_config()
    runs = {name: ModelRun(name, output, args.config, args.prior_config, train_overrides, sections) for name in models}
    settings = {"models": models, "generation": generation, "tokenizers": {n: to_dict(c) for n, c in cfgs.items()},
                "eval": to_dict(eval_cfg), "prior": to_dict(prior_cfg), "sample": to_dict(sample_cfg)}
    with claim_folder(output, "compare", settings, owned=COMPARE_OUTPUTS):
        if (output / "table.json").is_file():
            print(f"compare: {output} is finished with these settings; nothing to do ({output / 'table.md'})")
            return
        compare(args, output, models, cfgs, runs, eval_cfg, prior_cfg, sample_cfg, sections, train_overrides, generation)


def compare(args, output: Path, models: list[str], cfgs: dict[str, TokenizerJobConfig], runs: dict[str, ModelRun],
            eval_cfg: EvalConfig, prior_cfg: PriorJobConfig, sample_cfg: SampleConfig, sections: dict[str, list[str]],
            train_overrides: list[str], generation: bool) -> None:
    reports, generated = {}, {}
    for name, run in runs.items():
        run.train_tokenizer()
        reports[name] = run.evaluate()
        if generation:
            generated[name] = run.generate()

    cfg = cfgs[models[0]]
    budget = {"dataset": cfg.data.name, "image_size": cfg.data.image_size, "seed": cfg.seed, "steps": cfg.train.max_steps,
              "batch_size": cfg.train.batch_size, "codebook_size": cfg.quantizer.codebook_size,
              "config": args.config, "training_overrides": train_overrides}
    if generation:
        budget["generation"] = {"prior_config": args.prior_config, "prior_overrides": sections["prior"],
                                "prior_steps": prior_cfg.train.max_steps, "prior_seed": prior_cfg.seed,
                                "num_samples": sample_cfg.num_samples, "fid_reference_images": sample_cfg.fid_reference_images,
                                "sample_settings": to_dict(sample_cfg)}
    rows = [table_row(name, reports[name], generated.get(name)) for name in models]
    add_step_time_ratios(rows)
    # table.json, what says the comparison is complete, last.
    atomic_write_text(output / "table.md", render_table(rows, reports, budget))
    save_usage_histograms({name: torch.tensor(reports[name]["code_counts"]) for name in models}, output / "codebook_usage.png")
    panels = {name: grid for name in models if generation and (grid := runs[name].class_rows()) is not None}
    if panels:
        save_sample_panels(panels, output / "samples.png")
    atomic_write_json(output / "table.json", {"budget": budget, "protocol": eval_cfg.protocol,
                                              "protocol_description": PROTOCOL_TEXT[eval_cfg.protocol],
                                              "evaluation": to_dict(eval_cfg), "models": rows})
    print(f"compared {', '.join(models)}; wrote {output / 'table.md'}")


if __name__ == "__main__":
    run_cli(main)
