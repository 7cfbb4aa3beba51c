"""Every numbered notebook runs headless through papermill with CI-sized parameters.

Notebooks are found by glob, so none can escape CI. Each writes results.json into its run
folder; the checks below assert on those figures, not merely on "it ran". A notebook
without a check here fails, as does a CI parameter its parameters cell does not declare.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eaglebook import runner

PARAMS = yaml.safe_load((Path(__file__).parent / "notebook_params.yaml").read_text()) or {}
NOTEBOOKS = runner.notebook_paths()


def check_00(r):
    assert r["ended_with_eot"] and r["answer_tokens"] > 0
    assert "Paris" in r["answer"]
    assert r["mtbench_questions"] == 80 and r["humaneval_problems"] == 164


def check_05(r):
    assert r["prompts_checked"] >= 2
    assert r["lossless_ok"], "EAGLE changed a float32 greedy output"
    assert r["accept_length_mean"] >= 1.0 and r["speedup"] > 0
    assert set(r["settings"]) == {"chain", "tree"}


CHECKS = {
    "00-setup-check": check_00,
    "05-tree-decoding": check_05,
}


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory):
    # One run folder for the whole session: a later notebook reuses an earlier one's outputs.
    return tmp_path_factory.mktemp("notebooks")


def test_every_notebook_is_found():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00-setup-check.ipynb"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ci_parameters_are_declared(nb):
    declared = runner.parameters_cell(nb)  # raises if there is no parameters cell
    assert "run_dir" in declared, "every notebook takes run_dir"
    unknown = set(PARAMS.get(nb.stem, {})) - set(declared)
    assert not unknown, f"tests/notebook_params.yaml sets {sorted(unknown)}, not declared in {nb.name}"


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_reports(nb, suite_dir):
    assert nb.stem in CHECKS, f"add a results check for {nb.stem} in tests/test_notebooks.py"
    results = runner.run_notebook(nb, suite_dir, PARAMS.get(nb.stem, {}))
    CHECKS[nb.stem](results)
