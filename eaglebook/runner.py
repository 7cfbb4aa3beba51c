"""Run the numbered notebooks headless with papermill, and keep their results together.

A suite run folder looks like:
    runs/20261122-0930/
        00-setup-check.ipynb           executed copy
        00-setup-check/results.json    the notebook's key figures (tests read these)
        00-setup-check/*.png           its figures
        summary.json, summary.md       every notebook's status, time beside its budget, and results
Notebooks share one `run_dir`, so a later notebook finds an earlier one's outputs there
(and builds small inputs itself when they are missing, so each can also run alone).
A notebook that fails keeps its partially executed copy in the run folder, with the error
shown at the top and in the cell that failed, so a learner sees how far it got.
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

# Time budgets with the defaults on a 2-core CPU (the workshop pace); summary.md flags a notebook
# or a suite over its budget. A cell may run CELL_TIMEOUT_S before the run fails: twice a whole
# notebook's budget, so the defaults never meet it and only a stalled cell does.
NOTEBOOK_BUDGET_S = 300
SUITE_BUDGET_S = 1200
CELL_TIMEOUT_S = 600


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
                 timeout: int | None = CELL_TIMEOUT_S, progress: bool = False) -> dict:
    """Execute one notebook into `run_dir` and return its results.json (plus `_seconds`).

    `timeout`: seconds any one cell may run before the run fails (a stalled cell never hangs CI).
    On any failure the executed copy `{run_dir}/{name}.ipynb` is kept, holding every output up
    to the failing cell and the error (papermill marks a raised exception itself; a timeout or a
    dead kernel is marked here), and the exception is raised again.
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
    try:
        pm.execute_notebook(str(nb_path), str(out), parameters=params, cwd=str(nb_path.parent),
                            kernel_name="python3", progress_bar=progress, execution_timeout=timeout,
                            request_save_on_cell_execute=True)
    except pm.PapermillExecutionError:
        raise  # papermill wrote the copy with the traceback in the failing cell and a banner on top
    except BaseException as exc:
        mark_failed_copy(out, nb_path, exc)
        raise
    results = read_results(run_dir, nb_path.stem)
    results["_seconds"] = round(time.time() - t0, 1)
    return results


def mark_failed_copy(out: Path, nb_path: Path, exc: BaseException) -> None:
    """Keep the executed copy of a notebook that stopped without a cell raising (a cell timeout,
    a dead kernel, an interrupt): the cell that was running gets the error as its output, and a
    banner on top says where the run stopped. Without a saved copy, the source notebook is kept."""
    import nbformat

    nb = nbformat.read(out if out.is_file() else nb_path, as_version=4)
    # papermill stamps start_time on each cell it starts; the last one stamped was running
    started = [i for i, c in enumerate(nb.cells)
               if c.cell_type == "code" and c.get("metadata", {}).get("papermill", {}).get("start_time")]
    where = started[-1] if started else None
    if where is not None:
        cell = nb.cells[where]
        cell.setdefault("outputs", []).append(nbformat.v4.new_output(
            "error", ename=type(exc).__name__, evalue=str(exc)[:2000], traceback=[f"{type(exc).__name__}: {exc}"]))
        cell.metadata.papermill["status"] = "failed"
        for later in nb.cells[where + 1:]:
            later.get("metadata", {}).get("papermill", {})["status"] = "pending"
    text = (f"**The run stopped here: {type(exc).__name__}.** {str(exc)[:500]}  \n"
            + (f"It stopped in the cell that shows `{type(exc).__name__}` below; the outputs above it are kept."
               if where is not None else "No cell had started."))
    banner = nbformat.v4.new_markdown_cell(text)
    banner.metadata["tags"] = ["eaglebook-run-error"]
    nb.cells.insert(0, banner)
    nbformat.write(nb, out)


def load_params_file(path: str | os.PathLike | None) -> dict:
    if not path:
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


def run_suite(run_dir: str | os.PathLike, profile: str = "cpu", only: list[str] | None = None,
              params_file: str | None = None, stop_on_error: bool = False,
              notebooks_dir: str | os.PathLike = NOTEBOOK_DIR, cell_timeout: int = CELL_TIMEOUT_S) -> dict:
    """Run every numbered notebook of `notebooks_dir` in order; write summary.json and summary.md."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = load_params_file(params_file)
    summary = {"run_dir": str(run_dir), "profile": profile, "budget_seconds": SUITE_BUDGET_S, "notebooks": {}}
    for nb in notebook_paths(Path(notebooks_dir)):
        if only and not any(nb.stem.startswith(o) for o in only):
            continue
        params = {"profile": profile} if "profile" in parameters_cell(nb) else {}
        params.update(overrides.get(nb.stem, {}))
        print(f"== {nb.name} ...", flush=True)
        t0 = time.time()
        entry = {"budget_seconds": NOTEBOOK_BUDGET_S, "executed": str(run_dir / nb.name)}
        try:
            res = run_notebook(nb, run_dir, params, timeout=cell_timeout, progress=True)
            entry.update(status="ok", seconds=round(time.time() - t0, 1), results=res)
            print(f"   ok in {time.time() - t0:.0f} s", flush=True)
        except Exception as exc:  # keep going: one broken notebook should not hide the others
            entry.update(status="failed", seconds=round(time.time() - t0, 1),
                         error=f"{type(exc).__name__}: {str(exc)[:2000]}")
            print(f"   FAILED after {time.time() - t0:.0f} s: {type(exc).__name__}; its executed copy "
                  f"(with the error) is {entry['executed']}", flush=True)
        summary["notebooks"][nb.stem] = entry
        if entry["status"] != "ok" and stop_on_error:
            break
    summary["seconds"] = round(sum(s["seconds"] for s in summary["notebooks"].values()), 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    md = summary_markdown(summary)
    (run_dir / "summary.md").write_text(md)
    print(md)
    print(f"Executed notebooks, figures and results are in {run_dir}")
    return summary


def summary_markdown(summary: dict) -> str:
    """The suite's table: each notebook's status and time beside its budget; over-budget flagged."""
    def budget(seconds: float, limit: float) -> str:
        return f"{limit:g}" + (" **OVER BUDGET**" if seconds > limit else "")

    lines = [f"Profile `{summary['profile']}`.", "",
             "| notebook | status | seconds | budget (s) |", "|---|---|---|---|"]
    for name, s in summary["notebooks"].items():
        status = s["status"] if s["status"] == "ok" else f"**{s['status']}**: {s.get('error', '')[:200]}"
        lines.append(f"| {name} | {status.replace('|', '/').replace(chr(10), ' ')} | {s['seconds']} | "
                     f"{budget(s['seconds'], s['budget_seconds'])} |")
    lines.append(f"| suite | {sum(s['status'] == 'ok' for s in summary['notebooks'].values())}/"
                 f"{len(summary['notebooks'])} ok | {summary['seconds']} | "
                 f"{budget(summary['seconds'], summary['budget_seconds'])} |")
    return "\n".join(lines) + "\n"
