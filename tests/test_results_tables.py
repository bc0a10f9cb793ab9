"""The committed result tables are what scripts/results_tables.py makes from the committed result files."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results_tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_equal_what_the_script_makes(results_tables):
    stale = [str(path.relative_to(ROOT)) for path, text in results_tables.render_documents().items()
             if text != path.read_text()]
    assert not stale, f"tables out of date in {stale}: run make tables"


def test_a_table_placed_twice_is_refused(results_tables, tmp_path):
    # One fact, one place: the same table in two documents is an error, not two copies.
    marked = "<!-- table: pi -->\n<!-- /table -->\n"
    docs = []
    for name in ("a.md", "b.md"):
        (tmp_path / name).write_text(marked)
        docs.append(tmp_path / name)
    with pytest.raises(ValueError, match="placed twice"):
        results_tables.render_documents(docs)
