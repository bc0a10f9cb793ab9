"""A local web page over a trained run: generate, reconstruct and complete images, and the model's numbers.

    python -m pipelines.demo --run runs/default [--host 127.0.0.1] [--port 7860]      (make demo)

Tabs: Generate (the prior's samples with every sampling control; the same settings and seed give the images
`make sample` writes), Reconstruct (an uploaded or test image, its code grid and PSNR/SSIM), Complete (keep the top
rows of an image's codes, the prior draws the rest), Model (the run's metrics, codebook usage overall and per
position, the comparison table when there is one).

Offline and private by default: it binds to 127.0.0.1, makes no share link, turns Gradio's analytics off and uses
system fonts only, so the page loads nothing from outside the machine. Requests are queued and served one at a time
(CPU sampling takes the cores), up to QUEUE_SIZE waiting; past that a request is told the queue is full; a bad upload
or setting is a message in the page, never a dead server.
"""
from __future__ import annotations

import os

from pipelines.job_environment import apply_job_environment

apply_job_environment()  # before torch loads
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import argparse
import hashlib
import io
import json
import math
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from configio.cli import JobArgumentParser, run_cli
from configio.config import from_dict
from configio.devices import pick_device
from configio.errors import ConfigError, UserError
from eval.fid import to_uint8
from eval.image_metrics import psnr_per_image, ssim_per_image
from stage1_tokenizer.model import CONFIG_NAME, WEIGHTS_NAME, Tokenizer
from stage2_prior.model import CodePrior

from .datasets import build_splits, resize_uint8
from .generation import SampleConfig, check_pair, draw, sample_labels
from .runs import job_seed, load_codes, tokenizer_data_config

# Uploads: a header larger than this many pixels is refused before it is decoded (decompression bombs).
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOAD_BYTES = 32 * 2**20
MAX_IMAGES = 64
QUEUE_SIZE = 256  # requests waiting for their turn (one is served at a time); more are told the queue is full
ALL_CLASSES = "all classes in turn"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


class DemoInputError(UserError):
    """A bad upload or control value: shown in the page as a message."""


@dataclass
class DemoRun:
    """The models and data of one run folder, loaded once."""

    run: Path
    device: torch.device

    @classmethod
    def open(cls, run: Path, device: str | None = None) -> "DemoRun":
        run = Path(run)
        for part in ("tokenizer", "prior"):
            if not (run / part / WEIGHTS_NAME).is_file() or not (run / part / CONFIG_NAME).is_file():
                raise ConfigError(f"'{run}' holds no finished {part} ({run / part / WEIGHTS_NAME} is missing); run "
                                  f"'make sample RUN={run}' first")
        demo = cls(run, pick_device(device))
        demo.tokenizer, demo.prior  # load both now: a broken run fails here, not in the first request
        return demo

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_pretrained(self.run / "tokenizer", map_location=self.device)

    @cached_property
    def prior(self) -> CodePrior:
        prior = CodePrior.from_pretrained(self.run / "prior", map_location=self.device)
        check_pair(self.tokenizer, self.run / "tokenizer", prior, self.run / "prior")
        return prior

    @cached_property
    def data_cfg(self):
        return tokenizer_data_config(self.run / "tokenizer", [])

    @cached_property
    def test_set(self):
        return build_splits(self.data_cfg, seed=job_seed(self.run / "tokenizer"))["test"]

    @property
    def class_names(self) -> list[str]:
        count = self.prior.config.num_classes if self.prior.config.class_conditional else 0
        names = FASHION_MNIST_CLASSES if self.data_cfg.name == "fashion_mnist" else []
        return [f"{i}: {names[i]}" if i < len(names) else str(i) for i in range(count)]

    def label_of(self, choice: str | None) -> int | None:
        if not self.prior.config.class_conditional or choice in (None, "", ALL_CLASSES):
            return None
        for i, name in enumerate(self.class_names):
            if choice == name or str(choice) == str(i):
                return i
        raise DemoInputError(f"class {choice!r} is not one of this prior's classes")


