"""The lab's trade-off front: a button that runs `mpviz.search` (short recorded probes of each
precision policy, `LabSession.search_front`), then a scatter of each policy's loss gap to fp32
(measured here) against its predicted speedup on the GPU picked, the Pareto front highlighted,
and a table of the probes (each a run the explorer lists)."""

from __future__ import annotations

import html
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import ipywidgets as widgets
import plotly.graph_objects as go

from . import ui
from .plots import show_static

FRONT_COLOR, OFF_COLOR, DIVERGED_COLOR = "#2ca02c", "#1f77b4", "#999999"


class FrontPanel:
    """``run()`` is called on a click and returns the search's Future (or raises, with the
    reason to show); the front is drawn when it is done. ``on_busy()`` runs when a search
    starts and ends (`busy` says which)."""

    def __init__(self, run: Callable[[], Future], on_busy: Callable[[], Any] = lambda: None) -> None:
        self._run, self._on_busy = run, on_busy
        self.button = ui.button("Search the trade-off front", "mpviz-front-run")
        self.button.tooltip = ("Train a short probe of each precision policy (fp32, bf16, fp16, "
                               "the advice, fp8 linears) from the same weights and data")
        self.button.on_click(lambda _: self.start())
        self.status = widgets.HTML()
        self.status.add_class("mpviz-front-status")
        self.out = widgets.Output()
        self.out.add_class("mpviz-front-plot")
        self.table = widgets.HTML()
        self.table.add_class("mpviz-front-table")
        head = widgets.HTML("<b>Trade-off front</b> <span class='mpviz-muted'>which policy, for "
                            "this model: loss after a few probe steps (measured here) against "
                            "predicted speed on the GPU picked</span>")
        self.widget = widgets.VBox([head, widgets.HBox([self.button, self.status]), self.out,
                                    self.table])
        self.widget.add_class("mpviz-front")
        self.future: Future | None = None

    def start(self) -> None:
        try:
            fut = self._run()
        except (RuntimeError, ValueError) as e:
            self.status.value = f'<span class="mpviz-bad">{html.escape(str(e))}</span>'
            return
        self.future = fut
        self.button.disabled = True
        self.status.value = '<span class="mpviz-muted">probing each policy…</span>'
        self._on_busy()
        fut.add_done_callback(self._done)

    @property
    def busy(self) -> bool:
        return self.future is not None and not self.future.done()

    def _done(self, fut: Future) -> None:
        self.button.disabled = False
        self._on_busy()
        try:
            front = fut.result()
        except Exception as e:  # noqa: BLE001 - shown on the page; the lab goes on
            self.status.value = (f'<span class="mpviz-bad">search failed: '
                                 f'{html.escape(f"{type(e).__name__}: {e}")}</span>')
            return
        self.show(front)

    def show(self, front: Any) -> None:
        """Draw ``front`` (`mpviz.search`'s): the scatter, the table and its notes."""
        t = front.table
        steps = max((len(v) for v in front.losses.values()), default=0)
        show_static(self.out, front_figure(t, front.device.title, steps))
        rows = [(html.escape(p), _pct(g), "diverged" if d else "", f"{s:.2f}×" if s == s else "–",
                 f"{m:.3g}" if m == m else "–", "✓" if f else "",
                 html.escape(Path(r).name))
                for p, g, d, s, m, f, r in zip(*(t[c] for c in (
                    "policy", "loss_gap", "diverged", "speedup", "memory_gb", "on_front", "run_dir")))]
        notes = front.notes + [f"{p}: {n}" for p, n in zip(t["policy"], t["note"]) if n]
        notes = "".join(f'<br><span class="mpviz-muted">{html.escape(n)}</span>' for n in notes)
        self.table.value = ui.html_table(["policy", "loss gap", "", "predicted speedup",
                                          "memory (GB)", "on front", "run"], rows) + notes
        self.status.value = (f"{len(t)} policies, {steps} probe steps each · speed and memory: "
                             f"estimate for {html.escape(front.device.title)}")


def front_figure(table: Any, gpu: str, steps: int) -> go.Figure:
    """Loss gap to fp32 (%) against predicted speedup, one labelled point per policy (policies
    that land on the same point share it and its label): the front (speed, loss gap and memory
    together) large and green, the others blue, diverged ones grey crosses at the top."""
    gaps = [g for g, d in zip(table["loss_gap"], table["diverged"]) if not d and math.isfinite(g)]
    lo, hi = min(gaps + [0.0]), max(gaps + [0.0])
    top = hi + 0.1 * ((hi - lo) or 0.01)
    fig = go.Figure()
    groups = (("on the front", table["on_front"], FRONT_COLOR, "circle", 14),
              ("off the front", ~table["on_front"] & ~table["diverged"], OFF_COLOR, "circle", 10),
              ("diverged", table["diverged"], DIVERGED_COLOR, "x", 10))
    for name, mask, color, symbol, size in groups:
        points: dict[tuple[float, float], list[str]] = {}
        hover: dict[tuple[float, float], list[str]] = {}
        sub = table[mask]
        for p, g, s, m in zip(sub["policy"], sub["loss_gap"], sub["speedup"], sub["memory_gb"]):
            key = (float(s), 100 * (top if name == "diverged" else float(g)))
            points.setdefault(key, []).append(str(p))
            hover.setdefault(key, []).append(f"{p}: loss gap {_pct(g)}, {s:.2f}× fp32's speed, "
                                             f"{m:.3g} GB")
        fig.add_trace(go.Scatter(
            x=[x for x, _ in points], y=[y for _, y in points],
            text=[", ".join(v) for v in points.values()],
            hovertext=["<br>".join(v) for v in hover.values()], hoverinfo="text", name=name,
            meta=f"front:{name}", mode="markers+text", textposition="top center", cliponaxis=False,
            marker=dict(color=color, symbol=symbol, size=size)))
    fig.update_layout(
        height=360, margin=dict(l=60, r=20, t=50, b=50),
        title=dict(text=f"trade-off front: loss after {steps} steps (measured here) vs speed "
                        f"(estimate for {gpu})", font=dict(size=13)),
        xaxis=dict(title="predicted speedup over fp32 (×)"),
        yaxis=dict(title="loss gap to fp32 (%)"),
        legend=dict(orientation="h", y=-0.2))
    return fig


def _pct(gap: float) -> str:
    return f"{gap:+.2%}" if math.isfinite(gap) else "not finite"
