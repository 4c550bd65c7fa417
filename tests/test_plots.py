"""The run figure, kernel side: non-finite losses marked, samples/s smoothed, updates bounded.

Real recorded runs (demo tasks, a few dozen steps); references computed independently (the
store's own rows, pandas' rolling median, a loop over heatmap columns).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mpviz
from helpers.training import one_thread, record_demo
from mpviz.dashboard import queries
from mpviz.dashboard.plots import SPEED_WINDOW, RunFigure, cap_columns, rolling_median
from waiting import wait_for


def _show(fig: RunFigure, run, slot: int = 0, max_points: int = 2000, detail: bool = True):
    snap = queries.snapshot(run, max_points=max_points, detail=detail)
    fig.update(slot, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)


def _sent(fig: RunFigure) -> list[int]:
    """Bytes of every update the live widget sent to the page (its last 100)."""
    return fig.widget.sent


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """fp16 + GradScaler at lr 5: the loss is NaN from step 1 on (every step skipped)."""
    run_dir = tmp_path_factory.mktemp("nan") / "mlp-fp16-lr5"
    with one_thread():
        record_demo(run_dir, task="mlp", precision="fp16", lr=5.0, seed=0, steps=20, every=5)
    return run_dir


def test_nonfinite_losses_are_marked_where_they_happen(nan_run):
    run = mpviz.load_run(nan_run)
    steps = run.steps
    bad = steps.loc[~np.isfinite(steps["loss"].to_numpy(float)), "step"].astype(int).tolist()
    assert len(bad) >= 15 and 0 not in bad      # the reference: the store's own rows
    fig = RunFigure()
    _show(fig, run)
    marks = fig.trace("nonfinite", 0)
    assert [int(x) for x in marks.x] == bad
    assert list(marks.hovertext) == [f"loss = nan/inf at step {s}" for s in bad]
    # Along the top of the loss plot: the hidden [0, 1] axis overlaid on the loss axis.
    assert marks.yaxis == "y4" and np.all(np.asarray(marks.y) > 0.9)
    assert fig.figure.layout.yaxis4.overlaying == "y" and list(fig.figure.layout.yaxis4.range) == [0, 1]
    # The loss line itself keeps its one finite point; the loss scale halves on each skip.
    assert np.isfinite(np.asarray(fig.trace("loss", 0).y)).sum() == len(steps) - len(bad)

    # Decimated (2 steps per point): a point whose steps all had nan names its steps.
    _show(fig, run, max_points=10)
    marks = fig.trace("nonfinite", 0)
    assert [int(x) for x in marks.x] == [s for s in range(2, 20, 2)]
    assert marks.hovertext[0] == "loss = nan/inf at steps 2–3"
    fig.clear()
    assert len(fig.trace("nonfinite", 0).x) == 0
    run.close()


def test_samples_per_s_is_a_rolling_median_with_raw_values_on_hover(tmp_path):
    with one_thread():
        run_dir = record_demo(tmp_path / "mlp", task="mlp", steps=40, every=5)
    run = mpviz.load_run(run_dir)
    raw = run.steps.sort_values("step")["samples_per_s"].to_numpy(float)
    fig = RunFigure()
    _show(fig, run)
    speed = fig.trace("speed", 0)
    ref = pd.Series(raw).rolling(SPEED_WINDOW, min_periods=1).median().to_numpy()
    np.testing.assert_allclose(np.asarray(speed.y, float), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(speed.customdata, float), raw, rtol=1e-6)  # hover: raw
    assert "%{customdata" in speed.hovertemplate
    # Statistics steps (every 5th) dip; the median line does not follow single dips.
    with_nan = raw.copy()
    with_nan[[3, 4, 5]] = np.nan
    np.testing.assert_allclose(rolling_median(with_nan, 4),
                               pd.Series(with_nan).rolling(4, min_periods=1).median().to_numpy())
    run.close()


def test_updates_are_bounded_and_heatmaps_leave_the_live_widget(tmp_path):
    with one_thread():
        run_dir = record_demo(tmp_path / "mlp", task="mlp", steps=600, every=50)
    run = mpviz.load_run(run_dir)
    fig = RunFigure(max_heat_cells=60)
    msgs = _sent(fig)
    first = len(msgs)
    sizes = {}
    for n in (100, 600):
        snap = queries.snapshot(run, 0, n - 1, max_points=150)
        fig.update(0, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
        sizes[n] = msgs[-1]
        assert len(fig.trace("loss", 0).x) <= 150 and len(fig.trace("speed", 0).y) <= 150
    # Up to 150 points x (x, loss, x, median, raw, x, scale) at 4-8 B each, plus JSON framing.
    assert sizes[100] < 100 * 64 + 2000 and sizes[600] <= 150 * 64 + 2000, sizes  # float64 points
    # An update whose data did not change sends nothing at all.
    fig.update(0, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
    assert len(msgs) == first + 2
    # The heatmaps never travel with the live widget, and are re-sent only when they change.
    assert all(t.type == "scatter" for t in fig.figure.data)
    heat = fig.trace("grads")
    assert np.asarray(heat.z).size <= 60 and len(heat.y) == len(snap.heat.layers)
    shown = fig.detail_out.outputs
    fig.update(0, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
    assert fig.detail_out.outputs is shown
    sent = shown[0]["data"]["application/vnd.plotly.v1+json"]
    assert [t["meta"] for t in sent["data"]] == ["dtypes", "grads"]
    run.close()


def test_cap_columns_merges_neighbours_by_max():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 53))
    z[2, 10:20] = np.nan
    steps = np.arange(53) * 10
    s, capped = cap_columns(steps, z, 7 * 10)
    k = 6  # ceil(53 / 10)
    assert capped.shape == (7, 9) and s.tolist() == steps[::k].tolist()
    for c in range(capped.shape[1]):
        block = z[:, c * k:(c + 1) * k]
        for r in range(7):
            vals = block[r][np.isfinite(block[r])]
            assert (np.isnan(capped[r, c]) if len(vals) == 0 else capped[r, c] == vals.max())
    same_s, same = cap_columns(steps, z, 10_000)
    assert same is z and same_s is steps


def test_compare_smooths_samples_per_s_too(tmp_path):
    from mpviz.dashboard.plots import CompareFigure

    with one_thread():
        run_dir = record_demo(tmp_path / "mlp", task="mlp", steps=30, every=5)
    run = mpviz.load_run(run_dir)
    snap = queries.snapshot(run, detail=False)
    fig = CompareFigure(n_slots=2)
    fig.show([("a", snap.steps, snap.skipped)])
    raw = run.steps.sort_values("step")["samples_per_s"].to_numpy(float)
    t = fig.trace("samples_per_s-step:0")
    ref = pd.Series(raw).rolling(SPEED_WINDOW, min_periods=1).median().to_numpy()
    np.testing.assert_allclose(np.asarray(t.y, float), ref, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(t.customdata, float), raw, rtol=1e-9)
    run.close()


class _Clock:
    """The monotonic clock plots.py reads, moved by the test (the Timer still waits for real)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_heatmaps_are_sent_at_most_every_detail_every_s_and_the_last_state_arrives(tmp_path,
                                                                                monkeypatch):
    from mpviz.dashboard import plots

    with one_thread():
        run_dir = record_demo(tmp_path / "mlp", task="mlp", steps=30, every=5)
    run = mpviz.load_run(run_dir)
    clock = _Clock()
    monkeypatch.setattr(plots, "time", clock)
    fig = RunFigure(detail_every_s=1.0)
    first = fig.detail_out.outputs                       # the empty heatmaps, sent at once
    for hi in (9, 19, 29):                               # three changes, no time passing
        snap = queries.snapshot(run, 0, hi)
        fig.update(0, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
    assert fig.detail_out.outputs is first               # held back...
    clock.now += 1.0                                     # the interval is up

    def latest_sent() -> bool:
        if fig.detail_out.outputs is first:
            return False
        sent = fig.detail_out.outputs[0]["data"]["application/vnd.plotly.v1+json"]
        grads = [t for t in sent["data"] if t["meta"] == "grads"][0]
        return grads["x"][-1] == int(snap.heat.steps[-1])

    assert wait_for(latest_sent)                         # ...then the latest one arrives
    run.close()
