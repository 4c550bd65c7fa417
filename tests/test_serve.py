"""`mpviz lab | explore | compare | tour` as a new user gets them: from the wheel.

The wheel is built once (from a copy of the checkout: the build leaves nothing in the tree) and
installed with pip into a venv of its own. That venv sees the main venv's packages (torch,
voila, ...) through a .pth file, not the checkout: `import mpviz` there is the wheel's, and the
apps are the notebooks the wheel ships. Each command runs from an empty folder as a user would
type it; Chromium opens the page it serves (plots drawn, no page errors, Start trains in the lab),
and each server is stopped (Ctrl-C or SIGTERM) with every process it started checked gone.

Browser tests skip without Chromium/Playwright, except under CI (`CI=true`), where they fail.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers.browser import HARMLESS, chromium, free_port, missing, offline
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
APPS = ("lab", "explorer", "compare", "tour")
USER_MODEL = '''
import torch
from torch import nn


def lab_parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
            "data": [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)],
            "loss_fn": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), "name": "my-mlp"}
'''


def test_the_repository_notebooks_are_the_packaged_apps():
    """notebooks/ (Binder, `make dashboard`) are copies of mpviz/apps/ (what the wheel ships)."""
    for name in APPS:
        packaged = (ROOT / "mpviz" / "apps" / f"{name}.ipynb").read_text()
        assert (ROOT / "notebooks" / f"{name}.ipynb").read_text() == packaged, (
            f"notebooks/{name}.ipynb differs from mpviz/apps/{name}.ipynb: edit the packaged one "
            f"and copy it: cp mpviz/apps/{name}.ipynb notebooks/")


# ---------------------------------------------------------------- the wheel in a venv of its own
@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "mpviz"), str(src)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    wheel = next((tmp / "dist").glob("mpviz-*.whl"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    # pip runs inside the new venv (--python), before it can see any other mpviz.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    # The main venv's packages (not the checkout): its site-packages on the path, after the
    # venv's own; .pth files inside it (the editable mpviz) are not run from there.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "main-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Voila's templates, the widget extensions and the kernel spec, as their wheels install them.
    (env_dir / "share").mkdir()
    (env_dir / "share" / "jupyter").symlink_to(Path(sys.prefix) / "share" / "jupyter")
    return env_dir


def user_env(venv: Path) -> dict[str, str]:
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MPVIZ_RUNS_DIR", "MPVIZ_RUN", "MPVIZ_COMPARE",
            "MPVIZ_LAB_MODEL", "MPVIZ_CWD")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_wheel_installs_mpviz_with_its_apps_and_a_version(venv, tmp_path):
    env = user_env(venv)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mpviz, mpviz.serve as s; print(mpviz.__file__); "
         "print(*sorted(p.name for p in s.APPS_DIR.glob('*.ipynb')))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(where[0]).is_relative_to(venv) and not Path(where[0]).is_relative_to(ROOT)
    assert where[1].split() == sorted(f"{a}.ipynb" for a in APPS)
    version = subprocess.run(["mpviz", "--version"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
    wheel = next((venv.parent / "dist").glob("mpviz-*.whl"))
    assert version == f"mpviz {wheel.name.split('-')[1]}"


# ---------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), rest[19], rest[0]


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`: {pid: start time} (the time tells a reused pid apart)."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, start, _) in stats.items():
            if ppid == parent and child not in found:
                found[child] = start
                todo.append(child)
    return found


def still_running(procs: dict[int, str]) -> list[str]:
    left = []
    for pid, start in procs.items():
        s = _stat(pid)
        if s and s[1] == start and s[2] != "Z":
            left.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
    return left


def kernels(pid: int) -> dict[int, str]:
    procs = descendants(pid)
    return {p: t for p, t in procs.items()
            if "ipykernel" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")}


@contextlib.contextmanager
def served(venv: Path, *args: str, cwd: Path, stop=signal.SIGTERM):
    """`mpviz <args> --no-browser --port P` run from `cwd` in its own process group, until it
    answers; yields (process, url, log). On leaving: `stop` to the group (as a terminal's Ctrl-C
    or a service manager would), then every process it started must be gone."""
    port = free_port()
    log = cwd.parent / f"mpviz-{args[0]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["mpviz", *args, "--no-browser", "--port", str(port)], cwd=cwd,
                                env=user_env(venv), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(url + "api/status", timeout=2)
        except urllib.error.HTTPError:
            return True   # it answers
        except OSError:
            return False
        return True

    try:
        assert wait_for(up, timeout=60, every=0.2), log.read_text()
        assert f"mpviz {args[0]}: {url}" in log.read_text()
        yield proc, url, log
        procs = descendants(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, stop)
        proc.wait(60)
        print(f"  mpviz {args[0]} stopped in {time.monotonic() - t0:.1f} s")
        assert proc.returncode == 0, log.read_text()
        # Gone when the server is: shut down by it, not left to notice later that it died.
        assert not still_running(procs), still_running(procs)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_ctrl_c_stops_the_server_and_its_kernels(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with served(venv, "lab", cwd=work, stop=signal.SIGINT) as (proc, url, log):
        page = urllib.request.urlopen(url, timeout=120).read().decode()  # runs the notebook in a kernel
        assert "application/vnd.jupyter.widget-view+json" in page and "Traceback" not in page
        assert kernels(proc.pid), "the page started no kernel"
    assert "stopping the server and its kernels" in log.read_text()


# ---------------------------------------------------------------- in Chromium
@pytest.fixture(scope="module")
def browser():
    """conftest's `browser`, but required under CI only (no screenshots are taken here)."""
    why = missing()
    if why:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (required under CI)", pytrace=False)
        pytest.skip(why)
    with chromium() as b:
        yield b