# ---------------------------------------------------------------------------------------------- inputs

def sample_settings(num_images: Any, temperature: Any, top_k: Any, top_p: Any, guidance_scale: Any, seed: Any,
                    label: int | None) -> SampleConfig:
    """The page's controls as the settings `make sample` takes, checked the same way."""
    try:
        num = int(num_images)
        if not 1 <= num <= MAX_IMAGES:
            raise DemoInputError(f"number of images must lie in 1..{MAX_IMAGES}, got {num}")
        return from_dict(SampleConfig, {"num_samples": num, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                                        "guidance_scale": guidance_scale, "seed": seed, "label": label, "fid": False})
    except (TypeError, ValueError, OverflowError) as err:
        if isinstance(err, UserError):
            raise
        raise DemoInputError(f"a sampling control is not a number ({err})") from None


def read_upload(path: Any, channels: int, size: int) -> torch.Tensor:
    """An uploaded image file as a (1, channels, size, size) float tensor, or DemoInputError saying what is wrong."""
    if path is None or path == "":
        raise DemoInputError("no image: upload one or pick a test image")
    path = Path(getattr(path, "name", path) if not isinstance(path, (str, os.PathLike)) else path)
    try:
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise DemoInputError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB; upload a smaller image")
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_UPLOAD_PIXELS or width < 1 or height < 1:
                raise DemoInputError(f"the image is {width}x{height} pixels; images above "
                                     f"{int(math.sqrt(MAX_UPLOAD_PIXELS))}x{int(math.sqrt(MAX_UPLOAD_PIXELS))} are refused")
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
    except DemoInputError:
        raise
    except Image.DecompressionBombError:
        raise DemoInputError(f"'{path.name}' claims a canvas far above {int(math.sqrt(MAX_UPLOAD_PIXELS))}x"
                             f"{int(math.sqrt(MAX_UPLOAD_PIXELS))} pixels (a decompression bomb?); refused") from None
    except UnidentifiedImageError:
        raise DemoInputError(f"'{path.name}' is not an image this page can read (PNG, JPEG, WebP, BMP, ...)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DemoInputError(f"'{path.name}' could not be read: damaged, truncated or missing "
                             f"({' '.join(str(err).split())[:120]})") from None
    array = torch.from_numpy(np.asarray(converted).copy())
    array = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
    side = min(array.shape[1:])
    top, left = (array.shape[1] - side) // 2, (array.shape[2] - side) // 2
    square = array[:, top : top + side, left : left + side][None]
    return resize_uint8(square, size).float().div(255)


def test_image(demo: DemoRun, index: Any) -> tuple[torch.Tensor, int]:
    try:
        i = int(index)
    except (TypeError, ValueError, OverflowError):
        raise DemoInputError(f"test image index must be an integer, got {index!r}") from None
    if not 0 <= i < len(demo.test_set):
        raise DemoInputError(f"test image index must lie in 0..{len(demo.test_set) - 1}, got {i}")
    image, label = demo.test_set[i]
    return image[None], int(label)


def chosen_image(demo: DemoRun, upload: Any, index: Any) -> tuple[torch.Tensor, int | None]:
    """The uploaded image when there is one, else the test image `index` (with its label)."""
    cfg = demo.tokenizer.config
    if upload not in (None, ""):
        return read_upload(upload, cfg.channels, cfg.image_size), None
    return test_image(demo, index)


# ---------------------------------------------------------------------------------------------- pictures

def to_picture(images: torch.Tensor, nrow: int = 8, scale: int = 4) -> np.ndarray:
    """(N, C, S, S) in [0, 1] -> one uint8 grid (H, W, 3), each image scaled up `scale` times (nearest)."""
    from torchvision.utils import make_grid

    pixels = to_uint8(images)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    grid = make_grid(pixels, nrow=min(nrow, len(pixels)), padding=2, pad_value=255)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return grid.permute(1, 2, 0).numpy()


