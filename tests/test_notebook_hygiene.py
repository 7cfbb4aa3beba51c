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


def test_profile_fills_only_the_defaults_a_user_left():
    nb = runner.NOTEBOOK_DIR / "04-ttt-training.ipynb"
    ns = dict(runner.parameters_cell(nb))
    ns["max_steps"] = 7  # set by the user (papermill injects after the parameters cell)
    recipe = {"rtx3090": {"target": "meta-llama/Llama-3.1-8B-Instruct", "max_steps": 20000}}
    changed = runner.apply_profile(ns, "04-ttt-training", "rtx3090", recipe)
    assert changed == {"target": "meta-llama/Llama-3.1-8B-Instruct"}
    assert ns["max_steps"] == 7 and ns["target"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert runner.apply_profile(ns, "04-ttt-training", "cpu", recipe) == {}
    with pytest.raises(ValueError, match="unknown profile 'gpu'"):
        runner.apply_profile(ns, "04-ttt-training", "gpu", recipe)
    with pytest.raises(ValueError, match="does not declare"):
        runner.apply_profile(ns, "04-ttt-training", "rtx3090", {"rtx3090": {"not_a_parameter": 1}})
