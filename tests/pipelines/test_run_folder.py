"""The run-folder rule (pipelines/run_folder.py): what a job does with a folder that already holds something, and the
one-writer lock."""
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from configio.errors import ConfigError, FolderBusy
from pipelines.run_folder import changed_settings, claim_folder, read_record

HOLD = """
import sys, time
from pipelines.run_folder import claim_folder
with claim_folder(sys.argv[1], "holder_job", {"x": 1}):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_new_same_continued_restarted(tmp_path):
    out = tmp_path / "run"
    with claim_folder(out, "job", {"a": 1, "train": {"max_steps": 5, "resume": None}}) as claim:
        assert claim.state == "new"
        (out / "result.txt").write_text("first")
    same = {"a": 1, "train": {"max_steps": 5, "resume": "latest"}}
    with claim_folder(out, "job", same, ignore=("train.resume",), continuable=("train.max_steps",)) as claim:
        assert claim.state == "same"
    longer = {"a": 1, "train": {"max_steps": 9, "resume": None}}
    with claim_folder(out, "job", longer, ignore=("train.resume",), continuable=("train.max_steps",)) as claim:
        assert claim.state == "continued" and read_record(out)["train"]["max_steps"] == 5
    assert read_record(out)["train"]["max_steps"] == 9
    with claim_folder(out, "job", {**longer, "a": 2}, continuable=("train.max_steps",)) as claim:
        assert claim.state == "restarted" and claim.changed == ["a: 1 -> 2"]
        assert (claim.previous / "result.txt").read_text() == "first" and not (out / "result.txt").exists()
        assert read_record(claim.previous)["a"] == 1 and read_record(out)["a"] == 2
    shorter = {"a": 2, "train": {"max_steps": 3, "resume": None}}
    with claim_folder(out, "job", shorter, continuable=("train.max_steps",)) as claim:
        assert claim.state == "restarted" and claim.changed == ["train.max_steps: 9 -> 3"]
    assert len(list((tmp_path / "run.previous").iterdir())) == 2


def test_another_jobs_folder_strangers_and_overlapping_inputs_are_refused(tmp_path):
    with claim_folder(tmp_path / "prior", "train_prior", {"a": 1}):
        pass
    with pytest.raises(ConfigError, match="output of train_prior, not of sample"):
        with claim_folder(tmp_path / "prior", "sample", {"a": 1}):
            pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(ConfigError, match="no job of this project recorded"):
        with claim_folder(tmp_path / "mine", "sample", {}):
            pass
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep"
    for output in (tmp_path / "prior", tmp_path / "prior" / "samples", tmp_path):
        with pytest.raises(ConfigError, match="overlaps the input"):
            with claim_folder(output, "sample", {}, inputs=(tmp_path / "prior",)):
                pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        with claim_folder(tmp_path / "file" / "below", "sample", {}):
            pass


def test_owned_names_are_the_only_ones_set_aside(tmp_path):
    with claim_folder(tmp_path / "cmp", "compare", {"m": 1}, owned=("table.json",)):
        (tmp_path / "cmp" / "table.json").write_text("{}")
        (tmp_path / "cmp" / "vqvae").mkdir()
    with claim_folder(tmp_path / "cmp", "compare", {"m": 2}, owned=("table.json",)) as claim:
        assert claim.state == "restarted" and (claim.previous / "table.json").is_file()
        assert (tmp_path / "cmp" / "vqvae").is_dir()


def test_changed_settings_are_named():
    assert changed_settings({"train": {"lr": 0.001, "cpu": False}}, {"train": {"lr": 3e-4, "cpu": True}},
                            ignore=("train.cpu",)) == ["train.lr: 0.001 -> 0.0003"]
    assert changed_settings({"a": [1, 2]}, {"a": (1, 2), "b": 1}) == ["b: <unset> -> 1"]
    # a whole section one side lacks is one entry, not one per setting in it (a sweep that drops a model)
    saved = {"tokenizers": {"16/sqvae": {"lr": 1, "net": {"width": 8}}, "16/vqvae": {"lr": 1}}}
    current = {"tokenizers": {"16/vqvae": {"lr": 2}}, "extra": {"a": 1, "b": 2}}
    assert changed_settings(saved, current) == ["extra: added", "tokenizers.16/sqvae: removed",
                                                "tokenizers.16/vqvae.lr: 1 -> 2"]


def test_one_writer_per_folder_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy, match=rf"in use by holder_job \(pid {holder.pid}"):
            with claim_folder(out, "holder_job", {"x": 1}):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.perf_counter()
    with claim_folder(out, "holder_job", {"x": 1}) as claim:
        assert claim.state == "same"
    assert time.perf_counter() - started < 5


def test_a_setting_the_record_predates_counts_as_unchanged_at_its_default(tmp_path):
    with claim_folder(tmp_path / "run", "job", {"a": 1}):
        pass
    with claim_folder(tmp_path / "run", "job", {"a": 1, "new": False}, defaults={"a": 0, "new": False}) as claim:
        assert claim.state == "same"
    with claim_folder(tmp_path / "run", "job", {"a": 1, "new": True}, defaults={"a": 0, "new": False}) as claim:
        assert claim.state == "restarted" and claim.changed == ["new: <unset> -> True"]
