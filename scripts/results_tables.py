"""Every result table in README.md and docs/*.md, made from the runs' own JSON files under docs/results/.

    .venv/bin/python scripts/results_tables.py           # rewrite the tables in place (make tables)
    .venv/bin/python scripts/results_tables.py --check   # exit 1, naming the file, where a committed table differs

Result files. `docs/results/<name>/` holds one run's results exactly as its job wrote them: `table.json` from
`make compare` (pipelines/compare.py) or `make sweep` (pipelines/sweep.py), `bench.json` or `codebook_sizes.json`
from `make bench` (benchmarks/run.py), `pi_study.json` from benchmarks/pi_study.py, and a training or sampling job's
`metrics.json` at the path it has in the run folder (`tokenizer/metrics.json`, `prior/metrics.json`,
`samples/metrics.json`). Beside them, `source.json`: {"command": the command that made the run, "note": anything a
reader must know about it}. The tables print the command under each table, so the docs name how every run was made.

Tables. A document holds a table between two marker lines; everything between them is the generator's:

    <!-- table: sweep -->
    <!-- /table -->

`TABLES` (below) maps each name to the function that renders it; each name is placed in exactly one document, and
every name in `TABLES` must be placed (one fact, one place).

Adding a table, e.g. a K = 16,384 comparison from a sweep's `table.json`:
1. `mkdir -p docs/results/sweep-k16384 && cp runs/sweep-k16384/table.json docs/results/sweep-k16384/`
2. write `docs/results/sweep-k16384/source.json` with the `make sweep ...` command that made the run;
3. add one entry to `TABLES`: `"sweep-k16384": lambda: sweep_table("sweep-k16384", sizes=[16384]),`
   (a `make compare` folder: `lambda: compare_table("compare-k16384")`; a new kind of file gets a function of its
   own beside the others, reading it with `load`);
4. put the two marker lines where the table belongs (README.md or a docs/*.md), run `make tables`, and commit the
   result files, source.json and the document together. tests/test_results_tables.py fails while they disagree.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /table -->$", re.S | re.M)


def load(path: str) -> Any:
    return json.loads((RESULTS / path).read_text())


def made_by(*names: str) -> str:
    """The line under a table that names the command behind each run it reads."""
    lines = []
    for name in names:
        command = load(f"{name}/source.json")["command"]
        lines.append(f"`{command}` (`docs/results/{name}/`)")
    return "Made by " + "; ".join(lines) + "."


def cell(value: Any, spec: str = "", suffix: str = "") -> str:
    if value is None or isinstance(value, bool):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the default run


def default_run_table() -> str:
    tokenizer, prior = load("default/tokenizer/metrics.json"), load("default/prior/metrics.json")
    samples = load("default/samples/metrics.json")
    fid = samples["fid"]
    return table(
        ["tokenizer test perplexity", "usage", "dead codes", "PSNR (dB)", "SSIM", "prior val bits per code (uniform)",
         "generation FID"],
        [[f"{tokenizer['perplexity']:.1f} / {tokenizer['codebook_size']}", percent(tokenizer["usage"]),
          cell(tokenizer["dead_codes"]), cell(tokenizer["psnr"], ".2f"), cell(tokenizer["ssim"], ".3f"),
          f"{prior['val_bits_per_code']:.2f} ({prior['uniform_bits_per_code']:g})",
          f"{fid['fid']:.1f} ({fid['num_samples']:,} samples vs {fid['num_reference_images']:,} test images)"]],
    ) + f"\n\nTokenizer and prior: {tokenizer['steps']:,} and {prior['steps']:,} steps; tokenizer metrics on the " \
        f"{tokenizer['num_images']:,} images of the test split. " + made_by("default")


# ------------------------------------------------------------------------------------------------ comparisons


def compare_table(name: str) -> str:
    """A `make compare` folder's table.json: reconstruction, then the prior and generation columns."""
    rows = load(f"{name}/table.json")["models"]
    return table(
        ["model", "SSIM", "PSNR (dB)", "rFID", "perplexity", "usage", "dead codes", "prior val / test bits per code",
         "generation FID"],
        [[f"`{r['model']}`", cell(r["ssim"], ".3f"), cell(r["psnr"], ".2f"), cell(r["rfid"], ".1f"),
          f"{r['perplexity']:.1f} / {r['codebook_size']}", percent(r["usage"]), cell(r["dead_codes"]),
          f"{cell(r['prior_val_bits_per_code'], '.3f')} / {cell(r['prior_test_bits_per_code'], '.3f')}",
          cell(r["generation_fid"], ".1f")] for r in rows],
    ) + "\n\n" + made_by(name)


