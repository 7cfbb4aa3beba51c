"""Notebooks are committed clean: no outputs, no execution counts, no volatile metadata."""
from __future__ import annotations

import json

import pytest

from eaglebook import runner

NOTEBOOKS = runner.notebook_paths()
ALLOWED_NB_METADATA = {"kernelspec"}  # papermill needs the kernelspec


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean(nb):
    data = json.loads(nb.read_text())
    extra = set(data.get("metadata", {})) - ALLOWED_NB_METADATA
    assert not extra, f"{nb.name}: strip notebook metadata {sorted(extra)} (make clean-notebooks)"
    for i, cell in enumerate(data["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{nb.name} cell {i} has outputs (make clean-notebooks)"
            assert cell.get("execution_count") is None, f"{nb.name} cell {i} has an execution count"
        assert set(cell.get("metadata", {})) <= {"tags"}, f"{nb.name} cell {i} has volatile metadata"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_follows_the_skeleton(nb):
    data = json.loads(nb.read_text())
    first = "".join(data["cells"][0]["source"])
    assert first.startswith(f"# {nb.stem[:2]} · "), f"{nb.name}: title cell '# NN · Title' first"
    assert "What you will learn" in first
    src = "".join("".join(c["source"]) for c in data["cells"])
    assert "write_results(" in src, f"{nb.name}: write the key figures to results.json"
    assert "## Summary" in src and "Exercises" in src
