"""The browser tests' harness: Voila serves a notebook on localhost, Playwright drives Debian's
headless Chromium (never `playwright install`: no downloads here).

The fixtures `browser` and `shots` are registered in tests/conftest.py. Screenshots go to
pytest's temporary folder, so running the tests changes no tracked file; `make screenshots` sets
`MPVIZ_SCREENSHOTS=docs` to refresh the ones the README shows. Without Chromium or Playwright the
`browser` fixture skips, saying how to install them, except where they are required: under CI
(`CI=true`) or when screenshots were asked for, it fails instead.

Also used by benchmarks/live_plots.py (CHROMIUM, CHROMIUM_ARGS, fill, voila).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]   # the repository
CHROMIUM = Path("/usr/bin/chromium")
SHOTS_ENV = "MPVIZ_SCREENSHOTS"   # folder for the screenshots (relative to the repo root)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Console noise that is not ours (see ../shared/NOTES.md): Voila 0.5.13's JupyterLab 4.6 version
# warnings, the template's CDN font/MathJax requests failing offline, and plotly's mime renderer
# warning about setData. Everything else in the console fails the test.
HARMLESS = re.compile(
    r"Unsatisfied version|ERR_NAME_NOT_RESOLVED|ERR_INTERNET_DISCONNECTED|ERR_CONNECTION_REFUSED.*(cdn|fonts|mathjax)"
    r"|font-?awesome|MathJax|r\.setData is not a function", re.I)
# Requests to outside hosts that Voila's own template makes (the apps must make none).
TEMPLATE_HOSTS = re.compile(r"cdnjs\.cloudflare\.com|cdn\.jsdelivr\.net|unpkg\.com|fonts\.googleapis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def voila(notebook: str, runs_dir: Path):
    """Serve notebooks/<notebook> with Voila on a free port, with kernel culling on."""
    port = free_port()
    env = {**os.environ, "MPVIZ_RUNS_DIR": str(runs_dir)}
    log = open(runs_dir.parent / f"voila-{Path(notebook).stem}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", f"notebooks/{notebook}", "--no-browser", f"--port={port}",
         "--Voila.ip=127.0.0.1", "--MappingKernelManager.cull_idle_timeout=300",
         "--MappingKernelManager.cull_interval=60"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            assert proc.poll() is None, (runs_dir.parent / f"voila-{Path(notebook).stem}.log").read_text()
            try:
                urllib.request.urlopen(url + "api/status", timeout=2)
                break
            except urllib.error.HTTPError:
                break   # the server answers (this route may not exist): it is up
            except OSError:
                time.sleep(0.3)
        print(f"  voila up in {time.monotonic() - end + 60:.1f} s")
        yield url
    finally:
        t0 = time.monotonic()
        proc.terminate()
        try:
            proc.wait(20)
            print(f"  voila stopped in {time.monotonic() - t0:.1f} s")
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def missing() -> str | None:
    """Why the browser tests cannot run here, with the fix; None when they can."""
    if not CHROMIUM.exists():
        return (f"the browser tests need Debian's Chromium at {CHROMIUM}: "
                "sudo apt-get install -y chromium (or `make browser` as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the browser tests need Playwright ({e}): .venv/bin/pip install -r requirements.txt"
    return None


def required() -> bool:
    """Under CI or when screenshots were asked for, a missing browser is a failure, not a skip."""
    return (os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
            or bool(os.environ.get(SHOTS_ENV)))


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless, launched by Playwright (check `missing()` first)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: $MPVIZ_SCREENSHOTS (`make screenshots`: docs/), else a temp folder."""
    where = os.environ.get(SHOTS_ENV)
    if not where:
        return tmp_path_factory.mktemp("screenshots")
    path = ROOT / where
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium for the test module; without it (or Playwright) a skip saying how to
    install it, or a failure where `required()`."""
    why = missing()
    if why:
        if required():
            pytest.fail(f"{why} (required: CI or {SHOTS_ENV} is set)", pytrace=False)
        pytest.skip(why)
    with chromium() as b:
        yield b


class Page:
    """A page plus what it logged and fetched, for the no-errors / offline assertions."""

    def __init__(self, browser, url: str, shots: Path):
        self.shots = shots
        self.console: list[str] = []
        self.outside: list[str] = []
        self.page = browser.new_page(viewport={"width": 1500, "height": 1000})
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", self._request)
        t0 = time.monotonic()
        self.page.goto(url, timeout=120_000)
        print(f"  page loaded in {time.monotonic() - t0:.1f} s")

    def _request(self, req) -> None:
        host = re.sub(r"^\w+://([^/:]+).*", r"\1", req.url)
        if host not in ("127.0.0.1", "localhost") and not req.url.startswith(("data:", "blob:")):
            self.outside.append(req.url)

    def our_errors(self) -> list[str]:
        return [m for m in self.console if m.startswith(("error", "pageerror")) and not HARMLESS.search(m)]

    def trace_len(self, meta: str) -> int:
        return self.page.evaluate(
            """(meta) => { const gd = document.querySelector('.js-plotly-plot.mpviz-figure, .mpviz-figure .js-plotly-plot');
                 if (!gd || !gd.data) return -1;
                 const t = gd.data.find(t => t.meta === meta);
                 return t && t.x ? t.x.length : -1; }""", meta)

    def trace(self, meta: str):
        return self.page.evaluate(
            """(meta) => { const gd = document.querySelector('.js-plotly-plot.mpviz-figure, .mpviz-figure .js-plotly-plot');
                 const t = gd && gd.data ? gd.data.find(t => t.meta === meta) : null;
                 return t ? {x: Array.from(t.x || []), hovertext: t.hovertext ? Array.from(t.hovertext) : [],
                             visible: t.visible} : null; }""", meta)

    def wait(self, cond, timeout: float = 120.0, what: str = "") -> None:
        t0 = time.monotonic()
        end = t0 + timeout
        while time.monotonic() < end:
            if cond():
                print(f"  waited {time.monotonic() - t0:5.1f} s for {what}")
                return
            self.page.wait_for_timeout(250)
        raise AssertionError(f"timed out waiting for {what}; console: {self.console[-10:]}")

    def shoot(self, selector: str, name: str) -> None:
        """Screenshot of the app into `shots` (a tall viewport: Chromium paints only what is in it)."""
        height = int(self.page.evaluate(f"document.querySelector('{selector}').scrollHeight")) + 100
        self.page.set_viewport_size({"width": 1500, "height": max(1000, height)})
        self.page.wait_for_timeout(1000)
        self.page.locator(selector).screenshot(path=str(self.shots / name))

    def no_python_errors_shown(self) -> None:
        stderr = self.page.locator("[data-mime-type='application/vnd.jupyter.stderr']")
        assert stderr.count() == 0, stderr.all_inner_texts()
        assert self.page.locator(".jp-OutputArea-output [data-mime-type*='error']").count() == 0

    def offline_ok(self) -> None:
        ours = [u for u in self.outside if not TEMPLATE_HOSTS.search(u)]
        assert not ours, f"the page fetched from outside: {ours}"


def fill(page, selector: str, value: int) -> None:
    box = page.locator(f"{selector} input")
    box.fill(str(value))
    box.press("Enter")   # an IntText sends its value on Enter


def toggle_at_pause(p: "Page", layer: str, precision: str, pause_at: int) -> None:
    """The lab paused itself at `pause_at` (drawn so far): set `layer` to `precision`, resume,
    and wait for its precision cell and the ★ on the loss curve."""
    page, status = p.page, p.page.locator(".mpviz-status")
    p.wait(lambda: "paused" in status.inner_text(), what="the lab to pause by itself")
    p.wait(lambda: p.trace_len("loss:0") == pause_at, what="the loss curve up to the pause")
    row = page.locator(".mpviz-layer-row", has_text=layer)
    row.locator("select").select_option(precision)
    p.wait(lambda: f"{layer} → {precision} from the next step" in status.inner_text(),
           what="the toggle's note")
    page.locator(".mpviz-pause").click()   # Resume
    p.wait(lambda: precision in row.locator(".mpviz-cell").inner_text(),
           what=f"{layer}'s precision cell")
    p.wait(lambda: any(f"{layer} → {precision}" in h
                       for h in (p.trace("marks:0") or {}).get("hovertext", [])),
           what="the precision-change marker on the loss curve")


def classifier_to_bf16_at_pause(p: Page, runs: Path, status, pause_at: int, max_steps: int) -> None:
    """At the pause, set the BERT's `classifier` (tests/lab_models.ipynb) to bf16 from its
    dropdown; when the run is done, the curve has every step and the run records the change at
    exactly that step."""
    import mpviz

    toggle_at_pause(p, "classifier", "bf16", pause_at)
    p.wait(lambda: "done" in status.inner_text() and p.trace_len("loss:0") == max_steps,
           what="the step limit")
    run = mpviz.load_run(next(runs.glob("lab-*BertForSequenceClassification*")))
    changes = run.policy_changes
    cls = changes[(changes["layer"] == "classifier") & (changes["precision"] == "bf16")]
    assert cls["step"].tolist() == [pause_at]
    assert len(run.steps) == max_steps
    run.close()


@contextlib.contextmanager
def offline(browser, path: Path, **page_kw):
    """A page with every request but the file ``path`` blocked; yields ``(page, requests, errors)``
    (every URL asked for; page errors and console errors)."""
    page = browser.new_page(**page_kw)
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.route("**/*", lambda r: r.continue_() if r.request.url == path.as_uri() else r.abort())
    try:
        page.goto(path.as_uri())
        page.wait_for_function("() => { const g = document.querySelector('.js-plotly-plot');"
                               " return g && g.data && g._fullLayout; }", timeout=30_000)
        yield page, requests, errors
    finally:
        page.close()