def generation_checks_table() -> str:
    """The default comparison's generation gap checked twice: samples drawn with another seed, a 4x longer prior."""
    longer = {r["model"]: r for r in load("compare-prior6000/table.json")["models"]}
    budget = load("compare-prior6000/table.json")["budget"]["generation"]
    rows = []
    for model, r in longer.items():
        reseeded = load(f"fid-noise/{model}-seed1/metrics.json")
        rows.append([f"`{model}`", f"{reseeded['fid']['fid']:.1f}", cell(r["prior_val_bits_per_code"], ".2f"),
                     cell(r["generation_fid"], ".1f")])
    return table(["model", "generation FID, samples drawn with seed 1",
                  f"prior val bits per code, {budget['prior_steps']:,} prior steps",
                  f"generation FID, {budget['prior_steps']:,} prior steps"], rows) + "\n\n" + made_by(
        *(f"fid-noise/{model}-seed1" for model in longer), "compare-prior6000")


def sweep_table(name: str, sizes: list[int] | None = None) -> str:
    """A `make sweep` folder's table.json; `sizes`: only the rows of these requested codebook sizes."""
    result = load(f"{name}/table.json")
    requested = sorted(result["budget"]["sizes"])

    def requested_size(row: dict[str, Any]) -> int:  # FSQ reports its real size, e.g. 15,360 asked as 16,384
        return min((k for k in requested if k >= row["codebook_size"]), default=row["codebook_size"])

    rows = [r for r in result["rows"] if sizes is None or requested_size(r) in sizes]
    return table(
        ["K", "model", "perplexity", "usage", "dead codes", "PSNR (dB)", "SSIM", "rFID", "step time vs vqvae",
         "prior val bits per code", "generation FID"],
        [[f"{r['codebook_size']:,}", r["model"], f"{r['perplexity']:.1f}", percent(r["usage"]), cell(r["dead_codes"]),
          cell(r["psnr"], ".2f"), cell(r["ssim"], ".4f"), cell(r["rfid"], ".2f"), cell(r["step_time_vs_vqvae"], ".2f"),
          cell(r.get("prior_val_bits_per_code"), ".3f"), cell(r.get("generation_fid"), ".2f")] for r in rows],
    ) + "\n\n" + made_by(name)


def whole_test_split_table() -> str:
    """Each large-codebook tokenizer's own metrics.json: the training job scores the whole test split."""
    runs = [("sweep-fashion_mnist", "K8192/vqwae"), ("sweep-fashion_mnist", "K16384/vqwae"),
            ("sweep-fashion_mnist", "K16384/vqvae-ema"), ("k16384-default", "vqwae")]
    rows = []
    for name, model in runs:
        m = load(f"{name}/{model}/tokenizer/metrics.json")
        rows.append([f"`runs/{name}/{model}`", m["quantizer"], f"{m['codebook_size']:,}", f"{m['steps']:,}",
                     percent(m["usage"]), cell(m["dead_codes"], ","), cell(m["perplexity"], ",.0f"),
                     cell(m["psnr"], ".2f"), cell(m["ssim"], ".3f")])
    return table(["run", "quantizer", "K", "steps", "usage", "dead codes", "perplexity", "PSNR (dB)", "SSIM"], rows) + \
        "\n\n" + made_by("sweep-fashion_mnist", "k16384-default/vqwae")


# ------------------------------------------------------------------------------------------------ what pi does


def pi_study_rows() -> list[dict[str, Any]]:
    rows = load("pi-study/pi_study.json")
    # The study copies the default run's test metrics from its metrics.json; both are committed, so they must agree.
    default = load("default/tokenizer/metrics.json")
    for row in rows:
        if row["run"] == "runs/default":
            copied = {key: row[f"test_{key}"] for key in ("perplexity", "usage", "psnr", "ssim")}
            if copied != {key: default[key] for key in copied}:
                raise ValueError(f"pi-study's runs/default row {copied} disagrees with default/tokenizer/metrics.json")
    return rows


def pi_table() -> str:
    rows = pi_study_rows()
    return table(
        ["kl_weight", "pi perplexity per position, mean (min-max)", "max / min pi x K", "test perplexity", "usage",
         "PSNR (dB)", "rFID"],
        [[f"{r['kl_weight']:g}", f"{r['pi_perplexity_mean']:.1f} ({r['pi_perplexity_min']:.1f}-{r['pi_perplexity_max']:.1f})",
          f"{r['pi_max_ratio_to_uniform']:.2f} / {r['pi_min_ratio_to_uniform']:.3f}", f"{r['test_perplexity']:.1f} / 512",
          percent(r["test_usage"]), cell(r["test_psnr"], ".2f"), cell(r["rfid"], ".1f")] for r in rows],
    ) + "\n\n" + made_by("pi-study")


