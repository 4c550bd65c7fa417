"""Figures of the apps: a `go.Figure` built once and updated in place under a lock, drawn by a
`LivePlot` (one per app: each ships plotly.js, ~5 MB) or, in the explorer, as a static copy in an
`Output` (see liveplot.py's "Known limit"). The run figure's heatmaps are a static figure
(`show_static`, ~20 B per cell), re-sent only when their data changed. An update costs what the
caller's points cost (`queries.snapshot(max_points=...)`); one that changes no trace sends nothing.

>>> from mpviz.dashboard.plots import RunFigure
>>> fig = RunFigure(n_slots=2)
>>> [t.meta for t in fig.figure.data][:3]
['loss:0', 'marks:0', 'speed:0']
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import warnings

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots
from plotly.utils import PlotlyJSONEncoder

from ..formats import PRECISIONS
from . import queries
from .liveplot import LivePlot

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
SLOT_TRACES = ("loss", "marks", "speed", "scale", "skips", "nonfinite")
SPEED_WINDOW = 9   # samples/s is drawn as a trailing rolling median over this many points
# Colours of the dtype map, one per precision and grey for any other dtype, as bands of a
# colorscale: its cells hold queries.dtype_map's codes (a precision's place in PRECISIONS, 5 for
# other dtypes), drawn from zmin=-0.5 to zmax=5.5 so that code k takes band k.
DTYPE_COLORS = {"fp32": "#c6dbef", "fp16": "#fc9272", "bf16": "#fdd0a2", "fp8_e4m3": "#bcbddc",
                "fp8_e5m2": "#9e9ac8"}
_BANDS = [DTYPE_COLORS[p] for p in PRECISIONS] + ["#d9d9d9"]
DTYPE_COLORSCALE = [[x, c] for k, c in enumerate(_BANDS) for x in (k / len(_BANDS), (k + 1) / len(_BANDS))]


def _arr(values) -> np.ndarray:
    # 1-D float arrays travel as binary buffers (8 B/point) instead of JSON lists.
    return np.asarray(values, dtype=float)


def _log2(values) -> np.ndarray:
    # Loss scales are powers of two: log2 reads as "2^k" and keeps tick labels clean.
    v = _arr(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log2(np.where(v > 0, v, np.nan))
    return out


def _at(x_src: np.ndarray, y_src: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y of a line at the given x (for placing markers on a curve)."""
    ok = np.isfinite(y_src)
    if not ok.any() or len(x) == 0:
        return np.full(len(x), np.nan)
    return np.interp(x, x_src[ok], y_src[ok])


def rolling_median(values, window: int = SPEED_WINDOW) -> np.ndarray:
    """Trailing median over the last `window` values, NaNs ignored (the first values use what
    there is; all-NaN windows give NaN) -- pandas' `rolling(window, min_periods=1).median()`.

    >>> rolling_median([10, 10, 1, 10, 10], 3).tolist()
    [10.0, 10.0, 10.0, 10.0, 10.0]
    """
    v = _arr(values)
    if len(v) == 0:
        return v
    padded = np.concatenate([np.full(window - 1, np.nan), v])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN windows: NaN, as wanted
        return np.nanmedian(windows, axis=1)


