"""The run figure and the lab's layout in a real browser (Voila + Debian's Chromium).

- The lab adapts to the page's width: at 1,300 px (JupyterLab with its file browser open leaves
  about that much, or less) the layer table wraps below the figure at full width instead of being
  squeezed next to it; at 1,400 px (1400x900) and 1,900 px it sits beside the figure, and at every
  width the rule row's "Apply rule" button lies inside the row and the window, with no sideways
  scrolling.
- Before Start the figure says "press Start" in place of empty axes; training draws the plots.
- A run whose loss is NaN from step 1 shows × marks along the top of the loss plot, with the
  step on hover; the heatmaps are drawn below the live figure.
"""

from __future__ import annotations

import pytest

from helpers.browser import Page, fill, voila
from helpers.training import one_thread, record_demo

MIN_TABLE_PX = 400


def _box(page, selector: str) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not on the page"
    return box


def _placeholder(page) -> dict:
    """The figure's annotation texts and how many x-axis ticks it draws."""
    return page.evaluate(
        """() => ({texts: Array.from(document.querySelectorAll('.mpviz-figure .annotation-text'))
                             .map(a => a.textContent),
                   ticks: document.querySelectorAll('.mpviz-figure .xtick').length})""")


def test_lab_layout_adapts_to_the_page_width(browser, shots, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with voila("lab.ipynb", runs) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-lab .mpviz-layer-row", timeout=180_000)
        # Before Start: a message in place of empty axes (and no heatmaps).
        p.wait(lambda: any("Press Start to train" in t for t in _placeholder(page)["texts"]),
               what="the 'press Start' message")
        assert _placeholder(page)["ticks"] == 0
        assert not page.locator(".mpviz-detail").is_visible()
        for width, height in ((1300, 1000), (1400, 900), (1900, 1000)):
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(800)
            fig, table = _box(page, ".mpviz-figure"), _box(page, ".mpviz-layer-table")
            page.screenshot(path=str(shots / f"lab-{width}px.png"), full_page=True)
            assert table["width"] >= MIN_TABLE_PX, (width, table)
            assert table["x"] + table["width"] <= width + 1, (width, table)   # no sideways scroll
            if width == 1300:   # below the figure
                assert table["y"] >= fig["y"] + fig["height"] - 1, (fig, table)
            else:               # beside it
                assert table["x"] >= fig["x"] + fig["width"] - 1 and table["y"] < fig["y"] + fig["height"]
            # The rule row: its button whole, inside the row and the window; nothing scrolls sideways.
            row, button = _box(page, ".mpviz-rule-row"), _box(page, ".mpviz-rule-apply")
            assert row["x"] - 1 <= button["x"] and button["x"] + button["width"] <= row["x"] + row["width"] + 1, (width, row, button)
            assert 0 <= button["x"] and button["x"] + button["width"] <= width, (width, button)
            assert button["y"] + button["height"] <= row["y"] + row["height"] + 1, (width, row, button)
            scroll = page.evaluate("""() => { const row = document.querySelector('.mpviz-rule-row');
                return {row: [row.scrollWidth, row.clientWidth],
                        side: [row.parentElement.scrollWidth, row.parentElement.clientWidth],
                        page: [document.documentElement.scrollWidth, window.innerWidth]}; }""")
            assert all(sw <= cw for sw, cw in scroll.values()), (width, scroll)

        # Training draws the heatmaps below the live figure (a static plot, re-sent on change).
        fill(page, ".mpviz-max-steps", 20)
        page.get_by_role("button", name="Start").click()
        p.wait(lambda: "done" in page.locator(".mpviz-status").inner_text(), what="20 steps")
        p.wait(lambda: _placeholder(page)["ticks"] > 0, what="the plots' axes")
        assert not any("Press Start" in t for t in _placeholder(page)["texts"])
        p.wait(lambda: page.evaluate(
            """() => { const gd = document.querySelector('.mpviz-detail .js-plotly-plot');
                 const t = gd && gd.data ? gd.data.find(t => t.meta === 'grads') : null;
                 return !!t && t.y.length > 1 && t.z.length === t.y.length; }"""),
            what="the gradient heatmap")
        heat, fig = _box(page, ".mpviz-detail .js-plotly-plot"), _box(page, ".mpviz-figure")
        assert heat["y"] >= fig["y"] + fig["height"] - 1
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        p.offline_ok()
        page.close()


@pytest.fixture
def nan_runs(tmp_path):
    runs = tmp_path / "runs"
    with one_thread():
        record_demo(runs / "mlp-fp16-lr5", task="mlp", precision="fp16", lr=5.0, seed=0, steps=20,
                    every=5)
    return runs


def test_explorer_marks_a_run_whose_loss_is_nan(browser, shots, nan_runs):
    import mpviz

    steps = mpviz.load_run(nan_runs / "mlp-fp16-lr5").steps
    bad = [int(s) for s, l in zip(steps["step"], steps["loss"]) if not l == l]   # NaN != NaN
    assert len(bad) >= 15
    with voila("explorer.ipynb", nan_runs) as url:
        p = Page(browser, url, shots)
        page = p.page
        page.wait_for_selector(".mpviz-explorer", timeout=180_000)
        p.wait(lambda: p.trace_len("nonfinite:0") == len(bad), what="the nan marks")
        marks = p.trace("nonfinite:0")
        assert [int(x) for x in marks["x"]] == bad
        assert marks["hovertext"][0] == f"loss = nan/inf at step {bad[0]}"
        # The marks are drawn (inside the loss plot's area), not just in the data.
        page.wait_for_timeout(500)
        drawn = page.evaluate("""() => { const gd = document.querySelector('.mpviz-figure .js-plotly-plot, .js-plotly-plot.mpviz-figure');
                 return gd.querySelectorAll('.scatterlayer .trace .points path').length; }""")
        assert drawn >= len(bad)
        p.shoot(".mpviz-explorer", "explorer-nan.png")
        p.no_python_errors_shown()
        assert not p.our_errors(), p.our_errors()
        page.close()
