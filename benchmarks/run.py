"""`make bench`: VQ-WAE's costs measured side by side in one process, written to bench.json and bench.md.

    python -m benchmarks.run --output runs/bench [--quick]

Every comparison interleaves its variants (A, B, A, B, ...) so that load from other jobs hits both alike, and reports
medians and ratios of medians. Sections: the Wasserstein term (our exact solvers vs a naive per-position ot.emd2
loop), a full training step VQ-WAE vs VQ-VAE at the reference and a larger setting, how the
term grows with K, B and positions, prior sampling with/without the KV cache, and FID feature extraction.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # the jobs' OpenMP setting, before torch loads

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from stage1_tokenizer.transport import _pairwise_sqdist, get_num_threads, wasserstein_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"  # the default run's settings, for the training-job row
TRAINED = Path("runs/default/tokenizer/best")
# Tokenizers trained at each codebook size by `make sweep` (pipelines/sweep.py): K<size>/<model>/tokenizer.
SWEEP = Path("runs/sweep-fashion_mnist")


def _timeit(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant, the variants run in turn `repeats` times after `warmup` rounds."""
    times = {k: [] for k in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            dt = _timeit(fn)
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "solver_threads": get_num_threads(),
        "torch": torch.__version__,
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
        "device": "cpu",
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------------ inputs


def fashion_images(n: int, size: int = 32):
    from pipelines.datasets import DataConfig, build_splits

    try:
        split = build_splits(DataConfig(limit=max(n, 64), image_size=size), seed=0)["train"]
        return torch.stack([split[i % len(split)][0] for i in range(n)]), "fashion_mnist"
    except Exception:  # noqa: BLE001 - no data here: synthetic images keep the timing comparable
        return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)), "uniform noise"


def trained_tokenizer():
    from stage1_tokenizer.model import Tokenizer

    if (TRAINED / "model.safetensors").is_file():
        try:
            return Tokenizer.from_pretrained(TRAINED)
        except Exception:  # noqa: BLE001
            return None
    return None


def reference_latents():
    """(latents (64, 32, 64), codebook, weights, source): a trained tokenizer's when one exists, else Gaussian."""
    tok = trained_tokenizer()
    if tok is not None and tok.config.image_size == 32 and tok.config.quantizer.name == "vqwae":
        images, data = fashion_images(32)
        with torch.no_grad():
            z = tok.encoder(images).float()
            b, d, h, w = z.shape
            lat = z.permute(2, 3, 0, 1).reshape(h * w, b, d)
            return lat, tok.quantizer.codebook.detach().float(), tok.quantizer.code_distributions().detach(), f"trained tokenizer ({TRAINED}) on {data}"
    g = torch.Generator().manual_seed(0)
    return (torch.randn(64, 32, 64, generator=g), 0.7 * torch.randn(512, 64, generator=g),
            torch.softmax(torch.randn(64, 512, generator=g), 1), "Gaussian (no trained tokenizer found)")


# ------------------------------------------------------------------------------------------------ sections


def bench_wasserstein(repeats: int) -> dict:
    import ot

    lat, cb, w, source = reference_latents()

    def ours(solver="exact"):
        z, c, p = (t.clone().requires_grad_() for t in (lat, cb, w))
        loss = wasserstein_loss(z, c, p, solver=solver)
        loss.backward()
        return float(loss.detach())

    def network_simplex():
        return ours("dense")

    def naive():  # the reference code's loop: one ot.emd2 per position, autograd through POT's torch backend
        z, c, p = (t.clone().requires_grad_() for t in (lat, cb, w))
        cost = _pairwise_sqdist(c, z)
        b = torch.full((z.shape[1],), 1.0 / z.shape[1])
        loss = sum(ot.emd2(p[m] / p[m].sum(), b, cost[m]) for m in range(z.shape[0]))
        loss.backward()
        return float(loss.detach())

    t = interleaved({"ours": ours, "network_simplex": network_simplex, "naive_emd2_loop": naive}, repeats)
    v_ours, v_simplex, v_naive = ours(), network_simplex(), naive()
    out = {
        "inputs": source, "shape_MKBD": [lat.shape[0], cb.shape[0], lat.shape[1], lat.shape[2]],
        "ours_ms": 1e3 * t["ours"], "network_simplex_ms": 1e3 * t["network_simplex"],
        "naive_ms": 1e3 * t["naive_emd2_loop"],
        "speedup": t["naive_emd2_loop"] / t["ours"], "network_simplex_speedup": t["naive_emd2_loop"] / t["network_simplex"],
        "value": v_ours, "max_rel_value_difference": abs(v_ours - v_naive) / abs(v_naive),
        "network_simplex_max_rel_value_difference": abs(v_simplex - v_naive) / abs(v_naive), "repeats": repeats,
    }
    return out


