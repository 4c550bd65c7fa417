"""The lab with a user's own model in JupyterLab, in a real browser.

`jupyter lab` (from this venv, 127.0.0.1, a random token, offline: no news, no update check, no
extension manager, no announcements) serves a temporary folder holding a copy of
`tests/lab_models.ipynb` (a Hugging Face BERT from a config, `lab_app(model=..., loss_fn=...)`).
Chromium opens it, runs all cells, and drives the lab: it renders, its `LivePlot` draws and
grows, and a layer's precision toggled from the table shows in the table and as a ★ on the loss
curve. The window is 1,300 px wide with the file browser open, JupyterLab's narrow case: the
live figure (900 px in the lab) is drawn at the ~870 px the output area leaves, not clipped, and
widens again when the file browser closes. Harness: tests/helpers/browser.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.browser import ROOT, Page, classifier_to_bf16_at_pause, fill, free_port, required

try:
    import jupyterlab  # noqa: F401
except ImportError:
    jupyterlab = None

# JupyterLab parts that would go online or prompt: disabled through the page config.
OFFLINE_PAGE_CONFIG = {"disabledExtensions": {
    "@jupyterlab/extensionmanager-extension": True,
    "@jupyterlab/apputils-extension:announcements": True,
}}


@contextlib.contextmanager
def jupyter_lab(root: Path, runs_dir: Path):
    """Serve `root` with `jupyter lab` on a free port; yields (base url, token). Its config, data,
    runtime and workspace folders live under `root`'s parent, so nothing of the user's is read
    or written; the kernels see tests/ on their path (the notebook imports tests/models.py)."""
    port, token = free_port(), secrets.token_hex(16)
    home = root.parent / "jupyter-home"
    (home / "config" / "labconfig").mkdir(parents=True)
    (home / "config" / "labconfig" / "page_config.json").write_text(json.dumps(OFFLINE_PAGE_CONFIG))
    env = {**os.environ, "MPVIZ_RUNS_DIR": str(runs_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    log_path = root.parent / "jupyter-lab.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False",
         "--MappingKernelManager.cull_idle_timeout=300", "--MappingKernelManager.cull_interval=60"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() - t0 < 60, f"jupyter lab did not answer in 60 s:\n{log_path.read_text()}"
            try:
                urllib.request.urlopen(f"{url}api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        print(f"  jupyter lab up in {time.monotonic() - t0:.1f} s")
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _figure_fit(page) -> tuple[int, int]:
    """(room the output area leaves right of the live figure, the figure's drawn width)."""
    return tuple(page.evaluate(
        """() => { const svg = document.querySelector('.mpviz-figure .main-svg').getBoundingClientRect();
                   const area = document.querySelector('.mpviz-lab').closest('.jp-OutputArea-output')
                                        .getBoundingClientRect();
                   return [Math.round(area.right - svg.left), Math.round(svg.width)]; }"""))


def test_lab_trains_your_model_in_jupyterlab(browser, shots, tmp_path):
    if jupyterlab is None:
        why = "JupyterLab is missing: .venv/bin/pip install -r requirements.txt"
        if required():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    root, runs = tmp_path / "root", tmp_path / "runs"
    root.mkdir()
    runs.mkdir()
    shutil.copy(ROOT / "tests" / "lab_models.ipynb", root / "lab_models.ipynb")
    pause_at, max_steps = 6, 16
    with jupyter_lab(root, runs) as (url, token):
        p = Page(browser, f"{url}lab/tree/lab_models.ipynb?token={token}&reset", shots)
        page = p.page
        t0 = time.monotonic()
        page.set_viewport_size({"width": 1300, "height": 1000})
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=60_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        # Run all cells once the kernel is idle (the run waits for it otherwise).
        page.wait_for_function(
            """() => { const w = window.jupyterapp.shell.currentWidget;
                       const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                       return k && k.status === 'idle'; }""", timeout=60_000)
        print(f"  kernel idle at {time.monotonic() - t0:.1f} s")
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_selector(".mpviz-lab", timeout=90_000)
        print(f"  lab shown at {time.monotonic() - t0:.1f} s")
        assert "BertForSequenceClassification" in page.locator(".mpviz-task").inner_text()
        for name in ("start", "pause", "reset", "stop"):
            assert page.locator(f".mpviz-{name}").is_visible(), name
        p.wait(lambda: p.trace_len("loss:0") == 0, what="the empty loss plot")
        # The file browser is open, so the lab gets ~870 px: the live figure (900 px wide in the
        # lab) is drawn at that width instead of being clipped, and the layer table wraps below
        # it at full width instead of being squeezed beside it.
        assert page.locator(".jp-FileBrowser").is_visible()
        p.wait(lambda: 700 < _figure_fit(page)[1] <= _figure_fit(page)[0], timeout=20,
               what="the live figure to fit the output area")
        room = _figure_fit(page)[0]
        assert page.locator(".mpviz-layer-table").bounding_box()["width"] >= room - 10
        fill(page, ".mpviz-max-steps", max_steps)
        fill(page, ".mpviz-pause-at", pause_at)
        page.locator(".mpviz-start").click()
        status = page.locator(".mpviz-status")

        classifier_to_bf16_at_pause(p, runs, status, pause_at, max_steps)
        # Closing the file browser gives the figure its full 900 px again.
        page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
        p.wait(lambda: _figure_fit(page)[1] == 900, what="the figure to widen to 900 px")
        page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
        p.wait(lambda: _figure_fit(page)[1] <= room, what="the figure to narrow again")
        height = int(page.evaluate("document.querySelector('.mpviz-lab').scrollHeight"))
        page.set_viewport_size({"width": 1300, "height": height + 450})
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "lab-jupyterlab.png"))
        p.no_python_errors_shown()
        assert not [m for m in p.console if "Failed to initialize model" in m], p.console
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()