def pi_over_training_table() -> str:
    rows = pi_study_rows()
    steps = [step for step, _ in rows[0]["pi_perplexity_over_training"]]
    return table(["kl_weight", *(f"step {s:,}" for s in steps)],
                 [[f"{r['kl_weight']:g}", *(f"{v:.1f}" for _, v in r["pi_perplexity_over_training"])] for r in rows])


def pi_gradients_table() -> str:
    rows = [r for r in pi_study_rows() if r["gradients_trained"]]
    return table(["kl_weight", "norm of the mean Wasserstein gradient", "norm of the KL gradient", "cosine"],
                 [[f"{r['kl_weight']:g}", cell(r["gradients_trained"]["wasserstein_grad_norm_of_mean"], ".1e"),
                   cell(r["gradients_trained"]["kl_grad_norm"], ".1e"),
                   cell(r["gradients_trained"]["cosine_mean_wasserstein_vs_kl"], ".2f")] for r in rows])


# ------------------------------------------------------------------------------------------------ make bench


def bench_table(name: str = "bench") -> str:
    result = load(f"{name}/bench.json")
    w = result["wasserstein"]
    rows = [[f"Wasserstein term, forward + backward, {w['inputs']}, (M, K, B, D) = {tuple(w['shape_MKBD'])}",
             f"`exact` {w['ours_ms']:.1f} ms, `dense` {w['network_simplex_ms']:.1f} ms, naive `ot.emd2` loop "
             f"{w['naive_ms']:.1f} ms: **{w['speedup']:.1f}x** faster than the naive loop, values equal to "
             f"{w['max_rel_value_difference']:.1e} relative"]]
    for s in result["steps"]:
        simplex = s["ratio_vqwae_network_simplex_vqvae"]
        rows.append([f"training step VQ-WAE / VQ-VAE, batch {s['batch']}, {s['latent_grid']}x{s['latent_grid']} grid, "
                     f"K = {s['K']}, D = {s['D']}, {s['weights']}",
                     f"**{s['ratio_vqwae_vqvae']:.2f}** ({s['vqwae_ms']:.1f} / {s['vqvae_ms']:.1f} ms, {s['repeats']} "
                     "interleaved repeats)" + ("" if simplex is None else f"; {simplex:.2f} with `solver=dense`")])
    return table(["measurement", "result"], rows) + "\n\n" + made_by(name)


def codebook_sizes_table(name: str = "bench-codebook-sizes", trained: bool = False) -> str:
    """benchmarks/run.py's large-codebook section; `trained`: the rows timed from the sweep's trained tokenizers."""
    rows = load(f"{name}/codebook_sizes.json")["codebook_sizes"]
    prefix = "trained_" if trained else ""
    rows = [r for r in rows if f"{prefix}w_term_ms" in r]
    base = next((r for r in rows if r["K"] == 2048), rows[0])
    w = lambda r: r[f"{prefix}w_term_ms"]  # noqa: E731
    header = ["K", "W term ms (fwd + bwd)", f"W / W({base['K']:,})"] + ([] if trained else ["nearest-codeword step ms"])
    header += ["VQ-VAE step ms", "VQ-WAE step ms", "VQ-WAE / VQ-VAE"]
    body = []
    for r in rows:
        body.append([f"{r['K']:,}", f"{w(r):,.1f}", f"{w(r) / w(base):.2f}"]
                    + ([] if trained else [f"{r['nearest_ms']:.1f}"])
                    + [f"{r[prefix + 'vqvae_ms']:,.1f}", f"{r[prefix + 'vqwae_ms']:,.1f}",
                       f"{r[prefix + 'ratio_step_vqwae_vqvae']:.2f}"])
    return table(header, body) + ("\n\n" + made_by(name) if trained else "")


# ------------------------------------------------------------------------------------------------ large codebooks

# The K = 16,384 tokenizers trained 500 steps by the same job, in the order of the table.
LARGE_CODEBOOK_500 = ["vqwae", "vqwae-semidiscrete", "vqvae-ema", "optvq", "wasserstein-vq", "simvq", "fsq"]
# What each run folder's name stands for (the folders of runs made before config.json was kept say no more).
LARGE_CODEBOOK_LABELS = {
    "vqwae": "`vqwae`, the paper's per-position form",
    "vqwae-semidiscrete": "`vqwae`, global semi-discrete form",
    "vqvae-ema": "`vqvae-ema`",
    "wasserstein-vq": "`wasserstein-vq`",
    "optvq": "`optvq`",
    "simvq": "`simvq`, rotation trick",
    "fsq": "`fsq` ([8, 8, 8, 6, 5])",
}


