"""The lab's speed estimate in a real browser (Voila + Chromium): train a few steps, read this
machine's measured speed and the estimate for an H100, pick an A100 in the "predicted on" menu
and see the estimate change to the A100's. The figures are checked against `mpviz.cost.predict`
over the counts saved with the run. Then the trade-off front: its button, its scatter. The
harness is tests/helpers/browser.py."""

from __future__ import annotations

import mpviz
from mpviz.cost import load_counts, predict
from mpviz.dashboard.estimate_panel import step_time
from helpers.browser import Page, fill, voila


def test_lab_shows_the_predicted_speed_for_the_gpu_picked(browser, shots, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with voila("lab.ipynb", runs) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-lab", timeout=180_000)
        status, panel = page.locator(".mpviz-status"), page.locator(".mpviz-estimate")
        p.wait(lambda: "Press Start" in panel.inner_text(), what="the estimate panel before Start")
        # The text model at batch 128 in fp32: big enough that an A100 and an H100 differ.
        for menu, value in ((".mpviz-task", "text"), (".mpviz-precision", "fp32")):
            page.locator(f"{menu} select").select_option(value)
        page.locator(".widget-dropdown", has_text="batch").locator("select").select_option("128")
        p.wait(lambda: "ready: text, fp32" in status.inner_text(), what="the text model in fp32")
        fill(page, ".mpviz-max-steps", 3)
        page.get_by_role("button", name="Start").click()
        p.wait(lambda: "done" in status.inner_text(), what="the step limit")

        run_dir = next(runs.glob("lab-*-text-fp32*"))
        counts = load_counts(run_dir)
        assert counts is not None
        measured = mpviz.load_run(run_dir).steps["step_time_s"].median()
        predicted = page.locator(".mpviz-estimate .mpviz-predicted")
        for gpu, title in (("h100", "NVIDIA H100 SXM 80GB"), ("a100", "NVIDIA A100 SXM 80GB")):
            if gpu != "h100":
                page.locator(".mpviz-gpu select").select_option(label=title)
            want = f"{step_time(predict(counts, 'fp32', gpu).step_time_s)}/step"
            p.wait(lambda: f"estimate for {title}" in panel.inner_text()
                   and predicted.inner_text() == want, what=f"the estimate for the {gpu}")
            text = panel.inner_text()
            assert f"measured here (CPU): {step_time(measured)}/step" in text
            assert "1.00× the speed of fp32" in text   # the policy in force is fp32
        assert predict(counts, "fp32", "a100").step_time_s > predict(counts, "fp32", "h100").step_time_s
        # Each layer's share of the predicted step on the GPU picked, in the layer table.
        est = predict(counts, "fp32", "a100")
        rows = est.layers.set_index("layer")
        word = {"compute": "compute", "memory": "memory", "overhead": "launch"}[rows.loc["head", "bound"]]
        share = f"{rows.loc['head', 'time_s'] / est.step_time_s:.0%} {word}"
        head = page.locator(".mpviz-layer-row").filter(has=page.get_by_text("head", exact=True))
        p.wait(lambda: head.locator(".mpviz-share").inner_text() == share, what="head's share")
        p.shoot(".mpviz-lab", "lab-estimate.png")

        # The trade-off front of the MLP (seconds of probes here): a scatter with the front.
        page.locator(".mpviz-task select").select_option("mlp")
        p.wait(lambda: "ready: mlp, fp32" in status.inner_text(), what="the MLP")
        page.get_by_role("button", name="Search the trade-off front").click()
        front = """() => { const gd = document.querySelector('.mpviz-front-plot .js-plotly-plot');
                       if (!gd || !gd.data) return null;
                       return gd.data.map(t => [t.meta, Array.from(t.text || []), Array.from(t.x || [])]); }"""
        p.wait(lambda: page.evaluate(front), timeout=300, what="the trade-off front's scatter")
        drawn = {name: (meta, x) for meta, text, xs in page.evaluate(front)
                 for label, x in zip(text, xs) for name in label.split(", ")}
        assert drawn["fp32"] == ("front:on the front", 1.0)
        assert {"fp32", "bf16", "fp16", "advised"} <= set(drawn)
        table = page.locator(".mpviz-front-table")
        assert "predicted speedup" in table.inner_text() and "fp8 linears" in table.inner_text()
        assert "estimate for NVIDIA A100 SXM 80GB" in page.locator(".mpviz-front-status").inner_text()
        page.wait_for_timeout(800)
        p.shoot(".mpviz-lab", "lab-front.png")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()