def nonfinite_marks(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The points of a loss curve whose loss is nan or inf (`queries.step_view` turns both into
    NaN), with hover texts. A point that averages a bucket of steps is non-finite when its
    steps' losses were all nan or one was inf: the text names the bucket's steps."""
    bad = ~np.isfinite(loss)
    where = np.flatnonzero(bad)
    texts = []
    for i in where:
        first = int(x[i])
        last = int(x[i + 1]) - 1 if i + 1 < len(x) else first
        texts.append(f"loss = nan/inf at step {first}" if last <= first
                     else f"loss = nan/inf at steps {first}–{last}")
    return x[where], texts


def _assign(trace, **props) -> None:
    """Set trace properties, skipping arrays equal to what the trace has (NaN == NaN), so an
    unchanged trace sends nothing (plotly's own check counts NaN as a change)."""
    for name, value in props.items():
        old = trace[name]
        if (isinstance(value, np.ndarray) and old is not None and np.shape(old) == value.shape
                and np.array_equal(np.asarray(old, dtype=float), value, equal_nan=True)):
            continue
        trace[name] = value


def _plain_json(fig: go.Figure) -> str:
    """The figure as JSON with arrays as plain lists (non-finite -> null, a gap): what
    `pio.to_json` writes as base64 typed arrays stays an object in the page's `gd.data`."""
    def plain(v):
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "fc":
                return [float(x) if np.isfinite(x) else None for x in v.tolist()]
            return v.tolist()
        if isinstance(v, dict):
            if "bdata" in v and "dtype" in v:   # plotly's own base64 typed-array spec
                a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
                return plain(a.reshape(v["shape"]) if "shape" in v else a)
            return {k: plain(w) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(w) for w in v]
        return v
    return json.dumps(plain(fig.to_plotly_json()), cls=PlotlyJSONEncoder)


class _Pushed:
    """Mixin: `self.figure` (a go.Figure) drawn by `self.widget`; mutations go through
    `with self.lock, self._pushing():`, which sends what changed once, at the end.

    `widget` is a `LivePlot`, or with `static=True` an `Output` holding a static copy of the
    figure, re-sent whole when it changed (see liveplot.py for why the explorer wants that)."""

    lock: threading.RLock
    widget: LivePlot | widgets.Output
    figure: go.Figure

    def _make_widget(self, static: bool) -> None:
        self.static = static
        self._static_sent: str | None = None
        self.widget = widgets.Output() if static else LivePlot(self.figure)
        if static:
            self._push()

    def _push(self) -> None:
        if not self.static:
            self.widget.push()
            return
        spec = _plain_json(self.figure)
        if spec != self._static_sent:
            self._static_sent = spec
            show_static(self.widget, self.figure, spec)

    @contextlib.contextmanager
    def _pushing(self):
        try:
            yield
        finally:
            self._push()


def _lines_figure(n_slots: int, height: int, width: int | None) -> go.Figure:
    """The run figure's lines: loss (with its marks), samples/s, loss scale (with skipped steps),
    a set of traces per slot."""
    base = make_subplots(
        rows=2, cols=2, specs=[[{"colspan": 2}, None], [{}, {}]],
        subplot_titles=("loss (★ = precision change, × on top = loss nan/inf)",
                        f"samples/s (median of {SPEED_WINDOW} points; hover: raw)",
                        "log2 loss scale (× = skipped step, hover: culprit layer)"),
        vertical_spacing=0.14, horizontal_spacing=0.12, row_heights=[0.55, 0.45],
    )
    for slot in range(n_slots):
        c = COLORS[slot % len(COLORS)]
        show = slot == 0
        base.add_trace(go.Scatter(x=[], y=[], mode="lines", name="run", meta=f"loss:{slot}",
                                  line=dict(color=c), legendgroup=str(slot), visible=show), 1, 1)
        base.add_trace(go.Scatter(x=[], y=[], mode="markers", name="precision change",
                                  meta=f"marks:{slot}", hovertemplate="step %{x}<br>%{hovertext}<extra></extra>",
                                  marker=dict(symbol="star", size=13, color=c, line=dict(width=1, color="black")),
                                  legendgroup=str(slot), showlegend=False, visible=show), 1, 1)
        base.add_trace(go.Scatter(x=[], y=[], mode="lines", name="samples/s", meta=f"speed:{slot}",
                                  line=dict(color=c), legendgroup=str(slot), showlegend=False,
                                  hovertemplate=(f"step %{{x}}<br>%{{y:.0f}} samples/s (median of {SPEED_WINDOW})"
                                                 "<br>raw: %{customdata:.0f}<extra></extra>"),
                                  visible=show), 2, 1)
        base.add_trace(go.Scatter(x=[], y=[], mode="lines", name="loss scale", meta=f"scale:{slot}",
                                  line=dict(color=c, shape="hv"), legendgroup=str(slot),
                                  showlegend=False, visible=show), 2, 2)
        base.add_trace(go.Scatter(x=[], y=[], mode="markers", name="skipped", meta=f"skips:{slot}",
                                  hovertemplate="skipped step %{x}<br>%{hovertext}<extra></extra>",
                                  marker=dict(symbol="x", size=9, color=c), legendgroup=str(slot),
                                  showlegend=False, visible=show), 2, 2)
        # Non-finite losses: × along the top of the loss plot (a hidden [0, 1] axis overlaid
        # on the loss axis), so a run that is NaN from its first step does not look empty.
        base.add_trace(go.Scatter(x=[], y=[], mode="markers", name="loss nan/inf",
                                  meta=f"nonfinite:{slot}", xaxis="x", yaxis="y4",
                                  hovertemplate="%{hovertext}<extra></extra>",
                                  marker=dict(symbol="x", size=9, color=c, line=dict(width=1)),
                                  legendgroup=str(slot), showlegend=False, visible=show))
    base.update_layout(yaxis4=dict(overlaying="y", range=[0, 1], visible=False, fixedrange=True),
                       height=round(height * 0.6), width=width,
                       margin=dict(l=60, r=20, t=40, b=40),
                       legend=dict(orientation="h", y=1.1), uirevision="keep")
    return base


def _detail_figure(height: int) -> go.Figure:
    """The dtype map and the gradient-norm heatmap of the first run."""
    detail = make_subplots(
        rows=1, cols=2, column_widths=[0.28, 0.72], horizontal_spacing=0.16,
        subplot_titles=("dtype map: fp32 blue, bf16 orange,<br>fp16 red, fp8 purple",
                        "gradient norm, log2 (layers × steps)"))
    detail.add_trace(go.Heatmap(z=[[None] * 4], x=list(queries.DTYPE_KINDS), y=[""], meta="dtypes",
                                colorscale=DTYPE_COLORSCALE, zmin=-0.5, zmax=5.5, showscale=False,
                                texttemplate="%{text}", text=[[""] * 4], textfont=dict(size=10),
                                hovertemplate="%{y} %{x}: %{text}<extra></extra>"), 1, 1)
    detail.add_trace(go.Heatmap(z=[[None]], x=[0], y=[""], meta="grads", colorscale="Viridis",
                                colorbar=dict(title="log2"),
                                hovertemplate="%{y}<br>step %{x}<br>log2 |g| = %{z:.2f}<extra></extra>"),
                     1, 2)
    # The dtype map's placeholders would make its axes numeric: fix the types up front.
    detail.update_xaxes(type="category", row=1, col=1)
    detail.update_yaxes(type="category", autorange="reversed")  # first layer on top
    # No fixed width: the page's plotly draws it at the width its output has (a narrow
    # JupyterLab output area would clip a fixed one).
    detail.update_layout(height=height, margin=dict(l=60, r=20, t=60, b=40))
    return detail



class RunFigure(_Pushed):
    """Loss, samples/s, loss scale (+ skipped steps) of up to `n_slots` runs (`figure`, drawn by
    `widget`) and the first run's dtype map and gradient heatmap (`detail`, in `detail_out`,
    columns merged to at most `max_heat_cells`). Put `view` (both) in a layout. Thread-safe."""

    def __init__(self, n_slots: int = 1, height: int = 900, width: int | None = None,
                 max_heat_cells: int = queries.MAX_HEATMAP_CELLS, detail_every_s: float = 0.0,
                 static: bool = False) -> None:
        self.n_slots = n_slots
        self.detail_every_s = detail_every_s
        self.width = width
        self.max_heat_cells = max_heat_cells
        self.lock = threading.RLock()
        self._detail_height = max(260, round(height * 0.4))
        self.figure = _lines_figure(n_slots, height, width)
        self._make_widget(static)
        self._index = {t.meta: i for i, t in enumerate(self.figure.data)}
        self.detail = _detail_figure(self._detail_height)
        self._detail_index = {t.meta: i for i, t in enumerate(self.detail.data)}
        self._detail_sent: str | None = None
        self._detail_at = -np.inf
        self._detail_timer: threading.Timer | None = None
        self.detail_out = widgets.Output()
        self.detail_out.add_class("mpviz-detail")
        # A fixed-width figure keeps its box at most that wide (the widget's own box takes the
        # row); narrower where the page is (LivePlot then draws at the room it has).
        self.view = widgets.VBox([self.widget, self.detail_out],
                                 layout=widgets.Layout(max_width=f"{width + 10}px" if width else None,
                                                       width="100%" if width else None))
        self._show_detail()

    def trace(self, name: str, slot: int | None = None):
        """The trace with meta `name:slot`, or `name` for the heatmaps ("dtypes", "grads")."""
        if slot is None:
            return self.detail.data[self._detail_index[name]]
        return self.figure.data[self._index[f"{name}:{slot}"]]

    def set_labels(self, labels: list[str]) -> None:
        """Name the slots (legend) and hide the unused ones."""
        with self.lock, self._pushing():
            for slot in range(self.n_slots):
                used = slot < len(labels)
                for kind in SLOT_TRACES:
                    t = self.trace(kind, slot)
                    t.visible = used
                    if kind == "loss" and used:
                        t.name = labels[slot]

    @property
    def placeholder(self) -> str | None:
        """The message shown in place of the plots (`set_placeholder`), or None."""
        shown = [a.text for a in self.figure.layout.annotations if a.name == "placeholder"]
        return shown[0] if shown else None

    def set_placeholder(self, text: str | None) -> None:
        """Show `text` in place of the plots (axes, titles, plot areas and heatmaps hidden: empty
        axes before any data read as a broken page), or (None) the plots again."""
        on = text is not None
        with self.lock, self._pushing():
            layout = self.figure.layout
            titles = [a for a in layout.annotations if a.name != "placeholder"]
            for a in titles:
                a.visible = not on
            message = [go.layout.Annotation(name="placeholder", text=text, x=0.5, y=0.6,
                                             xref="paper", yref="paper", showarrow=False,
                                             font=dict(size=16))] if on else []
            layout.annotations = titles + message
            for axis in ("xaxis", "yaxis", "xaxis2", "yaxis2", "xaxis3", "yaxis3"):
                layout[axis].visible = not on
            layout.showlegend = False if on else None
            layout.plot_bgcolor = "white" if on else None   # no empty grey plot areas either
        self.detail_out.layout.display = "none" if on else None

    def clear(self) -> None:
        """Empty every trace (a fresh session)."""
        with self.lock, self._pushing():
            for slot in range(self.n_slots):
                for kind in SLOT_TRACES:
                    t = self.trace(kind, slot)
                    t.x, t.y = _arr([]), _arr([])
            self._set_heatmaps(queries.DtypeMap(), queries.Heatmap())

    def update(self, slot: int, steps, skipped, marks, dtypes: queries.DtypeMap | None = None,
               heat: queries.Heatmap | None = None) -> None:
        """Show one run's views (DataFrames from `queries`) in `slot`; dtypes/heat if given."""
        x = _arr(steps["step"])
        loss = _arr(steps["loss"])
        speed = _arr(steps["samples_per_s"])
        bad_x, bad_text = nonfinite_marks(x, loss)
        with self.lock, self._pushing():
            _assign(self.trace("loss", slot), x=x, y=loss)
            _assign(self.trace("speed", slot), x=x, y=rolling_median(speed), customdata=speed)
            _assign(self.trace("scale", slot), x=x, y=_log2(steps["loss_scale"]))
            t = self.trace("skips", slot)
            t.x, t.y = _arr(skipped["step"]), _log2(skipped["loss_scale"])
            t.hovertext = list(skipped["culprit"])
            mx = _arr(marks["step"])
            t = self.trace("marks", slot)
            t.x, t.y = mx, _at(x, loss, mx)
            t.hovertext = list(marks["text"])
            t = self.trace("nonfinite", slot)
            t.x, t.y = _arr(bad_x), np.full(len(bad_x), 0.97 - 0.04 * slot)
            t.hovertext = bad_text
            if dtypes is not None or heat is not None:
                self._set_heatmaps(dtypes, heat)

    def set_step_range(self, lo: int | None, hi: int | None) -> None:
        """Zoom the step axes to [lo, hi] (None: autorange)."""
        rng = None if lo is None or hi is None else [lo, max(hi, lo + 1)]
        with self.lock, self._pushing():
            for ax in ("xaxis", "xaxis2", "xaxis3"):
                axis = self.figure.layout[ax]
                axis.range = rng
                axis.autorange = rng is None
            self.detail.layout.xaxis2.range = rng
            self.detail.layout.xaxis2.autorange = rng is None
            self._show_detail()

    def _set_heatmaps(self, dtypes: queries.DtypeMap | None, heat: queries.Heatmap | None) -> None:
        if dtypes is not None:
            t = self.trace("dtypes")
            if dtypes.layers:
                # NaN would travel as the string "nan" and break the SVG: missing cells are None.
                z = np.where(np.isfinite(dtypes.codes), dtypes.codes, None).tolist()
                t.z, t.x, t.y, t.text = z, list(dtypes.kinds), dtypes.layers, dtypes.names
                # Labels in the cells only while they fit; colours and hover always.
                t.texttemplate = "%{text}" if len(dtypes.layers) <= 14 else ""
            else:
                t.z, t.x, t.y, t.text = [[None] * 4], list(queries.DTYPE_KINDS), [""], [[""] * 4]
        if heat is not None:
            t = self.trace("grads")
            if heat.layers:
                steps, zz = cap_columns(heat.steps, heat.z, self.max_heat_cells)
                z = np.where(np.isfinite(zz), np.round(zz, 2), None).tolist()
                t.z, t.x, t.y = z, steps.tolist(), heat.layers
            else:
                t.z, t.x, t.y = [[None]], [0], [""]
        n_rows = max(len(self.trace("dtypes").y), len(self.trace("grads").y))
        self.detail.layout.height = max(self._detail_height, min(900, 80 + 16 * n_rows))
        self._show_detail()

    def _show_detail(self) -> None:
        """Send the heatmaps to the page if they changed, at most every `detail_every_s` (a
        change within that time is sent when it is up: the last state always arrives)."""
        wait = self._detail_at + self.detail_every_s - time.monotonic()
        if wait > 0:
            if self._detail_timer is None:
                self._detail_timer = threading.Timer(wait, self._flush_detail)
                self._detail_timer.daemon = True
                self._detail_timer.start()
            return
        spec = pio.to_json(self.detail, validate=False)
        if spec != self._detail_sent:
            self._detail_sent, self._detail_at = spec, time.monotonic()
            show_static(self.detail_out, self.detail, spec)

    def _flush_detail(self) -> None:
        with self.lock:
            self._detail_timer = None
            self._show_detail()


def cap_columns(steps: np.ndarray, z: np.ndarray, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbouring columns of a layers x steps heatmap (max of each group, its first
    step) until it has at most `max_cells` cells (at least one column is kept).

    >>> s, z = cap_columns(np.arange(4), np.array([[1., 5., 2., np.nan]]), 2)
    >>> s.tolist(), z.tolist()
    ([0, 2], [[5.0, 2.0]])
    """
    rows, cols = z.shape
    keep = max(1, max_cells // max(rows, 1))
    if cols <= keep:
        return steps, z
    k = -(-cols // keep)
    pad = (-cols) % k
    zp = np.concatenate([z, np.full((rows, pad), np.nan)], axis=1).reshape(rows, -1, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN groups stay NaN
        return np.asarray(steps)[::k], np.nanmax(zp, axis=2)


class CompareFigure(_Pushed):
    """Loss vs step, loss vs wall time, samples/s and loss scale of several runs overlaid."""

    PANELS = (("loss", "step", 1, 1), ("loss", "wall", 1, 2), ("samples_per_s", "step", 2, 1),
              ("loss_scale", "step", 2, 2))

    def __init__(self, n_slots: int = 6, height: int = 700, width: int | None = None,
                 static: bool = False) -> None:
        self.n_slots = n_slots
        self.lock = threading.RLock()
        base = make_subplots(rows=2, cols=2, subplot_titles=(
            "loss vs step", "loss vs wall time (s)", f"samples/s (median of {SPEED_WINDOW} points; hover: raw)",
            "log2 loss scale (× = skipped)"),
            vertical_spacing=0.12, horizontal_spacing=0.1)
        for slot in range(n_slots):
            c = COLORS[slot % len(COLORS)]
            for col, xkind, r, cc in self.PANELS:
                base.add_trace(go.Scatter(x=[], y=[], mode="lines", name=f"run {slot}",
                                          meta=f"{col}-{xkind}:{slot}", line=dict(color=c, shape="hv" if col == "loss_scale" else None),
                                          legendgroup=str(slot), showlegend=(col == "loss" and xkind == "step"),
                                          hovertemplate=(f"step %{{x}}<br>%{{y:.0f}} samples/s (median of {SPEED_WINDOW})"
                                                         "<br>raw: %{customdata:.0f}<extra></extra>"
                                                         if col == "samples_per_s" else None),
                                          visible=False), r, cc)
            base.add_trace(go.Scatter(x=[], y=[], mode="markers", name="skipped", meta=f"skips:{slot}",
                                      marker=dict(symbol="x", size=8, color=c), legendgroup=str(slot),
                                      hovertemplate="skipped step %{x}<br>%{hovertext}<extra></extra>",
                                      showlegend=False, visible=False), 2, 2)
        base.update_layout(height=height, width=width, margin=dict(l=60, r=20, t=40, b=40), uirevision="keep",
                           legend=dict(orientation="h", y=1.08))
        self.figure = base
        self._make_widget(static)
        self._index = {t.meta: i for i, t in enumerate(self.figure.data)}

    def trace(self, meta: str):
        return self.figure.data[self._index[meta]]

    def show(self, runs: list[tuple[str, object, object]]) -> None:
        """runs: [(label, step DataFrame, skipped DataFrame)], at most n_slots of them."""
        with self.lock, self._pushing():
            for slot in range(self.n_slots):
                used = slot < len(runs)
                for col, xkind, _, _ in self.PANELS:
                    t = self.trace(f"{col}-{xkind}:{slot}")
                    t.visible = used
                    if not used:
                        t.x, t.y = _arr([]), _arr([])
                        continue
                    label, steps, _ = runs[slot]
                    t.name = label
                    if xkind == "wall":
                        wall = _arr(steps["wall_time"])
                        x = wall - np.nanmin(wall) if len(wall) and np.isfinite(wall).any() else wall
                    else:
                        x = _arr(steps["step"])
                    if col == "samples_per_s":   # smoothed like the run figure's, raw on hover
                        raw = _arr(steps[col])
                        t.x, t.y, t.customdata = x, rolling_median(raw), raw
                    else:
                        t.x, t.y = x, (_log2(steps[col]) if col == "loss_scale" else _arr(steps[col]))
                t = self.trace(f"skips:{slot}")
                t.visible = used
                if used:
                    skipped = runs[slot][2]
                    t.x, t.y = _arr(skipped["step"]), _log2(skipped["loss_scale"])
                    t.hovertext = list(skipped["culprit"])
                else:
                    t.x, t.y = _arr([]), _arr([])


def layer_history_figure(df, layer: str) -> go.Figure:
    """Static chart of one layer's statistics over time (drill-down): norms and max |x| per
    tensor on a log axis, fp16 underflow fraction on a second axis."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"{queries.layer_label(layer)}: norm (solid) and max |x| (dotted)", "fraction below fp16 subnormal"))
    for i, (tensor, grp) in enumerate(df.groupby("tensor", sort=True)):
        c = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=grp["step"].tolist(), y=grp["norm"].tolist(), name=f"{tensor} norm",
                                 line=dict(color=c)), 1, 1)
        fig.add_trace(go.Scatter(x=grp["step"].tolist(), y=grp["max_abs"].tolist(), name=f"{tensor} max",
                                 line=dict(color=c, dash="dot")), 1, 1)
        fig.add_trace(go.Scatter(x=grp["step"].tolist(), y=grp["underflow_fp16"].tolist(),
                                 name=f"{tensor} underflow", line=dict(color=c), showlegend=False), 1, 2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(height=320, margin=dict(l=50, r=20, t=40, b=30))
    return fig


def show_static(out, fig: go.Figure, spec: str | None = None) -> None:
    """Put a static figure into an ipywidgets Output without `with out:` (safe from threads).

    Only plotly's JSON mimetype is sent (~20 kB): the page's plotly extension draws it, and
    nothing depends on the kernel's default renderer.
    """
    spec = spec if spec is not None else pio.to_json(fig, validate=False)
    bundle = {"application/vnd.plotly.v1+json": json.loads(spec),
              "text/plain": f"<plotly figure: {len(fig.data)} traces>"}
    out.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)
