"""One model's chain of jobs, run as `make sample` runs it, for the jobs that compare models (compare, sweep).

Each step is its own job in its own process (every model starts from the same fresh interpreter and seed) under the
run-folder rule (pipelines/run_folder.py): a finished step with the same settings does nothing, an interrupted one
resumes, a changed one starts over with the old result set aside. Also here: the row of numbers a comparison reports
for a model.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from configio.cli import Interrupted, JobArgumentParser
from configio.config import load_config, parse_override
from configio.errors import ConfigError
from eval.report import EvalConfig
from stage1_tokenizer.quantizers import compare_models

from .generation import SampleConfig
from .settings import PriorJobConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRIOR_CONFIG = ROOT / "configs" / "prior.yaml"

# Each model differs from the others by the overrides its quantizer registers (stage1_tokenizer/quantizers/registry.py).
MODELS: dict[str, list[str]] = {name: overrides for name, (_, overrides) in compare_models().items()}
DESCRIPTIONS: dict[str, str] = {name: description for name, (description, _) in compare_models().items()}
# Settings a comparison chooses per model: never overridden for all of them.
PER_MODEL_KEYS = {override.split("=", 1)[0] for overrides in MODELS.values() for override in overrides}


# Sections of the overrides that go to other jobs than the tokenizer's training.
SECTIONS = ("eval", "prior", "sample")
# A comparison's own default budget: 1,000 test images per reconstruction metric and rFID, and 1,000 samples
# scored against 2,000 test images, keep the default compare near an hour on 2 CPU cores for VQ-VAE and VQ-WAE.
DEFAULT_EVAL = ["num_images=1000", "fid=false"]
DEFAULT_SAMPLE = ["num_samples=1000", "fid_reference_images=2000"]


def split_overrides(overrides: list[str], options: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, list[str]], list[str]]:
    """(the job's own options by name, per-section overrides, tokenizer training overrides)."""
    found, sections, train_overrides = {}, {s: [] for s in SECTIONS}, []
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in options:
            found[path[0]] = value
        elif path[0] in SECTIONS and len(path) > 1:
            sections[path[0]].append(text.split(".", 1)[1])
        elif ".".join(path) in PER_MODEL_KEYS:
            raise ConfigError(f"override '{text}': a comparison sets the quantizer per model; pick models with "
                              f"models=[{','.join(MODELS)}]")
        else:
            train_overrides.append(text)
    return found, sections, train_overrides


def model_list(value: Any) -> list[str]:
    """models=[a,b] (or a,b) checked against the registry, duplicates dropped."""
    names = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise ConfigError(f"models: {unknown[0] if unknown else 'empty'!r} is not a model here; choose from "
                          f"{', '.join(MODELS)}")
    return list(dict.fromkeys(names))


def true_or_false(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    return value


def comparison_parser(description: str, output_example: str, overrides_help: str) -> JobArgumentParser:
    """The command line of a job that compares models: --config, --prior-config, --output and key=value overrides."""
    parser = JobArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="tokenizer YAML shared by every model, e.g. configs/fashion_mnist.yaml")
    parser.add_argument("--prior-config", default=str(DEFAULT_PRIOR_CONFIG), help="prior YAML shared by every model")
    parser.add_argument("--output", required=True, help=f"e.g. {output_example}")
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser


def section_configs(prior_config: str, sections: dict[str, list[str]], eval_defaults: list[str]
                    ) -> tuple[EvalConfig, PriorJobConfig, SampleConfig]:
    """The evaluation, prior and sampling settings every model gets (defaults first, then the user's overrides, which
    `sections` keeps for the jobs), built and checked before anything runs."""
    sections["eval"] = [*eval_defaults, *sections["eval"]]
    sections["sample"] = [*DEFAULT_SAMPLE, *sections["sample"]]
    return (load_config(EvalConfig, None, sections["eval"]), load_config(PriorJobConfig, prior_config, sections["prior"]),
            load_config(SampleConfig, None, sections["sample"]))


def run_job(module: str, args: list[str], what: str) -> None:
    """One job in its own process; its progress bars and messages go straight to the terminal.

    The job runs in a session of its own, out of reach of the terminal's Ctrl-C, and each SIGINT or SIGTERM this
    process gets is passed on to it exactly once: the first lets a training job finish its step and checkpoint it,
    a second stops it at once. Its own line then says where it stopped.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    interruption = None
    with subprocess.Popen([sys.executable, "-m", module, *args], env=env, start_new_session=True) as proc:
        while proc.returncode is None:
            try:
                proc.wait()
            except Interrupted as err:
                interruption = err
                proc.send_signal(err.signum)
    if interruption is not None:
        reported = proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM)
        raise Interrupted(interruption.signum, None if reported else interruption.message)
    if proc.returncode != 0:
        raise ConfigError(f"{what} failed (exit {proc.returncode}, its message is above); fix it and re-run the same "
                          "command (finished steps are reused)")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class ModelRun:
    """One model's chain under `<output>/<name>/`: each step is its job, which does nothing when its result is current
    (the run-folder rule), resumes when interrupted, and starts over (old result set aside) when an input changed."""

    def __init__(self, name: str, output: Path, config: str | None, prior_config: str, train_overrides: list[str],
                 sections: dict[str, list[str]]):
        self.name, self.root, self.config, self.prior_config = name, output / name, config, prior_config
        self.train_overrides, self.sections = train_overrides, sections
        self.tokenizer, self.codes, self.prior, self.samples = (self.root / d for d in ("tokenizer", "codes", "prior", "samples"))

    def train_tokenizer(self) -> None:
        config = ["--config", str(self.config)] if self.config else []
        run_job("pipelines.train_tokenizer", ["--output", str(self.tokenizer), *config, *self.train_overrides,
                                              *MODELS[self.name]], f"training {self.name}'s tokenizer")

    def evaluate(self) -> dict[str, Any]:
        run_job("pipelines.evaluate", ["--run", str(self.root), *self.sections["eval"]], f"evaluating {self.name}")
        report = read_json(self.root / "eval" / "report.json")
        if report is None:
            raise ConfigError(f"evaluating {self.name} left no readable {self.root / 'eval' / 'report.json'}; re-run "
                              "the same command (finished steps are reused)")
        return report

    def generate(self) -> dict[str, Any]:
        """Codes, prior and samples; returns the prior's and the samples' metrics."""
        run_job("pipelines.extract_codes", ["--tokenizer", str(self.tokenizer), "--output", str(self.codes)],
                f"extracting {self.name}'s codes")
        run_job("pipelines.train_prior", ["--codes", str(self.codes), "--output", str(self.prior), "--config",
                                          str(self.prior_config), *self.sections["prior"]], f"training {self.name}'s prior")
        run_job("pipelines.sample", ["--tokenizer", str(self.tokenizer), "--prior", str(self.prior), "--output",
                                     str(self.samples), *self.sections["sample"]], f"sampling {self.name}")
        return {"prior": read_json(self.prior / "metrics.json"), "samples": read_json(self.samples / "metrics.json")}

    def class_rows(self, per_class: int = 8) -> torch.Tensor | None:
        """Up to `per_class` samples of each class as (classes, n, C, H, W); sample i has class i % classes."""
        metrics = read_json(self.samples / "metrics.json") or {}
        files = sorted((self.samples / "images").glob("*.png"))
        classes = max(1, int(metrics.get("num_classes") or 1))
        per_class = min(per_class, len(files) // classes)
        if per_class < 1:
            return None
        rows = [[files[c + classes * j] for j in range(per_class)] for c in range(classes)]
        load = lambda path: torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1) / 255.0
        return torch.stack([torch.stack([load(p) for p in row]) for row in rows])



def table_row(name: str, report: dict[str, Any], generation: dict[str, Any] | None) -> dict[str, Any]:
    section = report["tokenizer_eval"]
    book, lp, rfid = section["codebook"], section["lpips"], section["rfid"]
    row = {
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
        "prior_val_bits_per_code": None,
        "prior_test_bits_per_code": None,
        "generation_fid": None,
        "sampling_seconds": None,
    }
    if generation:
        row.update(generation_columns(generation))
    return row


def generation_columns(generation: dict[str, Any]) -> dict[str, Any]:
    """A model's prior and samples metrics (``ModelRun.generate``) as table columns."""
    prior, samples = generation["prior"] or {}, generation["samples"] or {}
    fid = samples.get("fid") or {}
    return dict(prior_val_bits_per_code=prior.get("val_bits_per_code"),
                prior_test_bits_per_code=prior.get("test_bits_per_code"),
                prior_train_seconds=prior.get("train_seconds"),
                generation_fid=fid.get("fid"), generation_fid_num_samples=fid.get("num_samples"),
                generation_fid_num_reference_images=fid.get("num_reference_images"),
                sampling_seconds=samples.get("sampling_seconds"))


def generation_text(g: dict[str, Any], label: str) -> str:
    """The sentence a comparison's table says about its generation step (g: the budget's generation settings)."""
    return (f"{label}: the same prior ({g['prior_config']}, {g['prior_steps']} steps, seed {g['prior_seed']}) on each "
            f"model's train codes; {g['num_samples']} samples each, FID against the first {g['fid_reference_images']} "
            "test images; bits per code on the val/test codes.")


def add_step_time_ratios(rows: list[dict[str, Any]]) -> None:
    """Each model's training-loop seconds per step relative to vqvae's in the same comparison (None without vqvae)."""
    per_step = {row["model"]: row["train_seconds"] / row["steps"] if row["train_seconds"] and row["steps"] else None
                for row in rows}
    base = per_step.get("vqvae")
    for row in rows:
        row["seconds_per_step"] = per_step[row["model"]]
        row["step_time_vs_vqvae"] = per_step[row["model"]] / base if base and per_step[row["model"]] else None
