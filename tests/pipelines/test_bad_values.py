"""Every value a user can type that used to end in a traceback now ends in one line (`error: ...`, exit 2), before
any output is written. The jobs' main() run in-process under the same run_cli the command line uses."""
import pytest
from helpers import write_code_set

from pipelines import sample, train_prior, train_tokenizer
from pipelines.cli import run_cli


def one_line_error(main, argv, capsys, fragment):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "Traceback" not in err


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
