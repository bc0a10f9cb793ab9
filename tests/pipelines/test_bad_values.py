"""Every bad value a user can type ends in one line (`error: ...`, exit 2), never a traceback, before
any output is written. The jobs' main() run in-process under the same run_cli the command line uses."""
from functools import partial

import pytest
from helpers import in_process_error, write_code_set

from configio.cli import run_cli
from pipelines import sample, train_prior, train_tokenizer

one_line_error = partial(in_process_error, alone=True)  # before any work: the error is all a job prints


TOKENIZER_CASES = [
    ("seed=-1", "seed must lie in"),
    ("train.num_workers=-1", "train.num_workers"),
    ("train.lr=.nan", "finite"),
    ("train.lr=.inf", "finite"),
    ("quantizer.beta=.nan", "finite"),
    ("quantizer.kl_weight=-.inf", "finite"),
    ("train.eval_images=0", "train.eval_images"),
    ("train.eval_images=-5", "train.eval_images"),
    ("data.val_size=0", "validation split is empty"),
]


@pytest.mark.parametrize("override, fragment", TOKENIZER_CASES)
def test_tokenizer_job(tmp_path, capsys, data_root, override, fragment):
    one_line_error(train_tokenizer.main, ["--output", tmp_path / "out", f"data.root={data_root}", "data.limit=64",
                                          override], capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file(tmp_path, capsys, data_root):
    (tmp_path / "file").write_text("keep me")
    one_line_error(train_tokenizer.main, ["--output", tmp_path / "file", f"data.root={data_root}", "data.limit=64"],
                   capsys, "is a file")
    codes = write_code_set(tmp_path / "codes")
    one_line_error(train_prior.main, ["--codes", codes, "--output", tmp_path / "file"], capsys, "is a file")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("override, fragment", [
    ("seed=-1", "seed must lie in"), ("train.lr=.nan", "finite"), ("prior.dropout=.nan", "finite"),
    ("train.eval_images=0", "train.eval_images"),
])
def test_prior_job(tmp_path, capsys, override, fragment):
    codes = write_code_set(tmp_path / "codes")
    one_line_error(train_prior.main, ["--codes", codes, "--output", tmp_path / "out", override], capsys, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, fragment", [
    ("temperature=.nan", "finite"), ("temperature=.inf", "finite"), ("guidance_scale=.inf", "finite"),
    ("top_p=.nan", "finite"), ("device=foo", "device='foo'"), ("seed=-1", "seed must lie in"),
    ("fid_reference_images=1", "fid_reference_images"), ("label=-1", "label"),
])
def test_sample_job(tmp_path, capsys, override, fragment):
    # Settings are checked before the models are read: these folders need not exist.
    one_line_error(sample.main, ["--tokenizer", tmp_path / "tok", "--prior", tmp_path / "prior", "--output",
                                 tmp_path / "samples", override], capsys, fragment)
    assert not (tmp_path / "samples").exists()


# --- numbers as people write them, and values no setting can hold ---

def test_numbers_parse_the_way_people_write_them():
    from configio.config import load_config
    from pipelines.settings import TokenizerJobConfig

    cfg = load_config(TokenizerJobConfig, None, ["train.lr=3e-4", "quantizer.beta=1E-3", "train.max_steps=1_000",
                                                 "train.eval_every=1e3"])
    assert (cfg.train.lr, cfg.quantizer.beta, cfg.train.max_steps, cfg.train.eval_every) == (3e-4, 1e-3, 1000, 1000)


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps=1e300", "too large"),
    ("train.max_steps=123456789012345678901234567890", "too large"),
    ("seed=99999999999999999999999", "too large"),
    ("train.lr=abc", "expected a number"),
    ("data.image_size=65536", "does not fit in memory"),
    ("network.hidden_channels=1000000000", "does not fit in memory"),
    ("quantizer.codebook_size=1000000000000", "does not fit in memory"),
])
def test_values_that_cannot_fit_are_one_line(tmp_path, capsys, data_root, override, fragment):
    one_line_error(train_tokenizer.main, ["--output", tmp_path / "out", f"data.root={data_root}", "data.limit=64",
                                          override], capsys, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, fragment", [
    ("prior.hidden_size=1000000000", "does not fit in memory"), ("prior.num_layers=1000000000", "does not fit in memory"),
    ("prior.codebook_size=7", "the codes decide it"), ("prior.num_classes=2", "the codes decide it"),
    ("prior.sequence_length=5", "the codes decide it"),
])
def test_prior_sizes_and_data_decided_settings(tmp_path, capsys, override, fragment):
    codes = write_code_set(tmp_path / "codes")
    one_line_error(train_prior.main, ["--codes", codes, "--output", tmp_path / "out", override], capsys, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", "not UTF-8"),
    (b"- a\n- b\n", "mapping"),
    (b"train: [1, 2]\n", "expected a mapping"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     b"f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
     b"train: {lr: *g}\n", "unknown config key"),
    (b"train:\n  lr: *g_bomb\n", "not valid YAML"),
])
def test_config_files_that_are_not_settings(tmp_path, capsys, content, fragment):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    one_line_error(train_tokenizer.main, ["--config", path, "--output", tmp_path / "out"], capsys, fragment)


# Nine levels of nine aliases: 9**9 leaves if anything expanded it. Anchors are defined inside the value itself.
ALIAS_BOMB = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "]"


@pytest.mark.parametrize("key, fragment", [("train: {lr: %s}", "train.lr"), ("quantizer: {fsq_levels: %s}", "fsq_levels"),
                                           ("data: {name: %s}", "data.name"), ("train: %s", "train")])
def test_a_yaml_alias_bomb_is_refused_without_being_expanded(tmp_path, capsys, key, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(key % ALIAS_BOMB + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_tokenizer.main(["--config", str(path), "--output", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and fragment in err and len(err) < 800, err[:800]
    assert "Traceback" not in err


def test_paths_that_cannot_be_folders(tmp_path, capsys, data_root):
    (tmp_path / "file").write_text("keep me")
    one_line_error(train_tokenizer.main, ["--output", tmp_path / "file" / "below", f"data.root={data_root}",
                                          "data.limit=64"], capsys, "is a file")
    one_line_error(train_tokenizer.main, ["--output", tmp_path / ("x" * 300), f"data.root={data_root}", "data.limit=64",
                                          "train.max_steps=1"], capsys, "File name too long")
    one_line_error(train_tokenizer.main, ["--output", tmp_path / "out", f"data.root={tmp_path / 'file' / 'data'}",
                                          "data.limit=64"], capsys, "file")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("main", [train_tokenizer.main, train_prior.main, sample.main])
def test_argument_errors_are_one_line(capsys, main):
    one_line_error(main, ["--no-such-flag"], capsys, "see --help")


@pytest.mark.parametrize("damage, fragment", [
    ("grid", "do not fit the 5x5 grid"), ("metadata", "non-numeric"), ("labels", "labels outside"),
    ("fewer_labels", "labels for"),
])
def test_corrupt_code_files(tmp_path, capsys, damage, fragment):
    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    codes = write_code_set(tmp_path / "codes")
    path = codes / "train.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    if damage == "grid":
        metadata["grid"] = "[5, 5]"
    elif damage == "metadata":
        metadata["codebook_size"] = "many"
    elif damage == "labels":
        tensors["labels"][0] = 99
    else:
        tensors["labels"] = tensors["labels"][:-3]
    save_file(tensors, str(path), metadata=metadata)
    one_line_error(train_prior.main, ["--codes", codes, "--output", tmp_path / "out"], capsys, fragment)
    assert not (tmp_path / "out").exists()
    del torch
