"""What the learned code distributions pi of VQ-WAE do: gradients on their logits, and a sweep of kl_weight.

    python -m benchmarks.pi_study --runs runs/default runs/pi-kl0 runs/pi-kl0.01 runs/pi-kl0.1 --output runs/pi-study

Each run is a run folder whose tokenizer is VQ-WAE with learned pi (`make tokenizer RUN=... ARGS="quantizer.kl_weight=..."`,
evaluated with `make eval RUN=... EVAL_ARGS="num_images=1000 fid=false"` for rFID). For each run, on the first 8
batches of the training split (for the trained model and for the same config at its random initialisation): the
gradients of the weighted Wasserstein term and of the weighted KL term with respect to the pi logits (norms, their
cosine, the share of logits where the Wasserstein term's is the larger), the per-position pi perplexity at the end, pi perplexity over training
(from the TensorBoard log), and the test metrics the run's jobs wrote. Written to pi_study.json and pi_study.md.
"""
from __future__ import annotations

from pipelines.job_environment import apply_job_environment

apply_job_environment()

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from configio.files import atomic_write_json, atomic_write_text
from pipelines.datasets import build_splits
from pipelines.runs import job_seed, read_record, tokenizer_data_config
from stage1_tokenizer.model import Tokenizer
from stage1_tokenizer.quantizers import VQWAEQuantizer
from stage1_tokenizer.quantizers.base import perplexity


def logit_gradients(tokenizer: Tokenizer, batches: list[torch.Tensor]) -> dict[str, float]:
    """Gradients of the two weighted loss terms with respect to the pi logits.

    The Wasserstein term's gradient changes from batch to batch; what moves pi over many steps is its mean, so both
    are reported: the mean over `batches` of the per-batch norms, and the norm of the mean gradient. The KL term's
    gradient depends on pi only.
    """
    quantizer = tokenizer.quantizer
    tokenizer.train()
    per_batch, kl = [], None
    for images in batches:
        out = tokenizer(images)
        (w,) = torch.autograd.grad(out.losses["wasserstein"], quantizer.logits, retain_graph=True)
        (kl,) = torch.autograd.grad(out.losses["kl"], quantizer.logits)
        per_batch.append(w)
    tokenizer.eval()
    mean_w = torch.stack(per_batch).mean(0)
    kl_norm = float(kl.norm())
    return {
        "wasserstein_grad_norm_per_batch": float(torch.stack([g.norm() for g in per_batch]).mean()),
        "wasserstein_grad_norm_of_mean": float(mean_w.norm()),
        "kl_grad_norm": kl_norm,
        "ratio_mean_wasserstein_to_kl": float(mean_w.norm()) / kl_norm if kl_norm > 0 else float("inf"),
        "share_of_logits_where_wasserstein_dominates": float((mean_w.abs() > kl.abs()).float().mean()),
        "cosine_mean_wasserstein_vs_kl": float(torch.nn.functional.cosine_similarity(mean_w.flatten(), kl.flatten(), dim=0)),
    }


def pi_summary(quantizer: VQWAEQuantizer) -> dict[str, float]:
    with torch.no_grad():
        pi = quantizer.code_distributions().double()
    ppl = perplexity(pi, dim=1)
    k = pi.shape[1]
    return {"pi_perplexity_mean": float(ppl.mean()), "pi_perplexity_min": float(ppl.min()),
            "pi_perplexity_max": float(ppl.max()), "pi_max_ratio_to_uniform": float(pi.max() * k),
            "pi_min_ratio_to_uniform": float(pi.min() * k)}


