import pytest

from configio.config import load_config
from configio.errors import ConfigError
from pipelines.settings import TokenizerJobConfig


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("quantizer:\n  codebook_size: 64\ntrain:\n  batch_size: 8\n")
    cfg = load_config(TokenizerJobConfig, path, ["train.max_steps=12", "quantizer.name=vqvae", "seed=3", "data.limit=100"])
    assert cfg.quantizer.codebook_size == 64 and cfg.quantizer.name == "vqvae"
    assert cfg.train.batch_size == 8 and cfg.train.max_steps == 12 and cfg.seed == 3 and cfg.data.limit == 100
    assert cfg.quantizer.resolved_beta == 0.25


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_step=5", "unknown config key 'train.max_step'"),
        ("quantizer.name=vqgan", "quantizer.name"),
        ("train.batch_size=many", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size must be positive"),
        ("network.downsample=3", "power of two"),
        ("quantizer.codebook_size=1", "codebook_size"),
        ("nonsense", "key=value"),
        ("data=3", "data: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(TokenizerJobConfig, None, [override])
    assert fragment in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TokenizerJobConfig, "configs/nope.yaml")


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10", "svhn", "celeba"])
def test_shipped_configs_load(name):
    cfg = load_config(TokenizerJobConfig, f"configs/{name}.yaml")
    tok = cfg.tokenizer_config()
    assert tok.quantizer.codebook_size == 512 and tok.network.embedding_dim == 64
    assert tok.num_positions == (64 if name != "celeba" else 256)


def test_network_that_does_not_fit_the_data():
    cfg = load_config(TokenizerJobConfig, "configs/celeba.yaml", ["data.image_size=32"])
    with pytest.raises(ConfigError, match="configured for 64x64 images"):
        cfg.tokenizer_config()
    cfg = load_config(TokenizerJobConfig, None, ["data.image_size=30"])
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.tokenizer_config()


def test_jobs_shorten_openmp_spinning_unless_the_user_set_it():
    import os
    import subprocess
    import sys

    show = [sys.executable, "-c", "import os, pipelines.train_tokenizer; print(os.environ['GOMP_SPINCOUNT'])"]
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "10000"
    env["GOMP_SPINCOUNT"] = "500"
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "500"


def test_importing_the_libraries_changes_nothing_in_the_process():
    import os
    import subprocess
    import sys

    check = [sys.executable, "-c", "import os, configio.config, configio.files, stage1_tokenizer.model, stage2_prior, "
             "eval.fid, eval.report, pipelines.training, pipelines.runs; assert 'GOMP_SPINCOUNT' not in os.environ"]
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    subprocess.run(check, env=env, check=True)


def test_incidental_settings_are_declared_on_the_settings_themselves():
    from dataclasses import dataclass, field

    from configio.config import incidental, incidental_settings
    from eval.report import EvalConfig
    from pipelines.settings import TokenizerJobConfig

    @dataclass
    class Section:
        size: int = 1
        workers: int = incidental(0)

    @dataclass
    class Job:
        seed: int = 0
        device: str = incidental("cpu")
        section: Section = field(default_factory=Section)

    assert incidental_settings(Job) == ("device", "section.workers")
    assert incidental_settings(Job, "settings.") == ("settings.device", "settings.section.workers")
    # The jobs' own: how a run is executed, never what it learns or scores.
    assert set(incidental_settings(TokenizerJobConfig)) == {
        "train.resume", "train.cpu", "train.num_workers", "train.log_every", "train.checkpoint_every",
        "train.keep_checkpoints"}
    assert set(incidental_settings(EvalConfig)) == {"device", "batch_size", "fid_batch_size"}
