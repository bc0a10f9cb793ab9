"""Files that survive a crash: atomic writes, and pickle-free training state (safetensors + JSON).

Every write goes to a hidden temporary (`.<name>.*.tmp`) beside its destination and is renamed into place, so a
reader sees the old file or the complete new one, never a part. Finished files get the user's normal permissions
(umask), not the 0600 of a temporary file. A temporary left by a killed process is removed by `remove_orphans`, which
each job calls when it starts.

A write that fails (no space, a file-size limit, a read-only or vanished folder) raises `WriteFailed` naming the file
the user expects, not the temporary, with the OS's reason; safetensors' own error is mapped to the same.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, WriteFailed


def _fsync_file(path: Path | str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_umask_lock = threading.Lock()
TEMPORARY_SUFFIX = ".tmp"


def _user_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (read without changing it for long)."""
    with _umask_lock:
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def publish_mode(path: Path) -> None:
    """Give a finished file or folder the user's normal permissions (temporaries are created 0600/0700)."""
    path = Path(path)
    os.chmod(path, _user_mode(directory=path.is_dir()))


def remove_orphans(directory: Path) -> list[Path]:
    """Delete the hidden temporaries (`.*.tmp`, files or folders) a killed writer left directly in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.glob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# safetensors (Rust) gives the OS's error number only in its message: "I/O error: File too large (os error 27)".
_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def _failed_path(filename: Any, destination: Path, staging: Path | None) -> Path | None:
    """The path to name for a failed write: the OS's own, moved from a staging folder or a temporary to where the
    user expects the file. None when the OS names another file: one the block reads, whose error is not this write's."""
    if not filename:
        return destination
    failed = Path(os.fsdecode(filename))
    if staging is not None and (failed == staging or staging in failed.parents):
        return destination / failed.relative_to(staging)
    if failed == destination or _is_temporary(failed):
        return destination
    return failed if failed in destination.parents else None


@contextmanager
def reporting_write_failures(destination: Path, staging: Path | None = None) -> Iterator[None]:
    """Turn the OS's failures to write inside the block into one `WriteFailed` naming `destination` (or the file
    inside it that failed, when the block fills `staging` to become `destination`); other errors pass unchanged."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as err:
        path = _failed_path(err.filename, Path(destination), staging)
        if err.errno is None or path is None:
            raise
        raise WriteFailed(err.errno, err.strerror or os.strerror(err.errno), str(path)) from None
    except SafetensorError as err:
        found = _SAFETENSORS_OS_ERROR.search(str(err))
        if found is None:
            raise
        number = int(found[1])
        raise WriteFailed(number, os.strerror(number), str(destination)) from None


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Make a stalled download fail instead of hanging: urllib, torchvision's and clean-fid's downloads inherit
    the default socket timeout."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` fills a hidden temporary beside `path`, which is then renamed over it: the one way this
    project writes a file, so a reader sees the old file or the whole new one, never part of it."""
    path = Path(path)
    with reporting_write_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.close(fd)
        try:
            write(tmp)
            _fsync_file(tmp)  # a full disk may show only here, when the data reaches it
            publish_mode(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the folder may be gone: the original error is the one to report
                Path(tmp).unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                                  metadata=metadata))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file '{path}' is corrupt or not a safetensors file ({err})") from None


def replace_files_from(source: Path, destination: Path, last: tuple[str, ...] = ()) -> None:
    """Move every file of `source` into `destination` (each rename atomic), the names in `last` after the others.

    For exports whose weights file is a make target: the config lands first, the weights last, so a complete
    weights file never sits beside a missing or stale config.
    """
    source, destination = Path(source), Path(destination)
    with reporting_write_failures(destination, staging=source):
        destination.mkdir(parents=True, exist_ok=True)
        files = sorted((p for p in source.iterdir() if p.is_file()),
                       key=lambda p: (p.name in last, last.index(p.name) if p.name in last else 0))
        for path in files:
            _fsync_file(path)
            publish_mode(path)
        for path in files:
            os.replace(path, destination / path.name)
    _fsync_dir(destination)


def write_directory_atomically(final: Path, fill) -> None:
    """Call `fill(tmp_dir)` then rename tmp_dir to `final`, so readers see a complete folder or none."""
    final = Path(final)
    with reporting_write_failures(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=TEMPORARY_SUFFIX))
    old = final.with_name(f".{final.name}.old{TEMPORARY_SUFFIX}")
    with reporting_write_failures(final, staging=tmp):
        try:
            fill(tmp)
            for child in tmp.iterdir():
                if child.is_file():
                    _fsync_file(child)
                    publish_mode(child)
            publish_mode(tmp)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():  # the complete earlier folder goes back rather than being lost
                with contextlib.suppress(OSError):
                    os.replace(old, final)
            raise
    _fsync_dir(final.parent)


# --- pickle-free state: nested dicts/lists of tensors and plain values -> (tensors, JSON skeleton) ---

def flatten_state(obj: Any, prefix: str = "state") -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().cpu().clone()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(node)]
        if hasattr(node, "dtype") and hasattr(node, "shape") and hasattr(node, "tolist"):  # numpy arrays
            tensors[key] = torch.from_numpy(node.copy())
            return {"__ndarray__": key}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {key} without pickle")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__ndarray__" in node:
                return tensors[node["__ndarray__"]].numpy()
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
            if "__dict__" in node:
                return {walk(k): walk(v) for k, v in node["__dict__"]}
            raise CheckpointError(f"unexpected entry {sorted(node)} in a stored state")
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    try:
        return walk(skeleton)
    except KeyError as err:
        raise CheckpointError(f"stored state refers to tensor {err} that its safetensors file lacks") from None


def save_state(obj: Any, directory: Path, name: str) -> None:
    """Write `obj` as `<name>.safetensors` + `<name>.json` inside `directory`."""
    tensors, skeleton = flatten_state(obj)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / f"{name}.safetensors"))
    (Path(directory) / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str) -> Any:
    json_path = Path(directory) / f"{name}.json"
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint '{directory}' lacks {name}.json; it is incomplete or not a checkpoint")
    try:
        skeleton = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint file '{json_path}' is corrupt (not valid JSON)") from None
    return unflatten_state(skeleton, load_safetensors(Path(directory) / f"{name}.safetensors"))
