"""Does watching training slow it? The lab open in a real Chromium vs the same run headless.

In one run of this script, for each code tree (``after``: this checkout; ``before``: another git
revision's ``mpviz/`` and ``notebooks/``, extracted to a temp folder with ``git archive``):

- Voila serves ``notebooks/lab.ipynb``, headless Chromium opens it (1500 x 1000 px) and picks the
  task and precision; the page stays open for the whole measurement;
- ``headless``: a plain process trains the demo task with the same recorder the lab uses
  (`mpviz.dashboard.worker.make_trainer`, ``every=5``);
- ``lab``: "max steps" is set and Start pressed; the session ends when its run is closed;
- ``--rounds`` lab sessions alternate with headless runs (H L H L ... H), so that each lab
  session is compared with the runs just before and after it: this machine's speed drifts by
  20% within minutes, and a fine interleave cancels most of that. Reported: the median ratio.

Throughput = samples after the first 20 steps / recorded wall time (the ``steps`` table); the
ratio is lab / mean(headless before, headless after). Bytes per update: every websocket frame
the page receives (Playwright ``framereceived``) is timed; frames closer than 80 ms form one
update (one redraw of the figure, status and tables); an update's step is read off the run's
``wall_time``. Reported: the median update size while the run was at steps 50-200 and at
1,000+. Page busy: the page's main-thread task time while training (Chrome DevTools
``Performance.getMetrics`` ``TaskDuration``), per second and per update -- what the page takes
from the cores that train, and less sensitive than samples/s to other load on the machine.

    python benchmarks/live_plots.py                       # this checkout, digits fp32, 3,000 steps, 5 rounds
    python benchmarks/live_plots.py --before HEAD~3 --rounds 6   # also another revision, same sitting
    python benchmarks/live_plots.py --steps 1500 --task text

Needs Debian's Chromium (/usr/bin/chromium) and Playwright (never `playwright install`).
Writes a JSON summary to ``--out`` (default: print only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers.browser import CHROMIUM, CHROMIUM_ARGS, fill, voila  # noqa: E402  (the tests' harness)

WARMUP = 20
GAP_S = 0.08

HEADLESS = """
import sys, mpviz
from mpviz.dashboard.worker import make_trainer
t = make_trainer(sys.argv[1], sys.argv[2], sys.argv[3], every=5, meta={"app": "bench"})
for _ in range(int(sys.argv[4])):
    t.step()