def code_picture(codes: torch.Tensor, codebook_size: int, cell: int = 24) -> np.ndarray:
    """A (side, side) code grid as colours (one hue per code index), each cell `cell` pixels wide."""
    from matplotlib import colormaps

    colours = colormaps["turbo"](codes.double().numpy() / max(1, codebook_size - 1))[..., :3]
    picture = (colours * 255).round().astype(np.uint8)
    return picture.repeat(cell, 0).repeat(cell, 1)


# ---------------------------------------------------------------------------------------------- the tabs

def generate(demo: DemoRun, class_choice: str | None, num_images: Any, temperature: Any, top_k: Any, top_p: Any,
             guidance_scale: Any, seed: Any) -> tuple[np.ndarray, str]:
    cfg = sample_settings(num_images, temperature, top_k, top_p, guidance_scale, seed, demo.label_of(class_choice))
    started = time.perf_counter()
    drawn = draw(demo.tokenizer, demo.prior, cfg, sample_labels(demo.prior, cfg), demo.device, progress=False)
    seconds = time.perf_counter() - started
    return to_picture(drawn.images), (f"{cfg.num_samples} images in {seconds:.2f} s (sampling {drawn.sampling_seconds:.2f} s, "
                                      f"decoding {drawn.decode_seconds:.2f} s) on {demo.device}; the same as `make sample "
                                      f"NUM_SAMPLES={cfg.num_samples} SAMPLE_ARGS=\"{_sample_args(cfg)}\"`")


def _sample_args(cfg: SampleConfig) -> str:
    parts = [f"seed={cfg.seed}", f"temperature={cfg.temperature:g}", f"top_k={cfg.top_k}", f"top_p={cfg.top_p:g}",
             f"guidance_scale={cfg.guidance_scale:g}"]
    return " ".join(parts + ([f"label={cfg.label}"] if cfg.label is not None else []))


@torch.no_grad()
def reconstruct(demo: DemoRun, upload: Any, index: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]], str]:
    image, label = chosen_image(demo, upload, index)
    recon, codes = demo.tokenizer.reconstruct(image.to(demo.device))
    recon = recon.float().clamp(0, 1).cpu()
    grid = codes.view(-1, demo.tokenizer.config.latent_size, demo.tokenizer.config.latent_size)[0].cpu()
    psnr = float(psnr_per_image(recon, image)[0])
    ssim = float(ssim_per_image(recon, image)[0])
    source = "uploaded image" if label is None else f"test image {int(index)} (class {label})"
    text = (f"{source}: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}; {grid.numel()} codes ({grid.shape[0]}x{grid.shape[1]}), "
            f"{len(torch.unique(grid))} distinct of {demo.tokenizer.codebook_size}")
    return (to_picture(image, scale=8), to_picture(recon, scale=8),
            code_picture(grid, demo.tokenizer.codebook_size), grid.tolist(), text)