def _tokenizer(name: str, image_size: int, codebook_size: int = 512, **qkw):
    from stage1_tokenizer.model import Tokenizer, TokenizerConfig
    from stage1_tokenizer.networks import NetworkConfig
    from stage1_tokenizer.quantizers import QuantizerConfig

    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(image_size, 1, NetworkConfig(), QuantizerConfig(name=name, codebook_size=codebook_size, **qkw)))


def bench_step(batch: int, image_size: int, repeats: int, use_trained: bool) -> dict:
    images, data = fashion_images(batch, image_size)
    models = {
        "vqvae": _tokenizer("vqvae", image_size),
        "vqwae": _tokenizer("vqwae", image_size),
        "vqwae_network_simplex": _tokenizer("vqwae", image_size, solver="dense"),
    }
    weights = "random init"
    trained = trained_tokenizer() if use_trained else None
    if trained is not None and trained.config.image_size == image_size:
        state = trained.state_dict()
        for m in models.values():
            m.load_state_dict(state, strict=False)
        weights = f"trained ({TRAINED})"
    t = _timed_steps(models, images, repeats)
    return {
        "batch": batch, "image_size": image_size, "latent_grid": image_size // 4, "K": 512, "D": 64, "data": data,
        "weights": weights, "repeats": repeats,
        **{f"{k}_ms": 1e3 * v for k, v in t.items()},
        "ratio_vqwae_vqvae": t["vqwae"] / t["vqvae"],
        "ratio_vqwae_network_simplex_vqvae": t["vqwae_network_simplex"] / t["vqvae"],
    }


def bench_scaling(repeats: int) -> list[dict]:
    base = {"M": 64, "K": 512, "B": 32}
    grid = [("K", [128, 256, 512, 1024]), ("B", [16, 32, 64, 128]), ("M", [16, 64, 256])]
    rows = []
    for key, values in grid:
        fns = {}
        for v in values:
            shape = dict(base, **{key: v})
            g = torch.Generator().manual_seed(v)
            z = torch.randn(shape["M"], shape["B"], 64, generator=g)
            c = 0.7 * torch.randn(shape["K"], 64, generator=g)
            p = torch.softmax(torch.randn(shape["M"], shape["K"], generator=g), 1)

            for solver in ("exact", "dense"):
                def fn(z=z, c=c, p=p, solver=solver):
                    zz, cc, pp = (t.clone().requires_grad_() for t in (z, c, p))
                    wasserstein_loss(zz, cc, pp, solver=solver).backward()

                fns[v, solver] = fn
        t = interleaved(fns, repeats, warmup=0)
        rows += [{"vary": key, **dict(base, **{key: v}), "ms": 1e3 * t[v, "exact"],
                  "network_simplex_ms": 1e3 * t[v, "dense"]} for v in values]
    return rows


def _sweep_tokenizers(k: int) -> dict | None:
    """VQ-VAE's and VQ-WAE's tokenizers trained at codebook size k by the sweep, when both exist."""
    from stage1_tokenizer.model import Tokenizer

    folders = {name: SWEEP / f"K{k}" / name / "tokenizer" for name in ("vqvae", "vqwae")}
    if not all((f / "model.safetensors").is_file() for f in folders.values()):
        return None
    return {name: Tokenizer.from_pretrained(f) for name, f in folders.items()}