class Page:
    """A page and what it logged. Not helpers.browser.Page: no screenshots or request log, a
    longer first load (the served apps start their kernel then), and one `no_errors` check."""

    def __init__(self, browser, url: str):
        self.console: list[str] = []
        self.page = browser.new_page(viewport={"width": 1500, "height": 1000})
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(url, timeout=180_000)

    def trace_len(self, meta: str) -> int:
        return self.page.evaluate(
            """(meta) => { const gd = document.querySelector('.js-plotly-plot.mpviz-figure, .mpviz-figure .js-plotly-plot');
                 if (!gd || !gd.data) return -1;
                 const t = gd.data.find(t => t.meta === meta);
                 return t && t.x ? t.x.length : -1; }""", meta)

    def plots_drawn(self) -> int:
        """Plots on the page with at least one trace holding data (arrays, or plotly's binary
        {dtype, bdata} form of numpy arrays)."""
        return self.page.evaluate(
            """() => { const n = v => v ? (v.length || (v.bdata ? v.bdata.length : 0)) : 0;
                 return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(
                   gd => (gd.data || []).some(t => n(t.x) || n(t.y) || n(t.z))).length; }""")

    def wait(self, cond, what: str, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}; console: {self.console[-10:]}"
            self.page.wait_for_timeout(250)
        print(f"  waited {time.monotonic() - t0:5.1f} s for {what}")

    def no_errors(self) -> None:
        stderr = self.page.locator("[data-mime-type='application/vnd.jupyter.stderr']")
        assert stderr.count() == 0, stderr.all_inner_texts()
        assert self.page.locator(".jp-OutputArea-output [data-mime-type*='error']").count() == 0
        ours = [m for m in self.console if m.startswith(("error", "pageerror")) and not HARMLESS.search(m)]
        assert not ours, ours


@pytest.fixture
def work(tmp_path) -> Path:
    """The empty folder a user types the command in."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_lab_with_your_model_trains_and_ctrl_c_stops_its_training_kernel(venv, browser, work):
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "train.py").write_text(USER_MODEL)
    with served(venv, "lab", "--model", "mypkg.train:lab_parts", cwd=work, stop=signal.SIGINT) as (proc, url, _):
        p = Page(browser, url)
        p.page.wait_for_selector(".mpviz-lab", timeout=180_000)
        assert p.page.locator(".mpviz-lab select", has_text="my-mlp").count() == 1   # the user's model
        p.wait(lambda: p.trace_len("loss:0") == 0, "the empty loss plot")
        steps = p.page.locator(".mpviz-max-steps input")
        steps.fill("1000000")   # still training when Ctrl-C comes
        steps.press("Enter")
        p.page.get_by_role("button", name="Start").click()
        p.wait(lambda: p.trace_len("loss:0") >= 5, "the loss curve to grow")
        assert "running" in p.page.locator(".mpviz-status").inner_text()
        assert [d.name.startswith("lab-") for d in (work / "runs").iterdir()] == [True]
        p.no_errors()
        assert kernels(proc.pid)
        # leaving `served`: Ctrl-C while the kernel trains; nothing may be left running


def test_explore_one_run(venv, browser, work, dash_two_runs):
    _, a, _ = dash_two_runs
    with served(venv, "explore", str(a), cwd=work) as (_, url, _):
        p = Page(browser, url)
        p.page.wait_for_selector(".mpviz-explorer .mpviz-step-count", timeout=180_000)
        p.wait(lambda: p.trace_len("loss:0") == 30, "the run's 30 steps")
        assert p.page.locator(".mpviz-run-picker select option:checked").inner_text() == a.name
        p.no_errors()


def test_compare_two_runs(venv, browser, work, dash_two_runs):
    _, a, b = dash_two_runs
    with served(venv, "compare", str(a), str(b), cwd=work) as (_, url, _):
        p = Page(browser, url)
        p.page.wait_for_selector(".mpviz-compare .mpviz-diff-table table", timeout=180_000)
        p.wait(lambda: p.trace_len("loss-step:0") == 30 and p.trace_len("loss-step:1") == 30,
               "two loss curves of 30 steps")
        p.no_errors()


def test_tour(venv, browser, work):
    with served(venv, "tour", cwd=work) as (_, url, _):
        p = Page(browser, url)
        p.page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        p.wait(lambda: p.plots_drawn() >= 6, "the tour's six pictures", timeout=420)  # it trains 5 runs
        assert len(list((work / "runs").glob("tour-*"))) == 5
        p.no_errors()


def test_report_from_the_wheel_opens_offline(venv, browser, work, dash_two_runs):
    """`mpviz report RUN -o run.html` from the installed wheel, then opened in Chromium with
    every request but the file itself blocked: no error, the run's 30 steps drawn."""
    _, a, _ = dash_two_runs
    out = work / "run.html"
    subprocess.run(["mpviz", "report", str(a), "-o", str(out)], cwd=work, env=user_env(venv),
                   check=True, capture_output=True, text=True, timeout=300)
    with offline(browser, out) as (page, requests, errors):
        loss = page.evaluate("() => document.querySelector('.js-plotly-plot').data"
                             ".find(t => t.meta === 'loss').x.length")
    assert errors == [] and requests == [out.as_uri()]
    assert loss == 30