@torch.no_grad()
def complete(demo: DemoRun, upload: Any, index: Any, rows_kept: Any, num_images: Any, class_choice: str | None,
             temperature: Any, top_k: Any, top_p: Any, guidance_scale: Any, seed: Any) -> tuple[np.ndarray, str]:
    image, label = chosen_image(demo, upload, index)
    side = demo.tokenizer.config.latent_size
    try:
        rows = int(rows_kept)
    except (TypeError, ValueError, OverflowError):
        raise DemoInputError(f"rows of codes to keep must be an integer, got {rows_kept!r}") from None
    if not 0 <= rows <= side:
        raise DemoInputError(f"rows of codes to keep must lie in 0..{side}, got {rows}")
    if class_choice in (None, "", ALL_CLASSES) and label is not None and demo.prior.config.class_conditional:
        chosen = label  # a test image completes as its own class unless a class is picked
    else:
        chosen = demo.label_of(class_choice)
    cfg = sample_settings(num_images, temperature, top_k, top_p, guidance_scale, seed, chosen)
    codes = demo.tokenizer.encode(image.to(demo.device)).flatten(1).cpu()
    prefix = codes[:, : rows * side].expand(cfg.num_samples, -1)
    started = time.perf_counter()
    drawn = draw(demo.tokenizer, demo.prior, cfg, sample_labels(demo.prior, cfg), demo.device,
                 prefix=prefix if rows else None, progress=False)
    original = demo.tokenizer.decode(codes.view(1, side, side).to(demo.device)).float().clamp(0, 1).cpu()
    pictures = torch.cat([image, original, drawn.images])
    text = (f"left to right: the image, its reconstruction, then {cfg.num_samples} completions keeping the top {rows} of "
            f"{side} rows of codes ({rows * side} of {side * side} codes); {time.perf_counter() - started:.2f} s")
    return to_picture(pictures, nrow=len(pictures) if len(pictures) <= 10 else 8), text


def model_summary(demo: DemoRun) -> str:
    run = demo.run
    lines = [f"### Run `{run}`", ""]
    tok = _read_json(run / "tokenizer" / "metrics.json")
    if tok:
        lines.append(f"- **Tokenizer** ({tok.get('quantizer')}, K = {tok.get('codebook_size')}, test split): perplexity "
                     f"{tok.get('perplexity', float('nan')):.1f}, usage {100 * tok.get('usage', float('nan')):.1f}%, "
                     f"dead codes {tok.get('dead_codes')}, PSNR {tok.get('psnr', float('nan')):.2f} dB, SSIM "
                     f"{tok.get('ssim', float('nan')):.4f}")
    prior = _read_json(run / "prior" / "metrics.json")
    if prior:
        lines.append(f"- **Prior**: {prior.get('val_bits_per_code', float('nan')):.3f} bits per code on the validation "
                     f"codes, {prior.get('test_bits_per_code', float('nan')):.3f} on the test codes (a uniform guess: "
                     f"{prior.get('uniform_bits_per_code', float('nan')):.1f})")
    samples = _read_json(run / "samples" / "metrics.json")
    fid = (samples or {}).get("fid") or {}
    if fid:
        lines.append(f"- **Samples**: FID {fid['fid']:.2f} ({fid['num_samples']} samples vs {fid['num_reference_images']} "
                     "test images)")
    elif samples is None:
        lines.append("- **Samples**: none yet (`make sample`)")
    table = run / "table.md"
    lines += ["", table.read_text() if table.is_file() else
              "No comparison table in this run folder (`make compare` writes one to `runs/compare-<config>/`; open "
              "that folder with `make demo RUN=runs/compare-<config>/<model>` to see one model, or point `--run` at a "
              "folder holding `table.md`)."]
    return "\n".join(lines)


def usage_pictures(demo: DemoRun) -> tuple[str | None, np.ndarray | None]:
    """The run's codebook usage histogram, and codes used per latent position over the test codes."""
    histogram = demo.run / "tokenizer" / "codebook_usage.png"
    per_position = None
    test_codes = demo.run / "codes" / "test.safetensors"
    if test_codes.is_file():
        codes = load_codes(test_codes)
        h, w = codes.grid
        used = torch.tensor([len(torch.unique(codes.codes[:, p])) for p in range(h * w)]).view(h, w)
        per_position = heatmap(used, f"codes used at each position, of {codes.codebook_size} ({len(codes.codes):,} test images)")
    return (str(histogram) if histogram.is_file() else None), per_position


