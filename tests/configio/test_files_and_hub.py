"""configio: crash-safe files with the user's permissions, orphan clean-up, and Hugging Face save/load."""
import json
import os
import stat
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from configio.errors import CheckpointError
from configio.files import (
    atomic_save_safetensors,
    atomic_write_json,
    remove_orphans,
    write_directory_atomically,
)
from configio.hub import HubModel


@dataclass
class TinyConfig:
    width: int = 3


class Tiny(nn.Module, HubModel, library_name="vq-wae-tests"):
    what = "tiny model"
    make_hint = "train one first"

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config if isinstance(config, TinyConfig) else TinyConfig(**config)
        self.linear = nn.Linear(2, self.config.width)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_finished_files_get_the_users_permissions(tmp_path, umask_022):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    write_directory_atomically(tmp_path / "folder", lambda d: (d / "f.txt").write_text("x"))
    Tiny(TinyConfig()).save_pretrained(tmp_path / "model")
    for path in ("a.json", "w.safetensors", "folder/f.txt", "model/model.safetensors", "model/config.json"):
        assert mode(tmp_path / path) == 0o644, path
    assert mode(tmp_path / "folder") == 0o755


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": object()})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_orphaned_temporaries_are_removed(tmp_path):
    (tmp_path / ".step_0000010.x1.tmp").mkdir()
    (tmp_path / ".metrics.json.x2.tmp").write_text("half")
    (tmp_path / "keep.txt").write_text("x")
    assert len(remove_orphans(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_hub_round_trip_writes_one_config_and_no_staging(tmp_path):
    model = Tiny(TinyConfig(width=5))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"width": 5}
    loaded = Tiny.from_pretrained(tmp_path / "m")
    assert loaded.config.width == 5 and not loaded.training
    assert torch.equal(loaded.linear.weight, model.linear.weight)


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: None, "no such folder"),
    (lambda d: (d / "config.json").unlink(), "config.json missing"),
    (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "corrupt"),
    (lambda d: (d / "config.json").write_text(json.dumps({"width": 7})), "do not match its config"),
])
def test_local_loading_fails_in_one_line_without_the_network(tmp_path, damage, fragment):
    folder = tmp_path / "m"
    if fragment != "no such folder":
        Tiny(TinyConfig()).save_pretrained(folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=fragment):
        Tiny.from_pretrained(folder)
