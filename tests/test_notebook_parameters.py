"""papermill reads every line of every notebook's parameters cell.

papermill skips (with an "Unable to parse line" warning) a parameter line holding more than one
`=`, e.g. a comment like `# 0 = all`; such a parameter vanishes from `papermill --help-notebook`
and from tools that list a notebook's parameters.
"""
from __future__ import annotations

import logging

import papermill as pm
import pytest

from eaglebook import runner

NOTEBOOKS = runner.notebook_paths()


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_papermill_parses_every_parameter_line(nb, caplog):
    with caplog.at_level(logging.WARNING, logger="papermill"):
        found = pm.inspect_notebook(str(nb))
    unparsed = [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert not unparsed, f"{nb.name}: papermill cannot parse these parameter lines (a comment may not hold '='): {unparsed}"
    declared = runner.parameters_cell(nb)
    assert set(found) == set(declared), f"{nb.name}: papermill sees {sorted(found)}, the cell declares {sorted(declared)}"
