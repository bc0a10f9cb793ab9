"""One rule for every job's output folder, kept by the job itself (make, compare and `python -m` all get it).

A folder records the settings that define its result in `job_config.yaml` (with the job that wrote it). When a job
starts on a folder:
- no record and nothing in it: a new run;
- the same job and the same settings: the job resumes, or does nothing when its result is complete;
- only `train.max_steps` raised: training continues from the last checkpoint (training jobs; the record takes the
  new value once the continuation has finished);
- anything else changed (a setting the record predates counts as unchanged at its default): the job starts over, and the earlier result is first moved, whole, to
  `<folder>.previous/<time>/` beside it (nothing is deleted), with one line naming the changed settings;
- a record of another job, files that no job recorded, or a folder inside one of the job's inputs: the job stops
  with one line (no job writes into another job's folder).

One writer per folder: a job holds an exclusive `flock` on `<folder>/.lock` for its whole run. The kernel releases
it on any exit, `kill -9` included, so a lock left by a killed run is never stale; a second job on the same folder
stops at once with one line naming the first.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from configio.errors import CheckpointError, ConfigError, FolderBusy
from configio.files import atomic_write_text, remove_orphans, reporting_write_failures

RECORD_NAME = "job_config.yaml"
LOCK_NAME = ".lock"
PREVIOUS_SUFFIX = ".previous"


@dataclass
class Claim:
    """What the rule decided for a folder: `new`, `same`, `continued` or `restarted` (old result in `previous`)."""

    folder: Path
    state: str
    previous: Path | None = None
    changed: list[str] = field(default_factory=list)


def read_record(folder: Path) -> dict[str, Any]:
    """The settings recorded in `folder` ({} when it has none yet)."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise CheckpointError(f"'{path}' is corrupt (not valid YAML); move the folder away or choose another output") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"'{path}' is corrupt (not a mapping); move the folder away or choose another output")
    return values


def canonical(values: dict[str, Any]) -> dict[str, Any]:
    """The record as it reads back from YAML (tuples become lists), so a stored and a fresh record compare equal."""
    return yaml.safe_load(yaml.safe_dump(values, sort_keys=False)) or {}


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): values}


def _section_absent(key: str, keys: set[str]) -> str:
    """The shortest dotted prefix of `key` that no key of `keys` lies under (a whole section one side lacks)."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        prefix = ".".join(parts[:n])
        if not any(k == prefix or k.startswith(prefix + ".") for k in keys):
            return prefix
    return key


def changed_settings(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted names of the settings that differ, `a.b: old -> new`, leaving out `ignore` (prefixes); a whole section
    only one side has is one entry (`a: added` / `a: removed`). A setting the saved record lacks (added by a later
    version) counts as unchanged while it is at its value in `defaults`."""
    old, new = _flatten(canonical(saved)), _flatten(canonical(current))
    default = _flatten(canonical(defaults)) if defaults else {}
    lines, sections = [], set()
    for key in sorted(set(old) | set(new)):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        if key not in old and key in default and new.get(key) == default[key]:
            continue
        if old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        if key not in new or key not in old:
            section = _section_absent(key, set(new) if key not in new else set(old))
            if section != key:
                if section not in sections:
                    sections.add(section)
                    lines.append(f"{section}: {'removed' if key not in new else 'added'}")
                continue
        lines.append(f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return lines


def _check_path(folder: Path, inputs: tuple[Path, ...]) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output folder '{folder}': '{parent}' is a file, not a folder; choose another output")
    here = folder.resolve()
    for source in inputs:
        there = Path(source).resolve()
        if here == there or there in here.parents or here in there.parents:
            raise ConfigError(f"output folder '{folder}' overlaps the input '{source}'; a job never writes into "
                              "another job's folder: choose another output")


def _lock(folder: Path, job: str) -> int:
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another job"
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise FolderBusy(f"'{folder}' is in use by {holder}; wait for it to finish or choose another output") from None
        raise
    try:
        with reporting_write_failures(folder / LOCK_NAME):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{job} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _set_aside(folder: Path, entries: list[Path]) -> Path:
    """Move `entries` of `folder` into a new `<folder>.previous/<time>/` (same file system: renames only)."""
    base = folder.parent / f"{folder.name}{PREVIOUS_SUFFIX}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = base / stamp
    n = 1
    while target.exists():
        n += 1
        target = base / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


def _entries(folder: Path, owned: tuple[str, ...] | None) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME and (owned is None or p.name in owned))


