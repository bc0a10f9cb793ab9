"""The codebook-size sweep: the quantizers compared at several codebook sizes, one table and one figure.

    python -m pipelines.sweep --config configs/fashion_mnist.yaml --output runs/sweep-fashion_mnist \
        [sizes=[512,2048,8192,16384]] [models=[...]] [rivals=2] [generation=true] [train.max_steps=1000 ...] \
        [eval.rfid_images=1000 ...] [prior.train.max_steps=1500 ...] [sample.num_samples=1000 ...]

Same data, networks, seed and step budget for every model and size; only the quantizer and `codebook_size` differ
(FSQ takes the levels its paper gives for the size and reports its real size). Order:
1. the largest size, every model (`models`, default: all of compare's);
2. the `rivals` strongest other quantizers there (highest test perplexity, then usage) join VQ-WAE at the sizes in
   between, with vqvae as the step-time baseline;
3. with generation=true, VQ-WAE and those rivals at the largest size get the same prior and samples (generation
   FID; the prior's vocabulary is the codebook);
4. the smallest size, every model.
Each model's steps are jobs under `<output>/K<size>/<model>/` (pipelines/chain.py), each under the run-folder rule:
a finished step does nothing, so an interrupted sweep resumes where it stopped. Evaluation uses the whole test
split for every metric but rFID (a codebook of 16,384 needs many images to show its usage; Inception features are
the slow part), which takes the first `eval.rfid_images` test images.
Outputs: `table.md`, `table.json` (written last: the sweep is complete) and `usage_perplexity_vs_codebook_size.png`.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads; the jobs this one starts inherit it

from pathlib import Path
from typing import Any

from configio.cli import run_cli
from configio.config import load_config, to_dict
from configio.errors import ConfigError
from configio.files import atomic_write_json, atomic_write_text
from eval.plots import save_sweep_curves
from eval.report import PROTOCOL_TEXT, EvalConfig

from .chain import (
    MODELS,
    ModelRun,
    add_step_time_ratios,
    comparison_parser,
    generation_text,
    generation_columns,
    model_list,
    section_configs,
    split_overrides,
    table_row,
    true_or_false,
)
from .run_folder import claim_folder
from .generation import SampleConfig
from .settings import PriorJobConfig, TokenizerJobConfig

SWEEP_OUTPUTS = ("table.md", "table.json", "usage_perplexity_vs_codebook_size.png")
DEFAULT_SIZES = [512, 2048, 8192, 16384]
DEFAULT_EVAL = ["rfid_images=1000", "fid=false"]
OURS, BASELINE = "vqwae", "vqvae"


def size_list(value: Any) -> list[int]:
    sizes = value if isinstance(value, list) else [value]
    if not sizes or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in sizes):
        raise ConfigError(f"sizes: expected a list of codebook sizes >= 2, e.g. sizes=[512,16384], got {value!r}")
    return sorted(set(sizes))


def strongest(rows: list[dict[str, Any]], count: int) -> list[str]:
    """The `count` models other than VQ-WAE with the highest test perplexity (then usage)."""
    others = [row for row in rows if row["model"] != OURS]
    others.sort(key=lambda row: (-row["perplexity"], -row["usage"], row["model"]))
    return [row["model"] for row in others[:count]]


def render(rows: list[dict[str, Any]], budget: dict[str, Any]) -> str:
    cell = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"  # noqa: E731
    lines = [
        f"# Codebook sizes {', '.join(str(k) for k in budget['sizes'])} on {budget['dataset']} ({budget['image_size']} px)",
        "",
        f"Same data, networks, seed ({budget['seed']}) and budget at every size: {budget['steps']} tokenizer steps of "
        f"batch {budget['batch_size']}; only the quantizer and its codebook size differ. Rivals at the sizes in between "
        f"(the strongest at K = {budget['sizes'][-1]} by test perplexity): {', '.join(budget['rivals']) or 'none'}.",
        "",
        f"Protocol: {PROTOCOL_TEXT[budget['protocol']]}. Usage, perplexity, dead codes, PSNR and SSIM over "
        f"{rows[0]['num_test_images']} test images; rFID over the first {budget['rfid_images']} of them.",
    ]
    if budget.get("generation"):
        lines.append(generation_text(budget["generation"], f"Generation at K = {budget['sizes'][-1]}"))
    lines += [
        "",
        "| K | Model | Perplexity | Usage | Dead codes | PSNR (dB) | SSIM | rFID | Step time vs vqvae | "
        "Prior val bits/code | Generation FID |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['codebook_size']} | {row['model']} | {row['perplexity']:.1f} | {100 * row['usage']:.1f}% | "
            f"{row['dead_codes']} | {row['psnr']:.2f} | {row['ssim']:.4f} | {cell(row['rfid'], '.2f')} | "
            f"{cell(row['step_time_vs_vqvae'], '.2f')} | {cell(row['prior_val_bits_per_code'], '.3f')} | "
            f"{cell(row['generation_fid'], '.2f')} |")
    lines += ["", "- K: the codebook's real size (FSQ's levels give 15,360 codes for 16,384, for example).",
              "- Step time vs vqvae: training-loop seconds per step over vqvae's at the same size, same machine.",
              "- Usage and perplexity against K: `usage_perplexity_vs_codebook_size.png`; each model's own report: "
              "`K<size>/<model>/eval/report.md`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__, "runs/sweep-fashion_mnist", "sizes=[...], models=[...], rivals=N, "
                               "generation=true|false, training key=value, eval.k=v, prior.k=v, sample.k=v")
    args = parser.parse_args(argv)
    output = Path(args.output)
    options, sections, train_overrides = split_overrides(args.overrides, ("sizes", "models", "rivals", "generation"))
    sizes = size_list(options.get("sizes", DEFAULT_SIZES))
    models = model_list(options.get("models", list(MODELS)))
    if OURS not in models:
        raise ConfigError(f"models: the sweep compares against {OURS}; include it, e.g. models=[{OURS},{BASELINE}]")
    rivals = options.get("rivals", 2)
    if not isinstance(rivals, int) or isinstance(rivals, bool) or not 0 <= rivals < len(models):
        raise ConfigError(f"rivals: expected a whole number from 0 to {len(models) - 1}, got {rivals!r}")
    generation = true_or_false("generation", options.get("generation", True))
    eval_cfg, prior_cfg, sample_cfg = section_configs(args.prior_config, sections, DEFAULT_EVAL)
    tokenizers = {}
    for size in sizes:
        for name in models:
            cfg = load_config(TokenizerJobConfig, args.config,
                              [*train_overrides, f"quantizer.codebook_size={size}", *MODELS[name]])
            cfg.tokenizer_config()
            tokenizers[f"{size}/{name}"] = cfg
    settings = {"sizes": sizes, "models": models, "rivals": rivals, "generation": generation,
                "tokenizers": {key: to_dict(cfg) for key, cfg in tokenizers.items()},
                "eval": to_dict(eval_cfg), "prior": to_dict(prior_cfg), "sample": to_dict(sample_cfg)}
    with claim_folder(output, "sweep", settings, owned=SWEEP_OUTPUTS):
        if (output / "table.json").is_file():
            print(f"sweep: {output} is finished with these settings; nothing to do ({output / 'table.md'})")
            return
        sweep(args, output, sizes, models, rivals, generation, tokenizers, eval_cfg, prior_cfg, sample_cfg, sections,
              train_overrides)


def sweep(args, output: Path, sizes: list[int], models: list[str], rival_count: int, generation: bool,
          tokenizers: dict[str, TokenizerJobConfig], eval_cfg: EvalConfig, prior_cfg: PriorJobConfig,
          sample_cfg: SampleConfig, sections: dict[str, list[str]], train_overrides: list[str]) -> None:
    def run(size: int, name: str) -> ModelRun:
        return ModelRun(name, output / f"K{size}", args.config, args.prior_config,
                        [*train_overrides, f"quantizer.codebook_size={size}"], sections)

    def tokenizer_rows(size: int, names: list[str]) -> list[dict[str, Any]]:
        reports = {}
        for i, name in enumerate(names):
            print(f"sweep: K = {size}, {name} ({i + 1} of {len(names)})", flush=True)
            model = run(size, name)
            model.train_tokenizer()
            reports[name] = model.evaluate()
        return [table_row(name, reports[name], None) for name in names]

    largest, smallest, middle = sizes[-1], sizes[0], sizes[1:-1]
    by_size = {largest: tokenizer_rows(largest, models)}
    rivals = strongest(by_size[largest], rival_count)
    for size in middle:
        by_size[size] = tokenizer_rows(size, [m for m in models if m in (OURS, *rivals, BASELINE)])
    if generation:
        for row in by_size[largest]:
            if row["model"] in (OURS, *rivals):
                print(f"sweep: generation at K = {largest}, {row['model']}", flush=True)
                row.update(generation_columns(run(largest, row["model"]).generate()))
    if smallest != largest:
        by_size[smallest] = tokenizer_rows(smallest, models)
    rows = []
    for size in sizes:
        add_step_time_ratios(by_size[size])
        rows += by_size[size]

    cfg = tokenizers[f"{largest}/{OURS}"]
    budget = {"dataset": cfg.data.name, "image_size": cfg.data.image_size, "seed": cfg.seed, "steps": cfg.train.max_steps,
              "batch_size": cfg.train.batch_size, "sizes": sizes, "rivals": rivals, "protocol": eval_cfg.protocol,
              "rfid_images": eval_cfg.rfid_images, "config": args.config, "training_overrides": train_overrides}
    if generation:
        budget["generation"] = {"prior_config": args.prior_config, "prior_overrides": sections["prior"],
                                "prior_steps": prior_cfg.train.max_steps, "prior_seed": prior_cfg.seed,
                                "num_samples": sample_cfg.num_samples,
                                "fid_reference_images": sample_cfg.fid_reference_images}
    atomic_write_text(output / "table.md", render(rows, budget))
    save_sweep_curves(rows, output / "usage_perplexity_vs_codebook_size.png")
    # table.json, what says the sweep is complete, last.
    atomic_write_json(output / "table.json", {"budget": budget, "evaluation": to_dict(eval_cfg), "rows": rows})
    print(f"swept {', '.join(str(k) for k in sizes)}; wrote {output / 'table.md'}")


if __name__ == "__main__":
    run_cli(main)