def _timed_steps(models: dict, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """One training step (forward, backward, Adam) of each model, interleaved."""
    optims = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

    def step(name):
        def run():
            out = models[name](images)
            optims[name].zero_grad(set_to_none=True)
            sum(out.losses.values()).backward()
            optims[name].step()
        return run

    return interleaved({name: step(name) for name in models}, repeats)


def bench_codebook_sizes(repeats: int, sizes: list[int]) -> list[dict]:
    """At each K: the W term (M 64, B 32, D 64, Gaussian latents), VQ-VAE's nearest-codeword step on the same latents
    (the floor both methods share: one (B*M, K) distance matrix, its argmin and the two VQ losses, backward), and a
    whole training step of each tokenizer (batch 32, 8x8 grid), side by side: from random init, and, where the sweep
    trained both at this K, from those trained weights (with the W term on the trained VQ-WAE's latents and pi)."""
    import torch.nn.functional as F

    from stage1_tokenizer.quantizers.base import nearest_codewords

    images, data = fashion_images(32, 32)
    rows = []
    for k in sizes:
        g = torch.Generator().manual_seed(k)
        z, c = torch.randn(64, 32, 64, generator=g), 0.7 * torch.randn(k, 64, generator=g)
        p = torch.softmax(torch.randn(64, k, generator=g), 1)

        def w_term(z=z, c=c, p=p):
            zz, cc, pp = (t.clone().requires_grad_() for t in (z, c, p))
            wasserstein_loss(zz, cc, pp).backward()

        def nearest_step(z=z, c=c):
            flat, cc = z.reshape(-1, 64).clone().requires_grad_(), c.clone().requires_grad_()
            chosen = cc[nearest_codewords(flat.detach(), cc.detach())]
            (F.mse_loss(chosen, flat.detach()) + 0.25 * F.mse_loss(flat, chosen.detach())).backward()

        t = interleaved({"w_term": w_term, "nearest": nearest_step}, repeats)
        # The paper's per-position form at every K: the exact term this section times.
        t.update(_timed_steps({"vqvae": _tokenizer("vqvae", 32, k), "vqwae": _tokenizer("vqwae", 32, k, form="per_position")},
                              images, repeats))
        row = {"K": k, "M": 64, "B": 32, "D": 64, "data": data, **{f"{n}_ms": 1e3 * v for n, v in t.items()},
               "ratio_step_vqwae_vqvae": t["vqwae"] / t["vqvae"]}
        trained = _sweep_tokenizers(k)
        if trained is not None:
            with torch.no_grad():
                latents = trained["vqwae"].encoder(images).float()
                latents = latents.permute(2, 3, 0, 1).reshape(-1, latents.shape[0], latents.shape[1])
                codebook = trained["vqwae"].quantizer.codebook.detach().float()
                weights = trained["vqwae"].quantizer.code_distributions().detach()

            def trained_w_term():
                zz, cc, pp = (x.clone().requires_grad_() for x in (latents, codebook, weights))
                wasserstein_loss(zz, cc, pp).backward()

            steps = _timed_steps(trained, images, repeats)
            row.update(trained_from=str(SWEEP / f"K{k}"), trained_vqvae_ms=1e3 * steps["vqvae"],
                       trained_vqwae_ms=1e3 * steps["vqwae"], trained_ratio_step_vqwae_vqvae=steps["vqwae"] / steps["vqvae"],
                       trained_w_term_ms=1e3 * interleaved({"w": trained_w_term}, repeats)["w"])
        rows.append(row)
    return rows


def bench_sampling(repeats: int, num_samples: int) -> dict:
    from stage2_prior.model import CodePrior, PriorConfig
    from stage2_prior.sampling import sample_codes

    torch.manual_seed(0)
    prior = CodePrior(PriorConfig(class_conditional=False, codebook_size=512, sequence_length=64))
    fns = {c: (lambda c=c: sample_codes(prior, num_samples, use_cache=c, generator=torch.Generator().manual_seed(0)))
           for c in (True, False)}
    t = interleaved(fns, repeats)
    return {"num_samples": num_samples, "sequence_length": 64, "prior": "gpt2 4x256 (untrained)", "repeats": repeats,
            "cache_samples_per_s": num_samples / t[True], "no_cache_samples_per_s": num_samples / t[False],
            "speedup": t[False] / t[True]}


def bench_fid(repeats: int, n: int) -> dict:
    try:
        from eval.fid import resolve_feature_extractor, tensor_features

        extractor = resolve_feature_extractor(allow_download=False)
    except Exception as exc:  # noqa: BLE001 - offline without the weights: say so in the report
        return {"error": str(exc).splitlines()[0][:300]}
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = interleaved({"fid": lambda: tensor_features(images, extractor, batch_size=50)}, repeats)
    return {"images": n, "input": "32x32 RGB, clean resize to 299", "extractor": repr(extractor),
            "images_per_s": n / t["fid"], "repeats": repeats}


# ------------------------------------------------------------------------------------------------ report


def codebook_sizes_markdown(rows: list[dict]) -> str:
    base = next((row for row in rows if row["K"] == 2048), rows[0])
    lines = ["\n## Large codebooks (M 64, B 32, D 64; steps: batch 32, 8x8 grid, random init)\n",
             f"W term: Gaussian latents, forward + backward; `W / W(K={base['K']})` is the growth the issue bounds (8x "
             "from 2,048 to 16,384 would be linear). Nearest-codeword step: VQ-VAE's quantizer alone on the same "
             "latents.\n",
             f"| K | W term ms | W / W(K={base['K']}) | nearest-codeword step ms | VQ-VAE step ms | VQ-WAE step ms | "
             "**VQ-WAE / VQ-VAE** |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['K']:,} | {row['w_term_ms']:.1f} | {row['w_term_ms'] / base['w_term_ms']:.2f} | "
              f"{row['nearest_ms']:.1f} | {row['vqvae_ms']:.1f} | {row['vqwae_ms']:.1f} | "
              f"**{row['ratio_step_vqwae_vqvae']:.2f}** |" for row in rows]
    trained = [row for row in rows if "trained_vqwae_ms" in row]
    if trained:
        first = next((row for row in trained if row["K"] == 2048), trained[0])
        lines += [f"\nTrained weights (`make sweep`'s tokenizers, {SWEEP}/K<size>/): each method's own trained model, "
                  "the W term on the trained VQ-WAE's latents and learned pi.\n",
                  f"| K | W term ms (trained) | W / W(K={first['K']}) | VQ-VAE step ms | VQ-WAE step ms | "
                  "**VQ-WAE / VQ-VAE** |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['K']:,} | {row['trained_w_term_ms']:.1f} | "
                  f"{row['trained_w_term_ms'] / first['trained_w_term_ms']:.2f} | {row['trained_vqvae_ms']:.1f} | "
                  f"{row['trained_vqwae_ms']:.1f} | **{row['trained_ratio_step_vqwae_vqvae']:.2f}** |" for row in trained]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# VQ-WAE benchmarks\n", f"Machine: {m['processor']}, {m['cpu_count']} CPU cores, torch {m['torch']} "
             f"({m['torch_threads']} threads, solver {m['solver_threads']} threads), {m['platform']}; "
             f"load average at start {m['loadavg_at_start']}. Medians of interleaved repeats.\n"]
    w = r["wasserstein"]
    lines += ["## Wasserstein term (forward + backward)\n", f"Inputs: {w['inputs']}, (M, K, B, D) = {tuple(w['shape_MKBD'])}.\n",
              "| variant | ms | naive loop / variant | value vs naive (relative) |", "|---|---|---|---|",
              f"| ours, `exact` (shortest paths over the latents, threaded) | {w['ours_ms']:.1f} | {w['speedup']:.2f}x | "
              f"{w['max_rel_value_difference']:.1e} |",
              f"| ours, `dense` (POT's network simplex, threaded) | {w['network_simplex_ms']:.1f} | "
              f"{w['network_simplex_speedup']:.2f}x | {w['network_simplex_max_rel_value_difference']:.1e} |",
              f"| naive loop of ot.emd2 per position | {w['naive_ms']:.1f} | 1.00x | 0 |"]
    lines += ["\n## Training step (forward, backward, Adam), same network and data\n",
              "VQ-WAE runs the default `exact` solver; the last column gives the step with POT's network simplex "
              "(`solver=dense`).\n",
              "| setting | weights | VQ-VAE ms | VQ-WAE ms | **VQ-WAE / VQ-VAE** | network simplex ms (ratio) |",
              "|---|---|---|---|---|---|"]
    for s in r["steps"]:
        lines.append(f"| batch {s['batch']}, {s['latent_grid']}x{s['latent_grid']} grid, K=512, D=64 | {s['weights']} | "
                     f"{s['vqvae_ms']:.1f} | {s['vqwae_ms']:.1f} | **{s['ratio_vqwae_vqvae']:.2f}** | "
                     f"{s['vqwae_network_simplex_ms']:.1f} ({s['ratio_vqwae_network_simplex_vqvae']:.2f}) |")
    lines += ["\n## Wasserstein term vs problem size (Gaussian inputs and softmax(randn) weights, forward + backward)\n",
              "`exact` runs the shortest-path solver where B <= 128 and K >= 4B, POT's network simplex elsewhere.\n",
              "| varied | M | K | B | `exact` ms | `dense` ms | dense / exact |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['vary']} | {s['M']} | {s['K']} | {s['B']} | {s['ms']:.1f} | {s['network_simplex_ms']:.1f} | "
              f"{s['network_simplex_ms'] / s['ms']:.2f} |" for s in r["scaling"]]
    lines.append(codebook_sizes_markdown(r["codebook_sizes"]))
    big = r["large_codebook"]
    lines += [f"\n## Training step at K = {big['K']:,}\n", "| quantizer | ms | vs vqvae |", "|---|---|---|"]
    lines += [f"| {name[:-3]} | {big[name]:.1f} | {big[name] / big['vqvae_ms']:.2f} |" for name in big if name.endswith("_ms")]
    j = r["job"]
    lines += ["\n## The training job (pipelines.train_tokenizer, its own seconds per step)\n",
              f"{j['config']}, {j['steps']} steps, data.limit={j['data_limit']}, {j['repeats']} interleaved repeats: "
              f"VQ-VAE {j['vqvae_ms']:.1f} ms, VQ-WAE {j['vqwae_ms']:.1f} ms a step, **{j['ratio_vqwae_vqvae']:.2f}**.\n"]
    s = r["sampling"]
    lines += ["\n## Prior sampling\n", "| KV cache | samples/s |", "|---|---|",
              f"| on | {s['cache_samples_per_s']:.1f} |", f"| off | {s['no_cache_samples_per_s']:.1f} |",
              f"\nCache speed-up: {s['speedup']:.2f}x ({s['num_samples']} samples of {s['sequence_length']} codes, {s['prior']}).\n"]
    f = r["fid"]
    lines += ["## FID feature extraction\n",
              (f"{f['images_per_s']:.1f} images/s ({f['images']} images, {f['input']})." if "images_per_s" in f
               else f"Not measured: {f['error']}")]
    return "\n".join(lines) + "\n"


