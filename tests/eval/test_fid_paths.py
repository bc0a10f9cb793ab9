"""One FID path: `make sample`'s scoring, `make eval`'s sample evaluation and `python -m eval.fid` agree.

The same generated images (float tensors, as the tokenizer decodes them, with pixels exactly halfway between two
uint8 levels so the rounding rule matters) and the same reference images go through the three entry points with a
tiny TorchScript stand-in for Inception (real Inception is far too slow here); the FIDs must agree to 1e-6.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid as F
from eval.report import FIDReference, evaluate_samples
from pipelines import sample
from pipelines.datasets import DataConfig, TensorImageDataset

SIZE = 16


class TinyInception(torch.nn.Module):
    """(N, 3, 299, 299) normalised images -> (N, 2048) features: 8x8 average pool, fixed projection, tanh."""

    def __init__(self):
        super().__init__()
        weight = torch.randn(3 * 8 * 8, F.FEATURE_DIM, generator=torch.Generator().manual_seed(0)) / 8
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.weight)


def tiny_extractor(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        torch.jit.script(TinyInception()).save(str(path))
    return str(path)


def generated_images(n: int, channels: int, seed: int) -> torch.Tensor:
    """Float images in [0, 1] whose first row holds every "k + 0.5" level (ties: round-half-even vs half-up differ)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, channels, SIZE, SIZE, generator=g)
    ties = (torch.arange(SIZE * channels).float() * 7 % 255 + 0.5) / 255
    images[:, :, 0, :] = ties.view(channels, SIZE)
    return images


def save_uint8(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"{i:03d}.png")


@pytest.mark.filterwarnings("ignore:.*rank deficient")
@pytest.mark.parametrize("channels", [1, 3])
def test_sample_eval_and_cli_report_the_same_fid(tmp_path, monkeypatch, capsys, channels):
    extractor = tiny_extractor(tmp_path / "tiny.pt")
    generated = generated_images(6, channels, seed=0)
    real = (generated_images(10, channels, seed=1) * 255).round().to(torch.uint8)
    test_split = TensorImageDataset(real, torch.zeros(len(real), dtype=torch.long))

    # The samples as `make sample` writes them, and the reference images as files for the CLI.
    samples_dir = tmp_path / "run" / "samples" / "images"
    samples_dir.mkdir(parents=True)
    for i, image in enumerate(generated):
        (samples_dir / f"{i:06d}.png").write_bytes(sample.png_bytes(image))
    reference_dir = tmp_path / "reference"
    save_uint8(reference_dir, real)

    # Tensor and PNG reach the extractor as the same pixels, hence the same features.
    written = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                           for p in F.list_images(samples_dir)])
    assert torch.equal(written, F.to_uint8(generated).expand(-1, 3, -1, -1))
    ext = F.resolve_feature_extractor(extractor, device="cpu")
    np.testing.assert_array_equal(F.tensor_features(generated, ext, batch_size=4),
                                  F.folder_features(samples_dir, ext, batch_size=4))

    # (1) `make sample`: pipelines/sample.py's score_fid on the tensors, reference = the test split.
    data_cfg = DataConfig(root=str(tmp_path / "data"), image_size=SIZE)
    monkeypatch.setattr(sample, "build_splits", lambda cfg, seed=0: {"test": test_split})
    cfg = sample.SampleConfig(num_samples=len(generated), fid_batch_size=4, extractor=extractor)
    by_sample = sample.score_fid(generated, data_cfg, cfg, seed=0)
    assert by_sample["num_samples"] == 6 and by_sample["num_reference_images"] == 10
    assert not by_sample["reference_cached"]

    # (2) `make eval` / `make compare`: eval.report's sample evaluation on the PNGs, with the statistics just cached
    # by the sample job and with freshly computed ones.
    def evaluate(cache_dir: Path) -> dict:
        reference = FIDReference(test_split, data_cfg.name, SIZE, cache_dir, "clean", extractor, "cpu", 4)
        return evaluate_samples(samples_dir, reference)

    by_eval_cached = evaluate(Path(data_cfg.root) / "fid_stats")
    by_eval_fresh = evaluate(tmp_path / "fresh_stats")
    assert by_eval_cached["reference_cached"] and not by_eval_fresh["reference_cached"]
    assert by_eval_fresh["num_images"] == 6 and by_eval_fresh["num_reference_images"] == 10

    # (3) python -m eval.fid DIR_A DIR_B: stdout is pure JSON, progress bars go to stderr.
    capsys.readouterr()
    F.main([str(samples_dir), str(reference_dir), "--extractor", extractor, "--device", "cpu", "--batch-size", "4"])
    captured = capsys.readouterr()
    by_cli = json.loads(captured.out)
    assert by_cli["num_images_a"] == 6 and by_cli["num_images_b"] == 10
    assert "FID features (a: images)" in captured.err and "img" in captured.err
    capsys.readouterr()
    F.main([str(samples_dir), str(reference_dir), "--extractor", extractor, "--no-progress"])
    assert "FID features" not in capsys.readouterr().err

    values = {"sample": by_sample["fid"], "eval (cached reference)": by_eval_cached["fid"],
              "eval (fresh reference)": by_eval_fresh["fid"], "eval.fid CLI": by_cli["fid"]}
    assert values["sample"] > 0
    for name, value in values.items():
        assert value == pytest.approx(values["sample"], rel=1e-6), (name, values)
    methods = {by_sample["frechet_method"], by_eval_fresh["frechet_method"], by_cli["frechet_method"]}
    assert methods == {F.METHOD_LOWRANK}
