"""``mpviz report RUN -o run.html``: one self-contained HTML file of a run (plotly.js inlined, no
network request when opened): the loss, loss scale, samples/s, dtype map and gradient heatmap in
one figure, then the diagnosis, the advice, overflow events, precision changes and metadata.

    >>> write_report("runs/exp1", "exp1.html")                  # doctest: +SKIP

Its size is bounded whatever the run length: the lines are the apps' decimated views, marks are
thinned to ``MAX_MARKS``, hover texts cut at ``MAX_HOVER`` characters, the heatmap has at most
``queries.MAX_HEATMAP_CELLS`` cells, the tables at most ``TABLE_ROWS`` rows.
"""
from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

import mpviz

from .dashboard import queries, ui
from .diagnosis.advise import advice_target
from .dashboard.diagnosis_panel import _scale, diagnosis_html
from .dashboard.plots import (DTYPE_COLORSCALE, SPEED_WINDOW, _at, _log2, _plain_json, cap_columns,
                              nonfinite_marks, rolling_median)

MAX_POINTS = 2000   # points per line (bucket averages, as the apps draw them)
MAX_MARKS = 1000    # marks per kind (skipped steps, precision changes): about one per pixel
TABLE_ROWS = 20     # rows per HTML table (skipped steps, overflow events, precision changes)
MAX_TEXT = 200      # characters per metadata value or table cell
MAX_HOVER = 120     # characters per hover text
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def _clip(text: str, n: int = MAX_TEXT) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def thin_marks(df: pd.DataFrame, lo: int, hi: int, text: str, what: str,
               max_points: int = MAX_MARKS) -> pd.DataFrame:
    """At most `max_points` rows of a marks table (one per step, column `text`): above that,
    the first row of each bucket of steps, its text prefixed by how many it stands for.

    >>> df = pd.DataFrame({"step": [1, 2, 3], "t": ["a", "b", "c"]})
    >>> thin_marks(df, 0, 3, "t", "skipped steps", max_points=2)["t"].tolist()
    ['a', '2 skipped steps 2–3; first: b']
    """
    if len(df) <= max_points:
        return df
    k = queries.bucket_size(lo, hi, max_points)
    groups = df.groupby((df["step"].to_numpy(dtype=np.int64) - lo) // k, sort=True)
    out = groups.head(1).copy()
    n, last = groups["step"].size().to_numpy(), groups["step"].max().to_numpy()
    out[text] = [t if m == 1 else f"{m} {what} {int(a)}–{int(b)}; first: {t}"
                 for t, m, a, b in zip(out[text], n, out["step"], last)]
    return out.reset_index(drop=True)


def build_figure(run: Any, max_points: int = MAX_POINTS, max_marks: int = MAX_MARKS) -> go.Figure:
    """The report's one figure: loss, loss scale + skipped steps, samples/s, dtype map and
    gradient heatmap, from the dashboards' decimated views of the whole run."""
    snap = queries.snapshot(run, max_points=max_points)
    lo, hi = snap.lo, snap.hi
    skipped = thin_marks(snap.skipped, lo, hi, "culprit", "skipped steps", max_marks)
    marks = thin_marks(snap.marks, lo, hi, "text", "steps with precision changes", max_marks)
    dt, heat = snap.dtypes, snap.heat
    # px per row: loss, loss scale, samples/s, dtype map, gradient heatmap (16 px per layer)
    heights = [340, 240, 200] + [max(200, min(900, 60 + 16 * max(n, 1))) for n in
                                 (len(dt.layers), len(heat.layers))]
    gap = 70
    plot_px = sum(heights) + gap * (len(heights) - 1)
    fig = make_subplots(
        rows=5, cols=1, row_heights=heights, vertical_spacing=gap / plot_px,
        subplot_titles=("loss (★ = precision change, × on top = loss nan/inf)",
                        "log2 loss scale (× = skipped step, hover: culprit layer)",
                        f"samples/s (median of {SPEED_WINDOW} points; hover: raw)",
                        "dtype map (last step): fp32 blue, bf16 orange, fp16 red, fp8 purple",
                        "gradient norm, log2 (layers × steps)"))
    _add_lines(fig, snap.steps, marks, skipped)
    _add_heatmaps(fig, dt, heat, heights[-1] / plot_px)
    for ax in ("xaxis2", "xaxis3", "xaxis5"):   # the step axes zoom together
        fig.layout[ax].matches = "x"
    fig.update_xaxes(type="category", row=4, col=1)
    for row in (4, 5):   # first layer on top
        fig.update_yaxes(type="category", autorange="reversed", row=row)
    fig.update_layout(yaxis6=dict(overlaying="y", range=[0, 1], visible=False, fixedrange=True),
                      height=plot_px + 120, margin=dict(l=60, r=20, t=80, b=40),
                      legend=dict(orientation="h", x=0, y=1 + 40 / plot_px, yanchor="bottom"),
                      hovermode="closest")
    return fig


def _add_lines(fig: go.Figure, steps: pd.DataFrame, marks: pd.DataFrame,
               skipped: pd.DataFrame) -> None:
    """Rows 1-3: the loss with its marks, the loss scale with the skipped steps, samples/s."""
    x = np.asarray(steps["step"], dtype=float)
    loss = np.asarray(steps["loss"], dtype=float)
    speed = np.asarray(steps["samples_per_s"], dtype=float)
    few = len(x) <= 200   # a lone finite point between gaps shows as a dot
    fig.add_trace(go.Scatter(x=x, y=loss, mode="lines+markers" if few else "lines", name="loss",
                             meta="loss", marker=dict(size=4)), 1, 1)
    fig.add_trace(go.Scatter(x=np.asarray(marks["step"], dtype=float),
                             y=_at(x, loss, np.asarray(marks["step"], dtype=float)),
                             hovertext=[_clip(t, MAX_HOVER) for t in marks["text"]], mode="markers",
                             name="precision change", meta="marks",
                             hovertemplate="step %{x}<br>%{hovertext}<extra></extra>",
                             marker=dict(symbol="star", size=13 if len(marks) <= 100 else 8,
                                         color="#ff7f0e",
                                         line=dict(width=1, color="black"))), 1, 1)
    bad_x, bad_text = nonfinite_marks(x, loss)
    # × along the top of the loss plot (a hidden [0, 1] axis over it), as the apps draw them.
    fig.add_trace(go.Scatter(x=np.asarray(bad_x, dtype=float), y=np.full(len(bad_x), 0.97),
                             hovertext=bad_text, mode="markers", name="loss nan/inf",
                             meta="nonfinite", xaxis="x", yaxis="y6",
                             hovertemplate="%{hovertext}<extra></extra>",
                             marker=dict(symbol="x", size=9, color="#d62728")))
    fig.add_trace(go.Scatter(x=x, y=_log2(steps["loss_scale"]), mode="lines",
                             name="loss scale", meta="scale", line=dict(shape="hv"),
                             showlegend=False), 2, 1)
    fig.add_trace(go.Scatter(x=np.asarray(skipped["step"], dtype=float),
                             y=_log2(skipped["loss_scale"]),
                             hovertext=[_clip(str(t), MAX_HOVER) for t in skipped["culprit"]], mode="markers",
                             name="skipped step", meta="skips",
                             hovertemplate="skipped step %{x}<br>%{hovertext}<extra></extra>",
                             marker=dict(symbol="x", size=9, color="#d62728")), 2, 1)
    fig.add_trace(go.Scatter(x=x, y=rolling_median(speed), customdata=speed, mode="lines",
                             name="samples/s", meta="speed", showlegend=False,
                             hovertemplate=(f"step %{{x}}<br>%{{y:.0f}} samples/s (median of "
                                            f"{SPEED_WINDOW})<br>raw: %{{customdata:.0f}}<extra></extra>")),
                  3, 1)


def _add_heatmaps(fig: go.Figure, dt: queries.DtypeMap, heat: queries.Heatmap,
                  heat_share: float) -> None:
    """Rows 4-5: the dtype map and the gradient heatmap (``heat_share``: its row's share of
    the figure's height, for its colour bar)."""
    if dt.layers:   # missing cells are None: NaN would break the SVG
        fig.add_trace(go.Heatmap(z=np.where(np.isfinite(dt.codes), dt.codes, None).tolist(),
                                 x=list(dt.kinds), y=dt.layers, text=dt.names, meta="dtypes",
                                 colorscale=DTYPE_COLORSCALE, zmin=-0.5, zmax=5.5, showscale=False,
                                 texttemplate="%{text}" if len(dt.layers) <= 30 else "",
                                 hovertemplate="%{y} %{x}: %{text}<extra></extra>"), 4, 1)
        fig.layout.xaxis4.domain = [0, 0.4]   # four columns need no more
        fig.layout.annotations[3].x = 0.2     # its title over it
    if heat.layers:
        steps, z = cap_columns(heat.steps, heat.z, queries.MAX_HEATMAP_CELLS)
        fig.add_trace(go.Heatmap(z=np.where(np.isfinite(z), np.round(z, 2), None).tolist(),
                                 x=np.asarray(steps).tolist(), y=heat.layers, meta="grads",
                                 colorscale="Viridis",
                                 colorbar=dict(title="log2", len=heat_share, y=0, yanchor="bottom"),
                                 hovertemplate="%{y}<br>step %{x}<br>log2 |g| = %{z:.2f}<extra></extra>"),
                      5, 1)


def _meta_value(key: str, v: Any) -> str:
    if key.endswith("_time") and isinstance(v, (int, float)) and math.isfinite(v):
        when = datetime.datetime.fromtimestamp(v, datetime.timezone.utc)
        return f"{v:.0f} ({when:%Y-%m-%d %H:%M:%S} UTC)"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def meta_html(meta: dict[str, Any]) -> str:
    rows = [(f"<code>{html.escape(str(k))}</code>", html.escape(_clip(_meta_value(str(k), v))))
            for k, v in meta.items()]
    return "<h3>Run metadata</h3>" + ui.html_table(["key", "value"], rows, cls="mpviz-meta")


def changes_html(changes: pd.DataFrame, limit: int = TABLE_ROWS) -> str:
    if not len(changes):
        return '<h3>Precision changes</h3><span class="mpviz-muted">none</span>'
    shown = changes.head(limit)
    rows = [(str(int(s)), html.escape(queries.layer_label(str(l))), html.escape(str(p)),
             html.escape(str(r))) for s, l, p, r in
            zip(shown["step"], shown["layer"], shown["precision"], shown["rule"])]
    n = f"first {len(rows)} of {len(changes)}" if len(changes) > len(rows) else str(len(changes))
    return (f'<h3>Precision changes <span class="mpviz-muted">({n})</span></h3>'
            + ui.html_table(["step", "layer", "precision", "rule"], rows, cls="mpviz-changes"))


def skipped_html(skipped: pd.DataFrame, limit: int = TABLE_ROWS) -> str:
    """The skipped steps with their culprits: all, or the first and last `limit` / 2."""
    if not len(skipped):
        return '<h3>Skipped steps</h3><span class="mpviz-muted">none</span>'
    half = limit // 2
    cut = len(skipped) > limit
    shown = pd.concat([skipped.head(half), skipped.tail(half)]) if cut else skipped
    rows = [(str(int(s)), _scale(v), html.escape(_clip(str(c)))) for s, v, c in
            zip(shown["step"], shown["loss_scale"], shown["culprit"])]
    if cut:
        rows.insert(half, ("…", "", f"{len(skipped) - 2 * half} more"))
    n = f"first and last {half} of {len(skipped)}" if cut else str(len(skipped))
    return (f'<h3>Skipped steps <span class="mpviz-muted">({n}; culprit: the first layer with '
            "inf/nan)</span></h3>"
            + ui.html_table(["step", "loss scale", "culprit"], rows, cls="mpviz-skipped"))


def advice_html(policy: Any) -> str:
    if not policy.reasons:
        return ('<h3>Advice</h3><span class="mpviz-muted">mpviz.advise: no layer needs to stay '
                'in high precision</span>')
    rows = [(f"<code>{html.escape(l)}</code>", html.escape(policy.rules.get(l, "")),
             html.escape(why)) for l, why in policy.reasons.items()]
    share = policy.estimate.get("time_share")
    tail = (f'<div class="mpviz-muted">~{share:.0%} of the matmul work stays in high precision'
            "</div>" if isinstance(share, float) and math.isfinite(share) else "")
    return ("<h3>Advice</h3>"
            f"<div>mpviz.advise: <code>PrecisionPolicy({html.escape(repr(policy.rules))})</code></div>"
            + ui.html_table(["layer", "precision", "why"], rows, cls="mpviz-advice") + tail)


def summary_html(run: Any) -> str:
    meta = run.meta
    head = queries.run_status(meta)
    s = run.step_totals()
    n = int(s["n"] or 0)
    sps = (float(s["samples"]) / float(s["step_time_s"]) if n and s["samples"] and s["step_time_s"]
           else float("nan"))
    bits = [f"{n} steps", f"{int(s['skipped'] or 0)} skipped", f"{ui.fmt(sps)} samples/s",
            f"model {html.escape(str(meta.get('model', '?')))}",
            f"autocast {html.escape(str(meta.get('autocast_dtype')))}", f"status {html.escape(head)}"]
    k = queries.bucket_size(*queries.step_range(run), MAX_POINTS)
    note = (f" Lines average buckets of {k} steps ({MAX_POINTS} points at most)." if k > 1 else "")
    return f"<p>{' · '.join(bits)}.{note}</p>"


def report_html(run: Any, max_points: int = MAX_POINTS, title: str | None = None) -> str:
    """The report of `run` (a :class:`mpviz.Run` or a run directory) as one HTML string."""
    own = not isinstance(run, mpviz.Run)
    run = mpviz.load_run(run) if own else run
    try:
        title = title or f"mpviz report: {run.run_dir.name}"
        fig = build_figure(run, max_points)
        diagnosis = mpviz.diagnose(run)
        policy = mpviz.advise(run, target=advice_target(run), diagnosis=diagnosis)
        overflows = ui.overflow_html(*queries.overflow_table(run, limit=TABLE_ROWS))
        lo, hi = queries.step_range(run)
        parts = [summary_html(run), diagnosis_html(diagnosis), advice_html(policy),
                 skipped_html(queries.skipped_view(run, lo, hi)), f"<div>{overflows}</div>", changes_html(run.policy_changes), meta_html(run.meta)]
    finally:
        if own:
            run.close()
    spec = _plain_json(fig).replace("</", "<\\/")   # JSON inside <script>: no "</script>"
    config = json.dumps(PLOTLY_CONFIG)
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
{ui.STYLE}
<style>body {{margin: 16px;}} h3 {{margin: 14px 0 4px; font-size: 14px;}}
.mpviz-app table.mpviz-meta td, .mpviz-app table.mpviz-advice td,
.mpviz-app table.mpviz-skipped td {{text-align: left; white-space: normal;}}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body><div class="mpviz-app">
<div class="mpviz-title">{html.escape(title)} <span class="mpviz-muted">written {made} by mpviz {html.escape(mpviz.__version__)}</span></div>
{parts[0]}
<div id="mpviz-figure" class="mpviz-figure"></div>
<script type="application/json" id="mpviz-figure-data">{spec}</script>
<script type="text/javascript">
var spec = JSON.parse(document.getElementById("mpviz-figure-data").textContent);
Plotly.newPlot("mpviz-figure", spec.data, spec.layout, {config});
</script>
{"".join(parts[1:])}
</div></body></html>
"""


def write_report(run: Any, path: str | Path, max_points: int = MAX_POINTS) -> Path:
    """Write :func:`report_html` of `run` to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(report_html(run, max_points), encoding="utf-8")
    return path