def is_main_process() -> bool:
    """Rank 0 of a launch (torchrun / accelerate set RANK), or a plain process."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextmanager
def claim_folder(folder: Path, job: str, settings: dict[str, Any], *, inputs: tuple[Path, ...] = (),
                 ignore: tuple[str, ...] = (), continuable: tuple[str, ...] = (), owned: tuple[str, ...] | None = None,
                 defaults: dict[str, Any] | None = None, main: bool | None = None) -> Iterator[Claim]:
    """Apply the rule to `folder` for `job` with `settings` and hold its lock while the body runs.

    `ignore`: settings that do not change the result (device, worker count, ...): stored, never compared.
    `defaults`: the settings' defaults, for records written before a setting existed.
    `continuable`: integer settings that may only grow to continue the run (train.max_steps).
    `owned`: the names this job writes in its folder, when it shares the folder with other jobs' subfolders
    (compare); by default everything in the folder is the job's. Processes other than the main one only read.
    """
    folder = Path(folder)
    record = canonical({"job": job, **settings})
    if not (is_main_process() if main is None else main):
        yield Claim(folder, "same")
        return
    _check_path(folder, tuple(inputs))
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder, job)
    try:
        remove_orphans(folder)
        saved = read_record(folder)
        claim = Claim(folder, "new")
        if not saved:
            strangers = [p for p in _entries(folder, owned) if not p.name.startswith(".")]
            if strangers:
                raise ConfigError(f"'{folder}' holds files that no job of this project recorded (e.g. "
                                  f"'{strangers[0].name}'); choose an empty or new output folder")
        elif saved.get("job") != job:
            raise ConfigError(f"'{folder}' holds the output of {saved.get('job') or 'an earlier version'}, not of "
                              f"{job}; a job never writes into another job's folder: choose another output")
        else:
            changed = changed_settings(saved, record, ignore + continuable, defaults)
            grown = [key for key in continuable if _lookup(record, key) != _lookup(saved, key)]
            if not changed and all(_grows(_lookup(saved, k), _lookup(record, k)) for k in grown):
                claim = Claim(folder, "continued" if grown else "same",
                              changed=[f"{k}: {_lookup(saved, k)} -> {_lookup(record, k)}" for k in grown])
            else:
                changed += [f"{k}: {_lookup(saved, k)} -> {_lookup(record, k)}" for k in grown]
                previous = _set_aside(folder, _entries(folder, owned))
                claim = Claim(folder, "restarted", previous, changed)
                shown_changes = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
                print(f"{folder}: settings changed ({shown_changes}); the previous result is kept in {previous}; "
                      "starting over", file=sys.stderr)
        # A continuation is recorded once it has succeeded: a failed one leaves the record as it was.
        if claim.state in ("new", "restarted"):
            atomic_write_text(folder / RECORD_NAME, yaml.safe_dump(record, sort_keys=False))
        yield claim
        if claim.state == "continued":
            atomic_write_text(folder / RECORD_NAME, yaml.safe_dump(record, sort_keys=False))
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _grows(old: Any, new: Any) -> bool:
    return isinstance(old, int) and isinstance(new, int) and new >= old


__all__ = ["LOCK_NAME", "PREVIOUS_SUFFIX", "RECORD_NAME", "Claim", "canonical", "changed_settings", "claim_folder",
           "is_main_process", "read_record"]
