"""The codebook-size sweep (pipelines/sweep.py) end to end on tiny models: its order of work, its table and plot.
Its own file so that it runs beside the compare test under pytest-xdist (--dist loadfile)."""
import json

from helpers import MINI_TOKENIZER_ARGS


def test_sweep_over_codebook_sizes(tmp_path, data_root, capfd):
    from pipelines import sweep

    out = tmp_path / "sweep"
    args = ["--output", str(out), f"data.root={data_root}", *MINI_TOKENIZER_ARGS, "sizes=[16,8]", "models=[vqwae,vqvae]",
            "rivals=1", "eval.num_images=8", "eval.rfid=false", "generation=false"]
    # generation=false: the generation step (codes, prior, samples per model) is the chain the compare test runs
    sweep.main(args)
    printed = capfd.readouterr().out
    # the largest size first, with every model; then the smallest size, with VQ-WAE and its strongest rival
    assert printed.index("K = 16, vqwae") < printed.index("K = 16, vqvae") < printed.index("K = 8, vqwae")
    data = json.loads((out / "table.json").read_text())
    assert [(r["codebook_size"], r["model"]) for r in data["rows"]] == [(8, "vqwae"), (8, "vqvae"), (16, "vqwae"),
                                                                       (16, "vqvae")]
    assert data["budget"]["rivals"] == ["vqvae"]
    for row in data["rows"]:
        assert row["step_time_vs_vqvae"] > 0 and (row["step_time_vs_vqvae"] == 1.0) == (row["model"] == "vqvae")
        assert row["prior_val_bits_per_code"] is None
    table = (out / "table.md").read_text()
    assert "| 16 | vqwae |" in table and "| 8 | vqvae |" in table and "3 tokenizer steps of batch 16" in table
    assert (out / "usage_perplexity_vs_codebook_size.png").stat().st_size > 1000
    assert "codebook_size: 8" in (out / "K8" / "vqvae" / "tokenizer" / "job_config.yaml").read_text()
