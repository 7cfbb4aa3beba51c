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


def check_01(r):
    from eaglebook import regenerate, vocab

    assert r["records_read"] == 200 and r["records_read"] == r["records_kept"] + r["records_skipped"]
    assert r["tokenized_rows"] > 100 and 0.2 < r["trained_token_fraction"] < 0.95
    assert r["regen_rows"] == 4 and r["train_rows"] + r["holdout_rows"] == 4 and r["holdout_rows"] >= 1
    assert r["regen_tokens_per_second"] > 0 and 0 < r["regen_trained_fraction"] < 1
    assert r["mask_checked_rows"] >= 50  # the notebook's own assertions ran on real rows
    assert 0 < r["draft_vocab_coverage_holdout"] <= 1 and r["draft_vocab_coverage_train"] == 1.0
    ds, meta = regenerate.load_regenerated(r["dataset_dir"], expect={"template_hash": r["template_hash"]})
    assert meta["weights_fingerprint"] == r["weights_fingerprint"]
    assert sum(map(sum, ds["train"]["loss_mask"])) == sum(ds["train"]["answer_tokens"])
    d2t, t2d, _ = vocab.load_vocab_map(r["vocab_map"])
    assert len(d2t) == r["draft_vocab"] == 2048


CHECKS = {
    "00-setup-check": check_00,
    "01-loss-masks": check_01,
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