def heatmap(values: torch.Tensor, title: str) -> np.ndarray:
    """A (h, w) grid of counts as a labelled heat map (each cell's count printed), rendered to an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.2, 4.4), dpi=100)
    image = axes.imshow(values.numpy(), cmap="viridis")
    if values.numel() <= 256:
        middle = (float(values.min()) + float(values.max())) / 2
        for (row, col), value in np.ndenumerate(values.numpy()):
            axes.text(col, row, str(value), ha="center", va="center", fontsize=7,
                      color="black" if value > middle else "white")
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("latent column")
    axes.set_ylabel("latent row")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.canvas.draw()
    array = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return array


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- the page

class PictureFiles:
    """The page's pictures as PNG files named by their content, each written whole (a temporary name, then a rename)
    and never rewritten. Why: Gradio saves a returned array into its cache in place, at a path named by the content,
    so a second request with the same picture rewrites the file while an earlier user may still be downloading it
    (who then receives an empty picture). A file path it copies atomically instead. The folder goes with this
    object, which the page's callbacks hold."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="vqwae-demo-")
        self.folder = Path(self._folder.name)

    def path_of(self, picture: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self.folder / f"{hashlib.sha256(data).hexdigest()}.png"
        if not path.exists():
            staging = tempfile.NamedTemporaryFile(dir=self.folder, suffix=".partial", delete=False)
            try:
                with staging:
                    staging.write(data)
                os.replace(staging.name, path)
            except BaseException:
                Path(staging.name).unlink(missing_ok=True)
                raise
        return str(path)

    def files_for(self, outputs: Any) -> Any:
        """A tab's outputs with every picture (a uint8 array) replaced by its file."""
        if isinstance(outputs, tuple):
            return tuple(self.files_for(output) for output in outputs)
        if isinstance(outputs, np.ndarray) and outputs.dtype == np.uint8 and outputs.ndim in (2, 3):
            return self.path_of(outputs)
        return outputs


def _shown(handler, pictures: PictureFiles | None = None):
    """A tab's function as the page calls it: a bad input becomes a message in the page (gr.Error); pictures are
    handed over as files when `pictures` is given."""
    import gradio as gr

    def call(*args):
        try:
            outputs = handler(*args)
        except UserError as err:
            raise gr.Error(" ".join(str(err).split())) from None
        except MemoryError:
            raise gr.Error("out of memory for this request; ask for fewer images") from None
        try:
            return pictures.files_for(outputs) if pictures is not None else outputs
        except OSError as err:  # a full disk under the temporary folder: a message, and the server goes on
            raise gr.Error(f"cannot write the picture for the page ({err.strerror or err}); free space under "
                           f"{tempfile.gettempdir()}") from None

    call.__name__ = handler.__name__
    return call


def build_app(demo: DemoRun):
    import gradio as gr

    side = demo.tokenizer.config.latent_size
    classes = [ALL_CLASSES, *demo.class_names] if demo.prior.config.class_conditional else []
    try:
        test_count = len(demo.test_set)
    except UserError:  # the data set is not on this machine (a Space): uploads still work
        test_count = 0

    pictures = PictureFiles()

    def sampling_controls():
        with gr.Row():
            temperature = gr.Number(1.0, label="temperature", minimum=0)
            top_k = gr.Number(0, label="top-k (0: off)", precision=0, minimum=0)
            top_p = gr.Number(1.0, label="top-p (1: off)", minimum=0, maximum=1)
            guidance = gr.Number(1.0, label="guidance scale (1: off)", minimum=0)
            seed = gr.Number(0, label="seed", precision=0, minimum=0)
        return temperature, top_k, top_p, guidance, seed

    with gr.Blocks(title="VQ-WAE demo", analytics_enabled=False) as app:
        gr.Markdown(f"# VQ-WAE: `{demo.run}`\nTokenizer K = {demo.tokenizer.codebook_size}, {side}x{side} codes per "
                    f"{demo.tokenizer.config.image_size}px image; device {demo.device}.")
        with gr.Tab("Generate"):
            with gr.Row():
                gen_class = gr.Dropdown(classes, value=classes[0] if classes else None, label="class",
                                        visible=bool(classes))
                gen_count = gr.Slider(1, MAX_IMAGES, value=16, step=1, label="number of images")
            gen_controls = sampling_controls()
            gen_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            gen_grid = gr.Image(label="samples", type="filepath", elem_id="generate-output", format="png")
            gen_info = gr.Markdown()
            gen_button.click(_shown(lambda *a: generate(demo, *a), pictures), [gen_class, gen_count, *gen_controls],
                             [gen_grid, gen_info], api_name="generate")
        with gr.Tab("Reconstruct"):
            with gr.Row():
                rec_upload = gr.File(label="upload an image (or leave empty to use a test image)", type="filepath")
                rec_index = gr.Number(0, label=f"test image (0..{test_count - 1})" if test_count else
                                      "test image (none on this machine: upload one)", precision=0)
            rec_button = gr.Button("Reconstruct", variant="primary")
            with gr.Row():
                rec_original = gr.Image(label="original", type="filepath", format="png")
                rec_recon = gr.Image(label="reconstruction", type="filepath", format="png")
                rec_codes = gr.Image(label="code grid (one colour per code index)", type="filepath", format="png")
            rec_table = gr.Dataframe(label="code indices", interactive=False)
            rec_info = gr.Markdown()
            rec_button.click(_shown(lambda *a: reconstruct(demo, *a), pictures), [rec_upload, rec_index],
                             [rec_original, rec_recon, rec_codes, rec_table, rec_info], api_name="reconstruct")
        with gr.Tab("Complete"):
            with gr.Row():
                com_upload = gr.File(label="upload an image (or leave empty to use a test image)", type="filepath")
                com_index = gr.Number(0, label=f"test image (0..{test_count - 1})" if test_count else
                                      "test image (none on this machine: upload one)", precision=0)
                com_rows = gr.Slider(0, side, value=side // 2, step=1, label="rows of codes to keep")
            with gr.Row():
                com_class = gr.Dropdown(classes, value=classes[0] if classes else None,
                                        label="class (all classes: a test image's own)", visible=bool(classes))
                com_count = gr.Slider(1, 16, value=6, step=1, label="completions")
            com_controls = sampling_controls()
            com_button = gr.Button("Complete", variant="primary")
            com_grid = gr.Image(label="completions", type="filepath", format="png")
            com_info = gr.Markdown()
            com_button.click(_shown(lambda *a: complete(demo, *a), pictures),
                             [com_upload, com_index, com_rows, com_count, com_class, *com_controls],
                             [com_grid, com_info], api_name="complete")
        with gr.Tab("Model"):
            histogram, per_position = usage_pictures(demo)
            summary = gr.Markdown(model_summary(demo))
            with gr.Row():
                gr.Image(histogram, label="codebook usage (sorted code histogram, test split)", type="filepath",
                         height=460)
                gr.Image(per_position, label="codes used at each latent position (test codes)", type="numpy",
                         format="png", height=460)
            refresh = gr.Button("Reload metrics")
            refresh.click(_shown(lambda: model_summary(demo)), [], [summary], api_name="model")
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return app


def local_theme():
    """Gradio's default look with the system's own fonts: the default theme would fetch fonts from Google."""
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def launch(app, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, theme=local_theme(),
                      prevent_thread_lock=not block, quiet=not block, show_error=False)


def main(argv: list[str] | None = None) -> None:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="a run folder made by `make sample`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's 7860, or the next free one)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: an accelerator when present)")
    args = parser.parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must lie in 1..65535, got {args.port}")
    demo = DemoRun.open(Path(args.run), args.device)
    print(f"demo of {args.run}: open the address below (Ctrl-C stops it)", flush=True)
    try:
        launch(build_app(demo), args.host, args.port)
    except OSError as err:
        raise ConfigError(f"cannot serve on {args.host}:{args.port or 7860} ({' '.join(str(err).split())[:200]}); pass "
                          "another --port (DEMO_ARGS=\"--port 8000\")") from None


if __name__ == "__main__":
    run_cli(main)