def bench_job(steps: int, repeats: int, limit: int, data_root: str, baseline: str | None = None,
              warm_up: bool = True) -> dict:
    """The whole training job's seconds per step, VQ-VAE and VQ-WAE interleaved: `pipelines.train_tokenizer` on the
    default config, its own train_seconds (the loop with data loading, logging, validation and checkpoints) over its
    steps. What the step rows above cannot see, the cost around the step, shows here. `baseline`: another checkout
    of this repository (e.g. `git worktree add /tmp/old <commit>`) whose VQ-WAE job runs in the same rounds.
    `warm_up`: a first untimed round, which compiles each checkout's solver cache (off for a smoke test)."""
    import subprocess
    import tempfile

    checkouts = {"vqvae": ROOT, "vqwae": ROOT, **({"vqwae_baseline": Path(baseline).resolve()} if baseline else {})}
    seconds: dict[str, list[float]] = {variant: [] for variant in checkouts}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(-1 if warm_up else 0, repeats):
            for variant, checkout in checkouts.items():
                output = Path(scratch) / f"{variant}-{r}"
                run_steps = 2 if r < 0 else steps
                command = [sys.executable, "-m", "pipelines.train_tokenizer", "--config", str(CONFIG),
                           "--output", str(output), f"quantizer.name={variant.split('_')[0]}", f"data.root={data_root}",
                           f"data.limit={limit}", f"train.max_steps={run_steps}", f"train.eval_every={run_steps}",
                           f"train.checkpoint_every={run_steps}"]
                env = dict(os.environ, PYTHONPATH=str(checkout))
                subprocess.run(command, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
                if r >= 0:
                    metrics = json.loads((output / "metrics.json").read_text())
                    seconds[variant].append(metrics["train_seconds"] / metrics["steps"])
    per_step = {variant: statistics.median(values) for variant, values in seconds.items()}
    result = {"config": str(CONFIG.relative_to(ROOT)), "steps": steps, "data_limit": limit, "repeats": repeats,
              **{f"{variant}_ms": 1e3 * v for variant, v in per_step.items()},
              "ratio_vqwae_vqvae": per_step["vqwae"] / per_step["vqvae"]}
    if baseline:
        result.update(baseline=baseline, ratio_vqwae_vqwae_baseline=per_step["vqwae"] / per_step["vqwae_baseline"])
    return result


LARGE_CODEBOOK_MODELS = {  # name: quantizer settings; VQ-VAE first, the unit of the ratios
    "vqvae": {"name": "vqvae"},
    "vqvae-ema": {"name": "vqvae-ema"},
    "vqwae-per-position": {"name": "vqwae", "form": "per_position"},
    "vqwae-semidiscrete": {"name": "vqwae", "form": "global", "solver": "semidiscrete"},
}


def bench_large_codebook(repeats: int, codebook_size: int) -> dict:
    """A whole training step (batch 32, 8x8 grid, Fashion-MNIST images) at one large K, each quantizer side by side:
    VQ-VAE, the EMA codebook, VQ-WAE's per-position form and its semi-discrete global form."""
    images, data = fashion_images(32, 32)
    models = {name: _tokenizer(settings.pop("name"), 32, codebook_size, **settings)
              for name, settings in ((n, dict(q)) for n, q in LARGE_CODEBOOK_MODELS.items())}
    for model in models.values():
        model.train()
    t = _timed_steps(models, images, repeats)
    return {"K": codebook_size, "batch": 32, "latent_grid": 8, "data": data, "repeats": repeats,
            **{f"{name}_ms": 1e3 * v for name, v in t.items()},
            **{f"ratio_{name}_vqvae": v / t["vqvae"] for name, v in t.items() if name != "vqvae"}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/bench")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller settings (a smoke test)")
    parser.add_argument("--data-root", default="data", help="where the training-job row finds (or unpacks) its data")
    parser.add_argument("--job-baseline", default=None,
                        help="another checkout whose VQ-WAE training job the job row runs in the same rounds")
    parser.add_argument("--only", choices=["codebook_sizes", "large_codebook", "job"], default=None,
                        help="one section only: the codebook sizes' W term and steps, the K = 16,384 quantizers, or "
                             "the training job's seconds per step")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    q = args.quick
    report = {"machine": machine()}
    sections = {"large_codebook": lambda: bench_large_codebook(2 if q else 10, 2048 if q else 16384),
                "job": lambda: bench_job(4 if q else 300, 1 if q else 3, 64 if q else 8192, args.data_root,
                                         args.job_baseline, warm_up=not q)}
    if args.only in sections:
        report[args.only] = sections[args.only]()
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.only}.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report[args.only], indent=2))
        return
    if args.only == "codebook_sizes":
        report["codebook_sizes"] = bench_codebook_sizes(1 if q else 3, [512, 2048] if q else [512, 2048, 8192, 16384])
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "codebook_sizes.json").write_text(json.dumps(report, indent=2))
        text = codebook_sizes_markdown(report["codebook_sizes"])
        (out / "codebook_sizes.md").write_text(text)
        print(text)
        return
    report["wasserstein"] = bench_wasserstein(2 if q else 5)
    report["steps"] = [bench_step(32, 32, 2 if q else 30, True)]
    if not q:
        if report["steps"][0]["weights"] != "random init":  # early training: spread latents, harder problems
            report["steps"].append(bench_step(32, 32, 30, False))
        report["steps"].append(bench_step(32, 64, 6, False))
    report["scaling"] = bench_scaling(1 if q else 2)
    report["codebook_sizes"] = bench_codebook_sizes(1 if q else 3, [512, 2048] if q else [512, 2048, 8192, 16384])
    report["large_codebook"] = sections["large_codebook"]()
    report["job"] = sections["job"]()
    report["sampling"] = bench_sampling(1 if q else 3, 8 if q else 32)
    report["fid"] = bench_fid(1 if q else 2, 16 if q else 32)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
