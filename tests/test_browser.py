"""The apps in a real browser: Voila serves each notebook on localhost, Playwright drives
Debian's headless Chromium (never `playwright install`: no downloads here). The harness is
tests/helpers/browser.py; its `browser` and `shots` fixtures come through tests/conftest.py.

One Voila server per test. Screenshots go to pytest's temporary folder, so running the tests
changes no tracked file; `make screenshots` sets `MPVIZ_SCREENSHOTS=docs` to refresh the ones the
README shows.

Without Chromium or Playwright these tests skip, saying how to install them, except where they
are required: under CI (`CI=true`) or when screenshots were asked for, they fail instead.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request

import mpviz
from helpers.browser import Page, fill, toggle_at_pause, voila
from helpers.training import demo_process


def test_lab_trains_live_and_shows_a_layer_toggle(browser, shots, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    pause_at, max_steps = 30, 150
    with voila("lab.ipynb", runs) as url:
        # A visit that never presses Start (a curl; Voila runs the notebook for it) records nothing.
        assert b"mpviz" in urllib.request.urlopen(url, timeout=180).read()
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-lab", timeout=180_000)
        p.wait(lambda: p.trace_len("loss:0") == 0, what="the empty loss plot")
        assert list(runs.iterdir()) == []
        fill(page, ".mpviz-max-steps", max_steps)
        fill(page, ".mpviz-pause-at", pause_at)
        page.get_by_role("button", name="Start").click()
        status = page.locator(".mpviz-status")
        p.wait(lambda: len(list(runs.iterdir())) == 1, what="Start to claim one run directory")

        # The lab pauses itself after `pause_at` steps (whatever the machine's speed), drawn so far.
        p.wait(lambda: "paused" in status.inner_text(), what="the lab to pause by itself")
        assert f"step {pause_at} / {max_steps}" in status.inner_text()
        toggle_at_pause(p, "head", "fp32", pause_at)
        marks = p.trace("marks:0")
        step = marks["x"][[i for i, h in enumerate(marks["hovertext"]) if "head → fp32" in h][0]]
        assert step == pause_at   # toggled while paused: it took effect at the next step

        # The recorded run agrees: the change is in run.policy_changes at that step.
        run_dir = next(runs.glob("lab-*"))
        changes = mpviz.load_run(run_dir).policy_changes
        head = changes[(changes["layer"] == "head") & (changes["precision"] == "fp32")]
        assert head["step"].tolist() == [pause_at]

        p.wait(lambda: "done" in status.inner_text() and p.trace_len("loss:0") == max_steps,
               what="the step limit")
        page.wait_for_timeout(800)
        p.shoot(".mpviz-lab", "lab.png")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()


def test_explorer_follows_a_run_another_process_writes(browser, shots, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    run_dir = runs / "live-text-bf16"
    trainer = demo_process(run_dir, task="text", precision="bf16", steps=100000,
                           stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if mpviz.load_run(run_dir).last_step >= 5:
                    break
            except mpviz.RunStoreError:
                pass   # not created yet, or its first commit is still pending
            assert trainer.poll() is None and time.monotonic() < end, "the demo process did not start"
            time.sleep(0.3)
        with voila("explorer.ipynb", runs) as url:
            p = Page(browser, url, shots)
            page = p.page
            page.wait_for_selector(".mpviz-explorer .mpviz-step-count", timeout=180_000)
            count = lambda: int(page.locator(".mpviz-step-count").inner_text())  # noqa: E731
            n1 = count()
            p.wait(lambda: count() > n1 + 10, what="the step count to grow")
            assert trainer.poll() is None      # ... while the other process is still writing
            # The curve follows (decimated to <= 2000 points: compare the last step drawn).
            p.wait(lambda: max(p.trace("loss:0")["x"] or [0]) >= n1, what="the loss curve to follow")
            page.locator(".mpviz-layer-pick select").select_option(label="blocks.0.attn.qkv")
            page.wait_for_selector(".mpviz-drill .js-plotly-plot", timeout=30_000)
            page.wait_for_timeout(1500)
            p.shoot(".mpviz-explorer", "explorer.png")
            p.no_python_errors_shown()
            assert not p.our_errors(), p.our_errors()
            p.offline_ok()
            page.close()
    finally:
        trainer.kill()
        trainer.wait(30)


def test_compare_shows_two_runs(browser, shots, dash_two_runs):
    root, a, b = dash_two_runs
    with voila("compare.ipynb", root) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-compare .mpviz-diff-table table", timeout=180_000)
        p.wait(lambda: p.trace_len("loss-step:0") == 30 and p.trace_len("loss-step:1") == 30,
               what="two loss curves of 30 steps")
        assert p.trace("loss-step:2")["visible"] is False
        page.wait_for_timeout(800)
        p.shoot(".mpviz-compare", "compare.png")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()