t.close()
print(mpviz.__file__)
"""


def throughput(run_dir: Path) -> tuple[float, int]:
    """samples/s over the run after WARMUP steps, and the number of steps."""
    import mpviz

    run = mpviz.load_run(run_dir)
    s = run.steps
    run.close()
    s = s.sort_values("step")
    tail = s[s["step"] >= WARMUP]
    dt = float(tail["wall_time"].iloc[-1] - tail["wall_time"].iloc[0])
    return float(tail["samples"].iloc[1:].sum()) / dt, len(s)


def headless(tree: Path, task: str, precision: str, steps: int, work: Path) -> float:
    run_dir = work / f"headless-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", HEADLESS, task, precision, str(run_dir), str(steps)],
                         env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    assert out.strip().startswith(str(tree)), f"imported mpviz from {out!r}, not {tree}"
    return throughput(run_dir)[0]


class LabPage:
    """Voila serving ``notebooks/lab.ipynb`` from `tree`, open in Chromium; `run()` trains one
    session (Start, wait for done) and measures it. The page stays open between sessions."""

    def __init__(self, browser, tree: Path, task: str, precision: str, work: Path) -> None:
        self.browser, self.tree, self.task, self.precision = browser, tree, task, precision
        self.runs = work / f"lab-runs-{time.monotonic_ns()}"
        self.runs.mkdir()
        self.frames: list[tuple[float, int]] = []

    def __enter__(self) -> "LabPage":
        os.environ["PYTHONPATH"] = str(self.tree)   # voila() passes os.environ to the kernel
        self._server = voila("lab.ipynb", self.runs)  # the kernel imports mpviz from `tree`
        url = self._server.__enter__()
        page = self.page = self.browser.new_page(viewport={"width": 1500, "height": 1000})
        page.on("websocket", lambda ws: ws.on(
            "framereceived", lambda p: self.frames.append((time.time(), len(p)))))
        page.goto(url, timeout=180_000)
        page.wait_for_selector(".mpviz-lab", timeout=180_000)
        for cls, value in ((".mpviz-task", self.task), (".mpviz-precision", self.precision)):
            page.locator(f"{cls} select").select_option(value)
            page.wait_for_timeout(1500)
        fill(page, ".mpviz-pause-at", 0)
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Performance.enable")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.page.close()
        finally:
            os.environ.pop("PYTHONPATH", None)
            self._server.__exit__(*exc)

    def run(self, steps: int) -> dict:
        page, cdp = self.page, self.cdp
        fill(page, ".mpviz-max-steps", steps)
        page.wait_for_timeout(500)
        before = set(self.runs.glob("lab-*"))
        open_before = {d for d in before if _status(d) == "running"}   # made at page load
        self.frames.clear()
        busy0, t0, cpu0, parts0 = _busy(cdp), time.time(), _cpu(), _busy(cdp, parts=True)
        plot = "() => [window.mpvizPlotMs || 0, window.mpvizPlotDraws || 0]"
        plot_ms0, draws0 = page.evaluate(plot)
        page.get_by_role("button", name="Start").click()
        end = time.monotonic() + 900

        def finished() -> Path | None:   # this session's run, once it is closed
            mine = (set(self.runs.glob("lab-*")) - before) | open_before
            return next((d for d in mine if _status(d) not in (None, "running")), None)

        while (run_dir := finished()) is None and time.monotonic() < end:
            page.wait_for_timeout(500)
        busy, seconds = _busy(cdp) - busy0, time.time() - t0
        cpu = {k: round((v - cpu0[k]) / seconds, 3) for k, v in _cpu().items()}
        parts = {k: round((v - parts0[k]) / seconds, 3) for k, v in _busy(cdp, parts=True).items()}
        plot_ms, draws = (b - a for a, b in zip((plot_ms0, draws0), page.evaluate(plot)))
        page.wait_for_timeout(1000)
        assert run_dir is not None, f"the lab session did not end in 900 s ({self.runs})"
        sps, n = throughput(run_dir)
        assert n == steps, f"the lab ran {n} steps, not {steps}"
        import mpviz

        run = mpviz.load_run(run_dir)
        wall, step = run.steps["wall_time"].to_numpy(), run.steps["step"].to_numpy()
        run.close()
        # Group frames into updates; keep those while training.
        updates: list[tuple[float, int, float]] = []
        for t, size in sorted(self.frames):
            if updates and t - updates[-1][2] < GAP_S:
                t0, b, _ = updates[-1]
                updates[-1] = (t0, b + size, t)
            else:
                updates.append((t, size, t))
        live = [(float(np.interp(t0, wall, step)), b) for t0, b, _ in updates
                if wall[0] <= t0 <= wall[-1]]

        def median_at(lo: float, hi: float) -> float | None:
            sizes = [b for s, b in live if lo <= s <= hi]
            return statistics.median(sizes) if sizes else None

        return {"samples_per_s": sps, "updates": len(live), "bytes_total": sum(b for _, b in live),
                "plot_draws": draws, "plot_busy_s_per_s": plot_ms / 1000 / seconds,
                "cpu_s_per_s": cpu,   # cores used while training: browser, Voila server, kernel
                "page_s_per_s": parts,   # the page's main thread: all tasks, scripts, layout, style
                "page_busy_s_per_s": busy / seconds,
                "page_busy_ms_per_update": 1000 * busy / max(len(live), 1),
                "bytes_per_update_50_200": median_at(50, 200),
                "bytes_per_update_1000_plus": median_at(1000, steps),
                "bytes_per_update_last_500": median_at(steps - 500, steps)}


def _status(run_dir: Path) -> str | None:
    """The run's status ("running", "finished", ...); None while it cannot be read yet."""
    import mpviz

    try:
        run = mpviz.load_run(run_dir)
    except Exception:
        return None
    try:
        return run.meta.get("status")
    finally:
        run.close()


