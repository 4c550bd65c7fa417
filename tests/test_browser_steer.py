"""Steering a training process from the explorer, in a real browser (Voila + Chromium).

The job is started the way users start one (``python tests/train_script.py RUN_DIR``: fp16 autocast,
a GradScaler, ``Recorder(..., steerable=True)``). While a hold file keeps it between two steps,
the test picks fp32 for the ``head`` layer in the explorer's menu and sees the request pending;
released, the job applies it at its next step and the page shows "applied at step N" and the ★ on
the loss curve at N, which is where ``run.policy_changes`` has it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mpviz
from helpers.browser import Page, voila

ROOT = Path(__file__).resolve().parents[1]


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return
        except mpviz.RunStoreError:
            pass   # the store is being created
        assert proc.poll() is None, f"the training process exited before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_explorer_steers_a_training_process(browser, shots, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    run_dir = runs / "job"
    hold = run_dir.with_suffix(".hold")
    job = subprocess.Popen([sys.executable, "tests/train_script.py", str(run_dir), "--max-steps",
                            "100000", "--max-seconds", "400", "--sleep", "0.05"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: mpviz.load_run(run_dir).last_step >= 3, 120, "the job's first steps", job)
        with voila("explorer.ipynb", runs) as url:
            p = Page(browser, url, shots)
            page = p.page
            page.wait_for_selector(".mpviz-explorer .mpviz-steer .mpviz-steer-row", timeout=180_000)
            row = page.locator(".mpviz-steer-row", has_text="head")

            # Hold the job between two steps (until its step count stops moving).
            hold.touch()
            run = mpviz.load_run(run_dir)
            last = [-1, time.monotonic()]

            def settled() -> bool:
                n = run.last_step
                if n != last[0]:
                    last[:] = [n, time.monotonic()]
                return time.monotonic() - last[1] > 1.5
            _wait(settled, 60, "the job to hold", job)

            row.locator("select").select_option("fp32")
            p.wait(lambda: "pending" in row.inner_text(), what="the request shown as pending")
            reqs = run.steer_requests
            assert reqs["status"].tolist() == ["pending"] and reqs["rules"][0] == {"head": "fp32"}
            p.wait(lambda: "pending" in page.locator(".mpviz-steer-requests").inner_text(),
                   what="the request table")

            hold.unlink()   # the job goes on: the request is applied at its next step boundary
            p.wait(lambda: "applied at step" in row.inner_text(), what="the request applied")
            n = int(re.search(r"applied at step (\d+)", row.inner_text()).group(1))
            assert "fp32" in row.inner_text()
            _wait(lambda: n in set(run.policy_changes["step"]), 30, "run.policy_changes", job)
            changes = run.policy_changes
            assert changes[changes["layer"] == "head"][["step", "precision"]].values.tolist() \
                == [[n, "fp32"]]
            assert mpviz.steer_status(run_dir, 1)["step"] == n

            # A typo is refused by the job, with the reason, in the page.
            page.locator(".mpviz-steer-rule input").fill("haed")
            page.get_by_role("button", name="Send").click()
            table = page.locator(".mpviz-steer-requests")
            p.wait(lambda: "refused" in table.inner_text(), what="the typo refused")
            assert "Close matches: 'head'" in table.inner_text()
            assert run.steer_requests["status"].tolist() == ["applied", "refused"]
            # A healthy job: the Diagnosis panel's "Apply advice" is there, disabled, saying why
            # (tests/test_steer_advice.py sends advice to a failing job).
            p.wait(lambda: "the advice changes nothing" in
                   page.locator(".mpviz-advice-offer").inner_text(), what="the advice not offered")
            assert page.locator("button.mpviz-apply-advice").is_disabled()

            page.wait_for_timeout(500)
            p.shoot(".mpviz-explorer", "explorer-steer.png")
            p.no_python_errors_shown()
            assert not p.our_errors(), p.our_errors()
            p.offline_ok()
            # The ★ on the page's loss curve at step n (the explorer draws run.policy_changes).
            p.wait(lambda: any("head → fp32" in h for h in (p.trace("marks:0") or {}).get("hovertext", [])),
                   timeout=60, what="the ★ on the loss curve")
            marks = p.trace("marks:0")
            assert marks["x"] == [n]
            page.close()
        run_dir.with_suffix(".stop").touch()
        assert job.wait(60) == 0
        assert mpviz.load_run(run_dir).meta["status"] == "finished"
    finally:
        hold.unlink(missing_ok=True)
        if job.poll() is None:
            job.kill()
        job.wait(30)
