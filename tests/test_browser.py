"""A learner's path through a real browser: JupyterLab, Run All, the widgets.

The test starts its own JupyterLab server on loopback (a free port, a token, throwaway settings),
drives headless Chromium (Debian's `chromium` package through Playwright; Playwright downloads
no browser) to open notebooks 01 and 05 with CI-size parameters and `interactive=True`, runs
all cells from the Run menu, checks that no cell shows an error, moves 05's step-through slider
and 01's sample browser and checks that the tree / sample shown changed. Screenshots and the
executed notebooks land in runs/browser-test/ (overwritten on each run). The server is stopped
afterwards.

Skipped, saying why, only where Chromium or Playwright cannot be installed (scripts/install.sh
installs both where apt is available and it runs as root).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

from eaglebook import runner

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_DIR = REPO / "runs" / "browser-test"
CI_PARAMS = yaml.safe_load((REPO / "tests" / "notebook_params.yaml").read_text()) or {}
# The UI path is what is tested here (tests/test_notebooks.py checks the figures at CI size), so
# 05 decodes fewer prompts than CI does; 01 keeps its CI size (its sample browser needs samples).
BROWSER_PARAMS = {"05-tree-decoding": {"n_prompts": 2, "max_new_tokens": 24}}
NOTEBOOK_SECONDS = 600  # a generous ceiling for one small notebook run from the browser

pytestmark = pytest.mark.notebook


def _why_not() -> str | None:
    if not CHROMIUM.exists():
        return (f"{CHROMIUM} is missing: Debian's chromium package could not be installed here "
                "(scripts/install.sh installs it with apt-get where apt is available and it runs as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (the dev extra: pip install -e '.[dev]')"
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        return "JupyterLab is not installed in this environment (the notebooks extra)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_notebook(stem: str, dest: Path) -> Path:
    """A copy of notebook `stem` with CI-size parameters (and interactive=True) injected the way
    papermill injects them: a cell after the parameters cell."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    src = REPO / "notebooks" / f"{stem}.ipynb"
    declared = runner.parameters_cell(src)
    params = {**CI_PARAMS.get(stem, {}), **BROWSER_PARAMS.get(stem, {}), "run_dir": str(RUN_DIR)}
    if "interactive" in declared:
        params["interactive"] = True
    runner.check_parameters(src, params)
    nb = parameterize_notebook(load_notebook_node(str(src)), params)
    out = dest / src.name
    nbformat.write(nb, out)
    return out


@pytest.fixture(scope="module")
def lab():
    why = _why_not()
    if why:
        pytest.skip(why)
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    work = RUN_DIR / "lab"
    nbs = work / "notebooks"
    nbs.mkdir(parents=True)
    for stem in ("01-loss-masks", "05-tree-decoding"):
        _prepare_notebook(stem, nbs)
    settings = work / ".settings"
    # Every cell stays in the page (no windowing), so the test sees each output.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no "official Jupyter news?" toast over the page
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(work / ".workspaces"),
           "JUPYTER_CONFIG_DIR": str(work / ".config"), "JUPYTER_RUNTIME_DIR": str(work / ".runtime")}
    log = open(RUN_DIR / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"JupyterLab exited: see {RUN_DIR / 'jupyterlab.log'}"
            assert time.time() < deadline, f"JupyterLab did not answer within 120 s: see {RUN_DIR / 'jupyterlab.log'}"
            time.sleep(0.5)
        yield {"base": base, "token": token, "notebooks": nbs}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> Path:
    path = RUN_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def _run_all(page, name: str) -> None:
    """Open the Run menu, click Run All Cells, and wait until every code cell has run."""
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    page.locator("#jp-main-statusbar").get_by_text("Idle").first.wait_for(timeout=120_000)  # the kernel is up
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    prompts = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell .jp-InputArea-prompt")
    n = prompts.count()
    assert n > 3, f"{name}: only {n} code cells on the page"
    deadline = time.time() + NOTEBOOK_SECONDS
    idle = page.locator("#jp-main-statusbar").get_by_text("Idle")
    quiet = 0
    while True:  # done when every cell has run, or nothing is queued any more (an error stops Run All)
        texts = [t.strip().strip("[]:").strip() for t in prompts.all_inner_texts()]
        if all(t.isdigit() for t in texts):
            break
        quiet = quiet + 1 if "*" not in texts and any(t.isdigit() for t in texts) and idle.count() else 0
        if quiet >= 3:
            break
        if time.time() > deadline:
            _shot(page, f"{name}-timeout")
            pytest.fail(f"{name}: cells still not run after {NOTEBOOK_SECONDS} s: prompts {texts}")
        time.sleep(1)
    page.keyboard.press("Control+s")  # the executed copy is kept beside the screenshots
    time.sleep(1)


def _assert_no_error(page, name: str, path: Path) -> None:
    errors = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)")
    assert errors.count() == 0, f"{name}: a cell shows an error: {errors.first.inner_text()[:2000]}"
    saved = nbformat.read(path, as_version=4)
    bad = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(saved.cells) if c.cell_type == "code"
           for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not bad, f"{name}: error outputs {bad}"
    assert all(c.get("execution_count") for c in saved.cells if c.cell_type == "code" and c.source.strip()), \
        f"{name}: the saved notebook has cells that never ran"


