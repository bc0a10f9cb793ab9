"""A write that fails (no space, a file-size limit, a read-only or vanished folder) through any of configio's
writers is one `WriteFailed` naming the file the user expects and the OS's reason; the earlier complete file stays,
no temporary is left, and a job ends on it with one `error:` line and exit status 2."""
import errno
import os
import resource
import subprocess
import sys
import threading

import pytest
import torch
from helpers import ROOT, fail_writes
from safetensors.torch import load_file
from test_files_and_hub import Tiny, TinyConfig

from configio.cli import run_cli
from configio.errors import WriteFailed
from configio.files import atomic_save_safetensors, atomic_write_json, write_directory_atomically


def write_json(folder, version):
    atomic_write_json(folder / "metrics.json", {"version": version})
    return folder / "metrics.json"


def write_safetensors(folder, version):
    atomic_save_safetensors({"codes": torch.full((4,), version)}, folder / "codes.safetensors")
    return folder / "codes.safetensors"


def write_folder(folder, version):
    write_directory_atomically(folder / "images", lambda tmp: (tmp / "0.png").write_bytes(bytes([version])))
    return folder / "images"


def write_export(folder, version):
    Tiny(TinyConfig(width=version)).save_pretrained(folder / "model")
    return folder / "model"


def read_back(path):
    if path.name == "metrics.json":
        return path.read_text()
    if path.suffix == ".safetensors":
        return load_file(path)["codes"].tolist()
    if path.name == "images":
        return sorted((p.name, p.read_bytes()) for p in path.iterdir())
    return Tiny.from_pretrained(path).config.width


# writer, the fragment of its temporary's path the failure is injected at, the path the error names
WRITERS = {
    "json file": (write_json, ".metrics.json.", "metrics.json"),
    "safetensors file": (write_safetensors, ".codes.safetensors.", "codes.safetensors"),
    "folder": (write_folder, ".images.", "images"),
    "exported model": (write_export, ".export.", "model"),
}


def temporaries(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EFBIG, errno.EROFS])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temporary(tmp_path, monkeypatch, kind, number):
    writer, fragment, named = WRITERS[kind]
    before = read_back(writer(tmp_path, 3))
    fail_writes(monkeypatch, fragment, number)
    with pytest.raises(WriteFailed) as failed:
        writer(tmp_path, 5)
    assert (failed.value.errno, failed.value.strerror, failed.value.filename) == (number, os.strerror(number),
                                                                                  str(tmp_path / named))
    monkeypatch.undo()
    assert read_back(tmp_path / named) == before
    assert not temporaries(tmp_path)


def test_a_folder_that_vanishes_while_written_is_named(tmp_path):
    def fill(tmp):
        for path in sorted(tmp_path.rglob("*"), reverse=True):  # the whole output goes, as with rm -r
            path.rmdir() if path.is_dir() else path.unlink()
        (tmp / "0.png").write_bytes(b"png")

    with pytest.raises(WriteFailed) as failed:
        write_directory_atomically(tmp_path / "samples" / "images", fill)
    assert failed.value.errno == errno.ENOENT
    assert failed.value.filename == str(tmp_path / "samples" / "images" / "0.png")


@pytest.mark.parametrize("number, remedy", [
    (errno.ENOSPC, "free space on that disk or choose another output"),
    (errno.EFBIG, "the file-size limit (ulimit -f) is below what it needs: raise the limit or choose another output"),
    (errno.EROFS, "choose an output on a writable file system"),
    (errno.ENOENT, "a folder on its way is missing (removed while the job ran?): run the same command again"),
])
def test_a_job_ends_on_a_failed_write_with_one_line(capsys, number, remedy):
    def main():
        raise WriteFailed(number, os.strerror(number), "runs/x/model.safetensors")

    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write 'runs/x/model.safetensors': {os.strerror(number)}; "
                                       f"{remedy}\n")


def test_a_background_threads_failed_write_leaves_the_one_line_to_the_job(capsys):
    """TensorBoard writes its event files from a thread whose error the job meets at its next call."""
    no_space = (errno.ENOSPC, os.strerror(errno.ENOSPC))

    def main():
        def write_events():
            raise OSError(*no_space)

        writer = threading.Thread(target=write_events)
        writer.start()
        writer.join()
        raise WriteFailed(*no_space, "runs/x/logs")

    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("error: cannot write 'runs/x/logs': No space left on device; free space on that "
                                       "disk or choose another output\n")


WRITE_UNDER_A_LIMIT = """
import sys, torch
from configio.cli import run_cli
from configio.files import atomic_save_safetensors, atomic_write_bytes
kind, path = sys.argv[1:]
if kind == "safetensors":  # written by safetensors' Rust code
    run_cli(lambda: atomic_save_safetensors({"w": torch.zeros(1 << 16)}, path))
else:  # written by Python's own file objects
    run_cli(lambda: atomic_write_bytes(path, bytes(1 << 18)))
"""


@pytest.mark.parametrize("kind", ["safetensors", "bytes"])
def test_a_real_file_size_limit_is_one_line(tmp_path, kind):
    """`ulimit -f` as the issue tried it: the process would die of SIGXFSZ unless the job ignores it."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"complete earlier result")
    limit = 1 << 16  # 64 KiB: below the 256 KiB each writer writes

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_LIMIT, kind, str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (f"error: cannot write '{path}': File too large; the file-size limit (ulimit -f) is below "
                           "what it needs: raise the limit or choose another output\n")
    assert path.read_bytes() == b"complete earlier result"
    assert not temporaries(tmp_path)


def test_an_error_reading_another_file_inside_a_write_is_not_called_a_failed_write(tmp_path):
    """A writer that reads its source (decompressing a data set) reports the source's own errors as they are."""
    from configio.files import atomic_write

    def copy_missing_source(tmp):
        with open(tmp_path / "missing.gz", "rb") as source:
            source.read()

    with pytest.raises(FileNotFoundError) as failed:
        atomic_write(tmp_path / "decompressed", copy_missing_source)
    assert not isinstance(failed.value, WriteFailed) and failed.value.filename == str(tmp_path / "missing.gz")
    assert not temporaries(tmp_path) and not (tmp_path / "decompressed").exists()