def tokenizer_runs_table(name: str, models: list[str]) -> str:
    """Tokenizers trained by the same job at one codebook size: each one's own metrics.json (the whole test split)."""
    rows = []
    for model in models:
        folder = f"{name}/{model}/tokenizer"
        m = load(f"{folder}/metrics.json")
        rows.append([LARGE_CODEBOOK_LABELS[model], f"{m['codebook_size']:,}", f"{m['steps']:,}", percent(m["usage"]),
                     cell(m["dead_codes"], ","), cell(m["perplexity"], ",.0f"), cell(m["psnr"], ".2f"),
                     cell(m["ssim"], ".3f")])
    return table(["quantizer", "K", "steps", "usage", "dead codes", "perplexity", "PSNR (dB)", "SSIM"], rows) + \
        "\n\n" + made_by(*(f"{name}/{model}" for model in models))


def large_codebook_step_table(name: str = "bench-large-codebook") -> str:
    r = load(f"{name}/large_codebook.json")["large_codebook"]
    models = [key[: -len("_ms")] for key in r if key.endswith("_ms")]
    rows = [[f"`{model}`", f"{r[model + '_ms']:,.0f}", "1.00" if model == "vqvae" else f"{r[f'ratio_{model}_vqvae']:.2f}"]
            for model in models]
    return table(["quantizer", "training step ms", "vs vqvae"], rows) + \
        f"\n\nK = {r['K']:,}, batch {r['batch']}, {r['latent_grid']}x{r['latent_grid']} grid, {r['data']}, " \
        f"random init, the median of {r['repeats']} interleaved repeats. " + made_by(name)


def job_table(name: str = "bench-job") -> str:
    """benchmarks/run.py's whole-training-job row: each job's own seconds per step, interleaved."""
    j = load(f"{name}/job.json")["job"]
    rows = [["`vqvae`", f"{j['vqvae_ms']:.1f}"], ["`vqwae`", f"{j['vqwae_ms']:.1f}"]]
    if "vqwae_baseline_ms" in j:
        rows.append([f"`vqwae` at `{Path(j['baseline']).name}`", f"{j['vqwae_baseline_ms']:.1f}"])
    return table(["training job", "ms per step"], rows) + \
        f"\n\n`pipelines.train_tokenizer` with `{j['config']}`, data.limit={j['data_limit']:,}, {j['steps']} steps, " \
        f"the median of {j['repeats']} interleaved rounds of its own train_seconds per step. " + made_by(name)


TABLES: dict[str, Callable[[], str]] = {
    "default-run": default_run_table,
    "compare-default": lambda: compare_table("compare-fashion_mnist"),
    "generation-checks": generation_checks_table,
    "sweep": lambda: sweep_table("sweep-fashion_mnist"),
    "whole-test-split": whole_test_split_table,
    "pi": pi_table,
    "pi-over-training": pi_over_training_table,
    "pi-gradients": pi_gradients_table,
    "bench": bench_table,
    "codebook-sizes-random-init": codebook_sizes_table,
    "codebook-sizes-trained": lambda: codebook_sizes_table(trained=True),
    "large-codebook-500": lambda: tokenizer_runs_table("k16384-500", LARGE_CODEBOOK_500),
    "large-codebook-default": lambda: tokenizer_runs_table("k16384-default", ["vqwae", "vqwae-semidiscrete"]),
    "large-codebook-step": large_codebook_step_table,
    "job": job_table,
}


# ------------------------------------------------------------------------------------------------ the documents


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render_documents(documents: list[Path] = DOCUMENTS) -> dict[Path, str]:
    """Each document's text with its tables made from the result files (every document, changed or not)."""
    placed: dict[str, Path] = {}
    out = {}
    for path in documents:
        def fill(match: re.Match, path: Path = path) -> str:
            name = match["name"]
            if name not in TABLES:
                raise ValueError(f"{shown(path)}: no table named {name!r} (known: {', '.join(TABLES)})")
            if name in placed:
                raise ValueError(f"table {name!r} is placed twice: {shown(placed[name])} and {shown(path)}")
            placed[name] = path
            return f"<!-- table: {name} -->\n{TABLES[name]()}\n<!-- /table -->"

        out[path] = MARKER.sub(fill, path.read_text())
    missing = [name for name in TABLES if name not in placed]
    if missing:
        raise ValueError(f"tables placed in no document: {', '.join(missing)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table is out of date")
    args = parser.parse_args(argv)
    stale = {path: text for path, text in render_documents().items() if text != path.read_text()}
    if args.check and stale:
        print(f"out of date: {', '.join(map(shown, stale))} (run make tables)", file=sys.stderr)
        return 1
    for path, text in stale.items():
        path.write_text(text)
    print(f"rewrote {', '.join(map(shown, stale))}" if stale else "tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
