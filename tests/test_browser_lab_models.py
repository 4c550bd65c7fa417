"""The lab with a user's own model in a real browser: `tests/lab_models.ipynb` builds a Hugging
Face BERT from a config and calls `lab_app(model=..., optimizer=..., loss_fn=..., data=...)`;
Voila serves it and Chromium drives it (harness and fixtures from test_browser.py).
"""

from __future__ import annotations

import mpviz

from test_browser import Page, _fill, browser, shots, toggle_at_pause, voila  # noqa: F401  (fixtures)


def classifier_to_bf16_at_pause(p: Page, runs, status, pause_at: int, max_steps: int) -> None:
    """At the pause, set the BERT's `classifier` to bf16 from its dropdown; when the run is done,
    the curve has every step and the run records the change at exactly that step."""
    toggle_at_pause(p, "classifier", "bf16", pause_at)
    p.wait(lambda: "done" in status.inner_text() and p.trace_len("loss:0") == max_steps,
           what="the step limit")
    run = mpviz.load_run(next(runs.glob("lab-*BertForSequenceClassification*")))
    changes = run.policy_changes
    cls = changes[(changes["layer"] == "classifier") & (changes["precision"] == "bf16")]
    assert cls["step"].tolist() == [pause_at]
    assert len(run.steps) == max_steps
    run.close()


def test_lab_trains_your_model_and_shows_a_layer_toggle(browser, shots, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    runs.mkdir()
    pause_at, max_steps = 10, 30
    with voila("../tests/lab_models.ipynb", runs) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-lab", timeout=180_000)
        assert "BertForSequenceClassification" in page.locator(".mpviz-task").inner_text()
        p.wait(lambda: p.trace_len("loss:0") == 0, what="the empty loss plot")
        _fill(page, ".mpviz-max-steps", max_steps)
        _fill(page, ".mpviz-pause-at", pause_at)
        page.get_by_role("button", name="Start").click()
        status = page.locator(".mpviz-status")

        classifier_to_bf16_at_pause(p, runs, status, pause_at, max_steps)
        page.wait_for_timeout(500)
        p.shoot(".mpviz-lab", "lab-your-model.png")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()