def pi_perplexity_over_training(logs: Path, points: int = 7) -> list[list[float]]:
    """(step, mean pi perplexity) at a few steps, read from the run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logs.rglob("events.out.tfevents*"))
    if not files:
        return []
    events = []
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/pi_perplexity" in acc.Tags().get("scalars", []):
            events += [(e.step, e.value) for e in acc.Scalars("train/pi_perplexity")]
    events = sorted(dict(events).items())
    if not events:
        return []
    picks = sorted({round(i * (len(events) - 1) / (points - 1)) for i in range(points)})
    return [[int(events[i][0]), round(float(events[i][1]), 2)] for i in picks]


def study(run: Path, batch: int) -> dict[str, Any]:
    tokenizer_dir = run / "tokenizer"
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    if not isinstance(tokenizer.quantizer, VQWAEQuantizer) or not tokenizer.quantizer.learn_weights:
        raise SystemExit(f"{run}: not a VQ-WAE tokenizer with learned pi")
    train = build_splits(tokenizer_data_config(tokenizer_dir), seed=job_seed(tokenizer_dir))["train"]
    batches = [torch.stack([train[i][0] for i in range(start, start + batch)]) for start in range(0, 8 * batch, batch)]
    torch.manual_seed(0)
    fresh = Tokenizer(tokenizer.config)
    metrics = json.loads((tokenizer_dir / "metrics.json").read_text())
    report_path = run / "eval" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    rfid = (report.get("tokenizer_eval") or {}).get("rfid") or {}
    q = tokenizer.config.quantizer
    return {
        "run": str(run),
        "kl_weight": q.kl_weight,
        "beta": q.resolved_beta,
        "steps": metrics.get("steps"),
        "gradients_trained": logit_gradients(tokenizer, batches),
        "gradients_at_init": logit_gradients(fresh, batches),
        **pi_summary(tokenizer.quantizer),
        "pi_perplexity_over_training": pi_perplexity_over_training(tokenizer_dir / "logs"),
        "test_perplexity": metrics.get("perplexity"),
        "test_usage": metrics.get("usage"),
        "test_psnr": metrics.get("psnr"),
        "test_ssim": metrics.get("ssim"),
        "rfid": rfid.get("fid"),
        "rfid_images": rfid.get("num_images"),
        "seed": read_record(tokenizer_dir).get("seed"),
    }


def markdown(rows: list[dict[str, Any]], batch: int) -> str:
    lines = [
        "# What pi does",
        "",
        f"Gradients with respect to the pi logits over 8 batches of {batch} training images, for the trained model. "
        "W = beta * sum_m W(pi^m, latents), KL = kl_weight * sum_m KL(pi^m || uniform) / K. |W| per batch is the "
        "mean of the per-batch norms; |mean W| the norm of the mean gradient (what moves pi over many steps); cos the "
        "cosine between the mean W gradient and the KL gradient (-1: they cancel).",
        "",
        "| kl_weight | pi perplexity mean (min-max) | max / min pi x K | abs W per batch / abs mean W / abs KL | cos | "
        "test perplexity | usage | PSNR | rFID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "n/a"
    for r in rows:
        g = r["gradients_trained"]
        lines.append(
            f"| {r['kl_weight']:g} | {r['pi_perplexity_mean']:.1f} ({r['pi_perplexity_min']:.1f}-{r['pi_perplexity_max']:.1f}) | "
            f"{r['pi_max_ratio_to_uniform']:.2f} / {r['pi_min_ratio_to_uniform']:.3f} | "
            f"{g['wasserstein_grad_norm_per_batch']:.2e} / {g['wasserstein_grad_norm_of_mean']:.2e} / {g['kl_grad_norm']:.2e} | "
            f"{g['cosine_mean_wasserstein_vs_kl']:.2f} | {fmt(r['test_perplexity'], '.1f')} | "
            f"{fmt(100 * r['test_usage'] if r['test_usage'] is not None else None, '.1f')}% | {fmt(r['test_psnr'], '.2f')} | "
            f"{fmt(r['rfid'], '.2f')} |"
        )
    lines += ["", "pi perplexity over training (step: mean over positions):", ""]
    lines += [f"- kl_weight {r['kl_weight']:g}: " + ", ".join(f"{s}: {v}" for s, v in r["pi_perplexity_over_training"])
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders with a VQ-WAE tokenizer/")
    parser.add_argument("--output", default="runs/pi-study")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    rows = sorted((study(Path(run), args.batch) for run in args.runs), key=lambda r: r["kl_weight"])
    output = Path(args.output)
    atomic_write_json(output / "pi_study.json", rows)
    atomic_write_text(output / "pi_study.md", markdown(rows, args.batch))
    print(markdown(rows, args.batch))


if __name__ == "__main__":
    main()
