"""The headless suite runner: a failed notebook keeps its executed copy with the error, the
summary shows each time beside its budget, and `eaglebook notebooks` exits non-zero on a failure.

The notebooks here are tiny real ones written into a temporary folder and run by a real kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from eaglebook import runner

REPO = Path(__file__).resolve().parent.parent


def write_notebook(folder: Path, name: str, *cells: str) -> Path:
    """A notebook `name` whose first cell is its parameters cell, then `cells` as code."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir: str = "runs/latest"  # where results go')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def results_cell(name: str) -> str:
    return f"from eaglebook.runner import write_results\nwrite_results(run_dir, {name!r}, {{'answer': 42}})"


def outputs_text(cell) -> str:
    return json.dumps(cell.get("outputs", []))


@pytest.fixture
def suite(tmp_path) -> Path:
    """01 prints and then raises; 02 runs fine (the runner must go on after 01)."""
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    write_notebook(nbs, "01-raises", 'print("first cell ran")', 'raise RuntimeError("broken on purpose")',
                   'print("never reached")')
    write_notebook(nbs, "02-fine", results_cell("02-fine"))
    return nbs


def test_failed_notebook_is_kept_and_the_command_fails(suite, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "eaglebook.cli", "notebooks", "--run_dir", str(run),
                           "--notebooks_dir", str(suite)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    kept = nbformat.read(run / "01-raises.ipynb", as_version=4)
    texts = [outputs_text(c) for c in kept.cells if c.cell_type == "code"]
    assert any("first cell ran" in t for t in texts), "outputs before the failure are kept"
    assert any("broken on purpose" in t and "RuntimeError" in t for t in texts), "the error is in the copy"
    assert not any("never reached" in t for t in texts)
    summary = json.loads((run / "summary.json").read_text())
    nbs = summary["notebooks"]
    assert nbs["01-raises"]["status"] == "failed" and "broken on purpose" in nbs["01-raises"]["error"]
    assert nbs["01-raises"]["executed"] == str(run / "01-raises.ipynb")
    assert nbs["02-fine"]["status"] == "ok" and nbs["02-fine"]["results"]["answer"] == 42
    md = (run / "summary.md").read_text()
    assert f"| 02-fine | ok | {nbs['02-fine']['seconds']} | {runner.NOTEBOOK_BUDGET_S} |" in md
    assert "| suite | 1/2 ok |" in md and f"| {runner.SUITE_BUDGET_S} |" in md


def test_timed_out_notebook_is_kept_with_its_error(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    write_notebook(nbs, "01-stalls", 'print("before the stall")', "import time\ntime.sleep(60)",
                   'print("never reached")')
    run = tmp_path / "run"
    summary = runner.run_suite(run, notebooks_dir=nbs, cell_timeout=3)
    entry = summary["notebooks"]["01-stalls"]
    assert entry["status"] == "failed" and "CellTimeoutError" in entry["error"]
    kept = nbformat.read(run / "01-stalls.ipynb", as_version=4)
    assert kept.cells[0].cell_type == "markdown" and "The run stopped here: CellTimeoutError" in kept.cells[0].source
    cell = {c.source.splitlines()[-1]: c for c in kept.cells if c.cell_type == "code"}
    assert "before the stall" in outputs_text(cell['print("before the stall")'])
    stalled = cell["time.sleep(60)"]
    assert "CellTimeoutError" in outputs_text(stalled) and stalled.metadata.papermill["status"] == "failed"
    assert not cell['print("never reached")'].get("outputs")


def test_summary_flags_over_budget():
    summary = {"profile": "cpu", "budget_seconds": runner.SUITE_BUDGET_S, "seconds": 1300.0, "notebooks": {
        "01-a": {"status": "ok", "seconds": 120.0, "budget_seconds": runner.NOTEBOOK_BUDGET_S},
        "04-b": {"status": "ok", "seconds": 330.5, "budget_seconds": runner.NOTEBOOK_BUDGET_S},
        "06-c": {"status": "failed", "seconds": 849.5, "budget_seconds": runner.NOTEBOOK_BUDGET_S,
                 "error": "CellTimeoutError: cell | took\ntoo long"}}}
    md = runner.summary_markdown(summary)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "OVER BUDGET" not in rows["01-a"] and "OVER BUDGET" in rows["04-b"] and "OVER BUDGET" in rows["suite"]
    assert "**failed**: CellTimeoutError: cell / took too long" in rows["06-c"]
    assert "| suite | 2/3 ok | 1300.0 |" in md

