"""Run the numbered notebooks headless with papermill, and keep their results together.

A suite run folder looks like:
    runs/20261122-0930/
        00-setup-check.ipynb           executed copy
        00-setup-check/results.json    the notebook's key figures (tests read these)
        00-setup-check/*.png           its figures
        summary.json, summary.md       every notebook's status, time and results
Notebooks share one `run_dir`, so a later notebook finds an earlier one's outputs there
(and builds small inputs itself when they are missing, so each can also run alone).
"""
from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
PROFILES = ("cpu", "rtx3090", "full")


def notebook_paths(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """Every numbered notebook, in order: `NN-slug.ipynb`."""
    return sorted(directory.glob("[0-9][0-9]-*.ipynb"))


def output_dir(run_dir: str | os.PathLike, notebook: str) -> Path:
    """The folder a notebook writes its artifacts and results.json into."""
    d = Path(run_dir) / notebook
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_results(run_dir: str | os.PathLike, notebook: str, results: dict) -> Path:
    """Write a notebook's key figures to `{run_dir}/{notebook}/results.json` (atomically)."""
    path = output_dir(run_dir, notebook) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)
    return path


def read_results(run_dir: str | os.PathLike, notebook: str) -> dict:
    return json.loads((Path(run_dir) / notebook / "results.json").read_text())


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def parameters_cell(nb_path: Path) -> dict:
    """The names and default values declared in a notebook's `parameters` cell.

    Raises ValueError if the notebook has no cell tagged `parameters`.
    """
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            names = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names[node.target.id] = ast.literal_eval(node.value) if node.value else None
                elif isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            names[t.id] = ast.literal_eval(node.value)
            return names
    raise ValueError(f"{nb_path.name} has no cell tagged 'parameters' (papermill needs one)")


def apply_profile(namespace: dict, notebook: str, profile: str, profiles: dict[str, dict]) -> dict:
    """Apply a profile's recipe to the parameters a user left at their defaults.

    `namespace` is the notebook's `globals()`; `profiles` maps a profile name to the values it
    sets (`"cpu"` may be absent: the parameters cell's own defaults are the CPU recipe). A value
    that differs from its declared default was set by the user (papermill injects its parameters
    after the `parameters` cell, a learner edits them there) and always wins over the profile.
    Returns the values changed; prints what changed and what was kept.
    """
    if profile != "cpu" and profile not in profiles:
        raise ValueError(f"{notebook}: unknown profile {profile!r}; choose one of "
                         f"{sorted(set(profiles) | {'cpu'})}")
    defaults = parameters_cell(NOTEBOOK_DIR / f"{notebook}.ipynb")
    recipe = profiles.get(profile, {})
    undeclared = sorted(set(recipe) - set(defaults))
    if undeclared:
        raise ValueError(f"{notebook}: profile {profile!r} sets {undeclared}, which its parameters cell "
                         f"does not declare")
    changed, kept = {}, {}
    for name, value in recipe.items():
        if namespace.get(name) == defaults[name]:
            namespace[name] = changed[name] = value
        else:
            kept[name] = namespace.get(name)
    if changed or kept:
        print(f"profile {profile}: " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
              + (f" (kept your {', '.join(f'{k}={v!r}' for k, v in kept.items())})" if kept else ""))
    return changed


def check_parameters(nb_path: Path, params: dict) -> None:
    """Papermill only warns on unknown parameters; we refuse them."""
    declared = parameters_cell(nb_path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"{nb_path.name}: parameters {unknown} are not declared in its parameters cell "
                         f"(declared: {sorted(declared)})")


def run_notebook(nb_path: Path, run_dir: str | os.PathLike, params: dict | None = None,
                 timeout: int | None = 900, progress: bool = False) -> dict:
    """Execute one notebook into `run_dir` and return its results.json (plus `_seconds`).

    `timeout`: seconds any one cell may run before the run fails (a stalled cell never hangs CI).
    """
    import papermill as pm

    nb_path = Path(nb_path)
    params = dict(params or {})
    params.setdefault("run_dir", str(run_dir))
    if "interactive" in parameters_cell(nb_path):
        # Widgets rendered into Output widgets can stall a headless client; the static figures stay.
        params.setdefault("interactive", False)
    check_parameters(nb_path, params)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    out = Path(run_dir) / nb_path.name
    t0 = time.time()
    pm.execute_notebook(str(nb_path), str(out), parameters=params, cwd=str(nb_path.parent),
                        kernel_name="python3", progress_bar=progress, execution_timeout=timeout,
                        request_save_on_cell_execute=False)
    results = read_results(run_dir, nb_path.stem)
    results["_seconds"] = round(time.time() - t0, 1)
    return results


def load_params_file(path: str | os.PathLike | None) -> dict:
    if not path:
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


def run_suite(run_dir: str | os.PathLike, profile: str = "cpu", only: list[str] | None = None,
              params_file: str | None = None, stop_on_error: bool = False) -> dict:
    """Run every numbered notebook in order; write summary.json and summary.md."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = load_params_file(params_file)
    summary = {"run_dir": str(run_dir), "profile": profile, "notebooks": {}}
    for nb in notebook_paths():
        if only and not any(nb.stem.startswith(o) for o in only):
            continue
        params = {"profile": profile} if "profile" in parameters_cell(nb) else {}
        params.update(overrides.get(nb.stem, {}))
        print(f"== {nb.name} ...", flush=True)
        t0 = time.time()
        try:
            res = run_notebook(nb, run_dir, params, progress=True)
            summary["notebooks"][nb.stem] = {"status": "ok", "seconds": round(time.time() - t0, 1), "results": res}
            print(f"   ok in {time.time() - t0:.0f} s", flush=True)
        except Exception as exc:  # keep going: one broken notebook should not hide the others
            summary["notebooks"][nb.stem] = {"status": "failed", "seconds": round(time.time() - t0, 1),
                                             "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            print(f"   FAILED after {time.time() - t0:.0f} s: {type(exc).__name__}", flush=True)
            if stop_on_error:
                break
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    lines = ["| notebook | status | seconds |", "|---|---|---|"]
    for name, s in summary["notebooks"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']} |")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Executed notebooks, figures and results are in {run_dir}")
    return summary
