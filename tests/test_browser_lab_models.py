"""The lab with a user's own model in a real browser: `tests/lab_models.ipynb` builds a Hugging
Face BERT from a config and calls `lab_app(model=..., optimizer=..., loss_fn=..., data=...)`;
Voila serves it and Chromium drives it (harness: tests/helpers/browser.py).
"""

from __future__ import annotations

from helpers.browser import Page, classifier_to_bf16_at_pause, fill, voila


def test_lab_trains_your_model_and_shows_a_layer_toggle(browser, shots, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    pause_at, max_steps = 10, 30
    with voila("../tests/lab_models.ipynb", runs) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-lab", timeout=180_000)
        assert "BertForSequenceClassification" in page.locator(".mpviz-task").inner_text()
        p.wait(lambda: p.trace_len("loss:0") == 0, what="the empty loss plot")
        fill(page, ".mpviz-max-steps", max_steps)
        fill(page, ".mpviz-pause-at", pause_at)
        page.get_by_role("button", name="Start").click()
        status = page.locator(".mpviz-status")

        classifier_to_bf16_at_pause(p, runs, status, pause_at, max_steps)
        page.wait_for_timeout(500)
        p.shoot(".mpviz-lab", "lab-your-model.png")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()