def _open(browser, lab, stem: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    # `reset`: a fresh workspace, so the page holds this notebook only (JupyterLab would otherwise restore the
    # tabs of the previous page, and Run All would go to whichever tab got the focus)
    page.goto(f"{lab['base']}/lab/tree/notebooks/{stem}.ipynb?reset&token={lab['token']}")
    return page


def _move_slider(page, slider) -> None:
    """Move an ipywidgets slider one step right, as a learner does: drag its handle and let go."""
    handle = slider.locator(".noUi-handle")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    track = slider.locator(".noUi-target").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * 0.5, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()


def _readout(slider) -> str:
    return slider.locator(".widget-readout").inner_text().strip()


@contextlib.contextmanager
def _ran(browser, lab, name: str):
    """The notebook opened in JupyterLab, Run All done, no error on the page or in the saved file."""
    page = _open(browser, lab, name)
    try:
        _run_all(page, name)
        _shot(page, f"{name}-ran")
        _assert_no_error(page, name, lab["notebooks"] / f"{name}.ipynb")
        yield page
    finally:
        page.close()


def _drag_and_see(page, name: str, slider, shown, what: str, label: str, timeout: float) -> None:
    """Drag `slider` one step and wait until `shown()` (what the widget draws) changes."""
    slider.scroll_into_view_if_needed()
    before, value = shown(), _readout(slider)
    _shot(page, f"{name}-{label}-before")
    _move_slider(page, slider)
    assert _readout(slider) != value, f"{name}: the slider did not move"
    deadline = time.time() + timeout
    while shown() == before:
        assert time.time() < deadline, f"{name}: {what} did not change (slider at {_readout(slider)})"
        time.sleep(0.5)


def test_notebook_05_step_through_in_jupyterlab(browser, lab):
    name = "05-tree-decoding"
    with _ran(browser, lab, name) as page:
        stepper = page.locator(".widget-interact").filter(has=page.locator(".widget-slider", has_text="step"))
        assert stepper.count() == 1, f"{name}: the step-through widget is not on the page"
        picture = stepper.locator(".jp-OutputArea-output img")
        picture.first.wait_for()
        _drag_and_see(page, name, stepper.locator(".widget-slider"),
                      lambda: picture.first.get_attribute("src") if picture.count() else None,
                      "the tree", "slider", timeout=60)
        _shot(page, f"{name}-slider-after")


def test_notebook_01_sample_browser_in_jupyterlab(browser, lab):
    name = "01-loss-masks"
    with _ran(browser, lab, name) as page:
        box = page.locator(".widget-vbox").filter(has=page.locator(".widget-slider", has_text="sample"))
        assert box.count() >= 1, f"{name}: the sample browser is not on the page"
        box = box.last
        slider = box.locator(".widget-slider")
        shown = box.locator(".widget-html-content")
        _drag_and_see(page, name, slider, shown.inner_html, "the sample shown", "browser", timeout=30)
        assert f"sample {_readout(slider)}:" in shown.inner_text()
        _shot(page, f"{name}-browser-after")


def _slider_calls(source: str, where: str):
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.endswith("Slider"):
                yield where, node


def test_sliders_redraw_when_let_go():
    """Every slider in the notebooks and in eaglebook/viz.py uses continuous_update=False: a redraw
    (a tree, a decoded sample) takes a moment, and redrawing while the handle moves queues them up."""
    calls = list(_slider_calls((REPO / "eaglebook" / "viz.py").read_text(), "eaglebook/viz.py"))
    for nb in runner.notebook_paths():
        for i, cell in enumerate(nbformat.read(nb, as_version=4).cells):
            if cell.cell_type == "code":
                calls += _slider_calls(cell.source, f"{nb.name} cell {i}")
    assert calls, "no slider found: the step-through and the sample browser are sliders"
    bad = [f"{where}: line {node.lineno}" for where, node in calls
           if not any(k.arg == "continuous_update" and getattr(k.value, "value", None) is False for k in node.keywords)]
    assert not bad, f"sliders without continuous_update=False: {bad}"
