"""A teaching scenario in a real browser (Voila + Chromium): pick "an activation past fp16's
range" in the lab's Scenario menu, read its explanation, Start, and see the Diagnosis panel name a
forward overflow in `big`; tick "with the fix" and the fixed run's Diagnosis finds nothing above
info. The recorded runs agree (`mpviz.diagnose`)."""

from __future__ import annotations

import mpviz
from mpviz.scenarios import SCENARIOS
from helpers.browser import Page, voila


def test_lab_scenario_is_diagnosed_in_the_page_and_its_fix_is_clean(browser, shots, tmp_path):
    sc = SCENARIOS["fp16-overflow"]
    runs = tmp_path / "runs"
    runs.mkdir()
    with voila("lab.ipynb", runs) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-lab", timeout=180_000)
        page.locator(".mpviz-scenario select").select_option(label=sc.title)
        note = page.locator(".mpviz-scenario-note")
        status = page.locator(".mpviz-status")
        p.wait(lambda: sc.title in note.inner_text() and "fp16-overflow" in status.inner_text(),
               what="the scenario's explanation and its run")
        assert "forward_overflow" in note.inner_text() and "The fix" in note.inner_text()
        page.get_by_role("button", name="Start").click()
        finding = page.locator(".mpviz-finding", has_text="forward_overflow")
        p.wait(lambda: finding.count() > 0 and "big" in finding.first.inner_text(),
               what="the Diagnosis naming a forward overflow in big")
        p.wait(lambda: "done" in status.inner_text(), what="the step limit")
        p.shoot(".mpviz-lab", "lab-scenario.png")

        page.locator(".mpviz-scenario-fixed input").check()
        p.wait(lambda: "fixed run" in note.inner_text() and "fp16-overflow-fixed" in status.inner_text(),
               what="the fixed scenario")
        page.get_by_role("button", name="Start").click()
        p.wait(lambda: "done" in status.inner_text(), what="the fixed run's step limit")
        panel = page.locator(".mpviz-diagnosis")
        p.wait(lambda: f"{sc.max_steps} steps" in panel.inner_text()
               and page.locator(".mpviz-sev-error, .mpviz-sev-warning").count() == 0,
               what="a clean diagnosis of the fixed run")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()
    failing = next(runs.glob("lab-*-fp16-overflow-fp16*"))
    fixed = next(runs.glob("lab-*-fp16-overflow-fixed-*"))
    assert mpviz.diagnose(failing).findings[0].layers == ["big"]
    assert mpviz.diagnose(fixed).ok
