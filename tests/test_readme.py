"""The front door: the README starts with how to open the suite, its figure is drawn from the
notebooks, and the README, the cards and the Makefile spell each CLI flag as `--help` prints it."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from eaglebook import runner, viz

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "data").glob("*/README.md")),
        *sorted((REPO / "data").glob("*/card-notes.md"))]


def test_readme_starts_with_start_here():
    text = (REPO / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[0] == "Start here", sections
    start = text.split("## Start here", 1)[1].split("\n## ", 1)[0]
    assert "make lab" in start.split("```")[1], "the first instruction opens JupyterLab"
    assert "](docs/pipeline.png)" in start and (REPO / "docs" / "pipeline.png").is_file()
    for nb in runner.notebook_paths():
        assert f"| `{nb.stem}` |" in start, f"{nb.stem} has no time in Start here"
    assert "make notebooks" in text and "make test" in text
    lab = re.search(r"^lab:.*\n\t(.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert lab and "jupyter lab notebooks/00-setup-check.ipynb" in lab.group(1)


def test_binder_badge_opens_the_setup_check():
    text = (REPO / "README.md").read_text()
    badge = re.search(r"\(https://mybinder\.org/v2/gh/[^)]*urlpath=lab/tree/([^)&]+)\)", text)
    assert badge, "README has no Binder badge"
    assert (REPO / badge.group(1)).is_file() and badge.group(1).endswith("00-setup-check.ipynb")


def test_pipeline_figure_has_one_box_per_notebook():
    fig = viz.plot_pipeline()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for nb in runner.notebook_paths():
        assert nb.stem[:2] in texts
    assert len([t for t in texts if re.fullmatch(r"\d\d", t)]) == len(runner.notebook_paths())


def _command_fields() -> set[str]:
    from eaglebook.cli import COMMANDS, _load_stage_commands

    _load_stage_commands()
    return {f.name for cls, _ in COMMANDS.values() for f in dataclasses.fields(cls)}


def test_docs_spell_flags_as_help_prints_them():
    """`--help` prints the underscore form first (`--run_dir`); the docs use that one only."""
    fields = _command_fields()
    bad = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for flag in re.findall(r"(?<![\w-])--([a-z0-9]+(?:-[a-z0-9]+)+)", line):
                if flag.replace("-", "_") in fields:
                    bad.append(f"{doc.relative_to(REPO)}:{n}: --{flag} (write --{flag.replace('-', '_')})")
    assert not bad, "\n".join(bad)