def interleaved(browser, tree: Path, task: str, precision: str, steps: int, rounds: int,
                work: Path) -> dict:
    """`rounds` lab sessions in one open page, each between two headless runs (H L H L ... H),
    so that each ratio is taken against the runs just before and after it."""
    with LabPage(browser, tree, task, precision, work) as page:
        heads = [headless(tree, task, precision, steps, work)]
        labs = []
        for _ in range(rounds):
            labs.append(page.run(steps))
            heads.append(headless(tree, task, precision, steps, work))
    ratios = [r["samples_per_s"] / ((heads[i] + heads[i + 1]) / 2) for i, r in enumerate(labs)]
    last = labs[-1]
    return {**last, "samples_per_s": statistics.median(r["samples_per_s"] for r in labs),
            "lab_samples_per_s": [r["samples_per_s"] for r in labs],
            "headless_samples_per_s": heads, "ratios": ratios, "ratio": statistics.median(ratios),
            "page_busy_s_per_s": statistics.median(r["page_busy_s_per_s"] for r in labs),
            "page_busy_ms_per_update": statistics.median(r["page_busy_ms_per_update"] for r in labs)}


def _cpu() -> dict[str, float]:
    """CPU seconds used so far by the browser's processes, the Voila server and the kernel."""
    import psutil

    out = {"browser": 0.0, "voila server": 0.0, "kernel": 0.0}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        t = proc.info["cpu_times"]
        if t is None:
            continue
        group = ("browser" if "chromium" in (proc.info["name"] or "") or "/chromium" in cmd
                 else "kernel" if "ipykernel_launcher" in cmd
                 else "voila server" if "-m voila" in cmd else None)
        if group:
            out[group] += t.user + t.system
    return out


PARTS = ("ScriptDuration", "LayoutDuration", "RecalcStyleDuration")


def _busy(cdp, parts: bool = False):
    """Seconds the page's main thread has spent in tasks (scripts, layout, paint) so far; with
    ``parts``, also in scripts, layout and style recalculation."""
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    if parts:
        return {k: float(metrics.get(k, 0.0)) for k in ("TaskDuration",) + PARTS}
    return float(metrics["TaskDuration"])


def extract(ref: str, work: Path) -> Path:
    """`mpviz/` and `notebooks/` of git revision `ref`, in a temp folder."""
    tree = work / f"tree-{ref.replace('/', '_')}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", ref, "mpviz", "notebooks"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5, help="lab sessions per code tree, each "
                    "between two headless runs; the ratio reported is their median")
    ap.add_argument("--before", default=None, help="a git revision to measure too (e.g. HEAD)")
    ap.add_argument("--variant", default=None, help="a folder with mpviz/ and notebooks/ to measure too")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    results = {}
    with tempfile.TemporaryDirectory(prefix="mpviz-live-") as tmp, sync_playwright() as p:
        work = Path(tmp)
        trees = {"after": ROOT}
        if args.before:
            trees = {"before": extract(args.before, work), **trees}
        if args.variant:
            trees["variant"] = Path(args.variant).resolve()
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        for name, tree in trees.items():
            res = interleaved(browser, tree, args.task, args.precision, args.steps, args.rounds, work)
            res["load_average_1min"] = os.getloadavg()[0]
            results[name] = res
            print(f"{name}: {json.dumps(res)}", flush=True)
        browser.close()
    print(f"\n{args.task} {args.precision}, {args.steps} steps")
    print("| code | lab samples/s (median) | headless samples/s | ratio: median (each) | bytes/update, steps 50-200 | steps 1000+ "
          "| page busy (main thread) | load avg |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        fmt = lambda b: "–" if b is None else f"{b / 1000:.1f} kB"  # noqa: E731
        heads = ", ".join(f"{h:.0f}" for h in r["headless_samples_per_s"])
        ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"| {name} | {r['samples_per_s']:.0f} | {heads} | {r['ratio']:.2f}x ({ratios}) | "
              f"{fmt(r['bytes_per_update_50_200'])} | {fmt(r['bytes_per_update_1000_plus'])} | "
              f"{100 * r['page_busy_s_per_s']:.0f}% ({r['page_busy_ms_per_update']:.0f} ms/update) | "
              f"{r['load_average_1min']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"task": args.task, "precision": args.precision,
                                              "steps": args.steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
