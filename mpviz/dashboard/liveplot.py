"""A live plotly.js figure drawn from synced widget *state*: the lab's and compare's live lines.

plotly's `FigureWidget` sends each update as a one-off message (`_py2js_update`), applied by the
page in order, and the page sends the whole changed traces back (`_js2py_traceDeltas`, ~20 kB
per update of a followed run) for the kernel to process on its main thread. Here the traces and
the layout *are* the widget's state: one message per update, nothing comes back, a view draws
whatever the state is when it renders and redraws (`Plotly.react`) on every change, and a
change made while another is in flight is never lost (only the newest state matters).

The figure is a plain `go.Figure` (`LivePlot.figure`, the kernel-side model callers mutate);
`push()` sends it when a trace changed: float arrays as binary buffers (8 B per point), the
rest as JSON. plotly.js comes from the plotly package's own bundle (no CDN: the apps work
offline).

Known limit (Voila 0.5, anywidget 0.11): a page that loads while the kernel is already sending
updates to an anywidget can leave that widget's view receiving nothing more (the curve stays as
it was at load; core widgets on the same page keep updating). The explorer, which follows runs
that are already training, therefore draws its run figure statically (`RunFigure(static=True)`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import plotly
import plotly.graph_objects as go
import traitlets
from ipywidgets.widgets.widget import _remove_buffers
from plotly.utils import PlotlyJSONEncoder

from .worker import share_wait

PAGE_SHARE = 0.05   # the most of the page's main thread that a view's redraws take

_RENDER = r"""
// plotly.js arrives as state (plotly_js) and is run as a classic script when the first view
// renders, unless the page has it already: anywidget gives a widget's module 2 s to load, and a
// 5 MB module misses that on a busy machine ("[anywidget] Failed to initialize model.").
function plotly(model) {
  if (!window.Plotly) {
    const s = document.createElement("script");
    s.textContent = model.get("plotly_js");
    document.head.appendChild(s);   // runs now; the bundle sets window.Plotly
  }
  return window.Plotly;
}

function unpack(v) {   // binary buffers arrive as DataViews (or ArrayBuffers): float64 arrays
  if (v instanceof DataView) return new Float64Array(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  if (v instanceof ArrayBuffer) return new Float64Array(v.slice(0));
  if (Array.isArray(v)) return v.map(unpack);
  if (v && typeof v === "object") { const o = {}; for (const k in v) o[k] = unpack(v[k]); return o; }
  return v;
}

// Redraws, painting included, take at most PAGE_SHARE of the page's main thread: after one that
// took t ms the next waits t * redraw_wait ms (worker.share_wait; only the newest state is
// drawn), so a browser on the machine that trains takes little from it, however long the run
// and however slow the page.
const MIN_GAP_MS = 250;

function render({ model, el }) {
  const Plotly = plotly(model);
  const gd = document.createElement("div");
  el.appendChild(gd);
  let busy = false, again = false, gone = false, area = null;
  let next = 0;   // performance.now() before which no redraw starts (see PAGE_SHARE)
  const ro = new ResizeObserver(() => resize());
  // A fixed layout.width wider than the room the page gives is drawn at the room's width instead
  // of being clipped (JupyterLab with its file browser open: ~870 px in a 1,300 px window). The
  // room is measured from the output area the view sits in now (or the page), never from the
  // figure's own box, and that area is observed so that the figure follows it.
  const room = () => {
    const a = el.closest(".jp-OutputArea-output") || document.body;
    if (a !== area) { if (area) ro.unobserve(area); area = a; ro.observe(a); }
    return Math.floor(a.getBoundingClientRect().right - el.getBoundingClientRect().left) - 2;
  };
  const draw = async () => {   // always the newest state; changes during a draw redraw once
    if (busy) { again = true; return; }
    busy = true;
    try {
      do {
        const wait = next - performance.now();
        if (wait > 0) await new Promise((ok) => setTimeout(ok, wait));
        if (gone || !el.isConnected) break;   // drawn once attached: the ResizeObserver calls resize
        again = false;   // what changed while waiting is drawn now
        const t0 = performance.now();
        const layout = JSON.parse(JSON.stringify(model.get("plot_layout")));
        const w = room();
        if (layout.width && w > 200 && w < layout.width) layout.width = w;   // else: as given
        await Plotly.react(gd, unpack(model.get("traces")), layout, { responsive: true, displaylogo: false });
        // ... and the frame that paints it: most of a redraw's cost is painting the SVG
        await new Promise((ok) => requestAnimationFrame(() => setTimeout(ok, 0)));
        const took = performance.now() - t0;
        window.mpvizPlotMs = (window.mpvizPlotMs || 0) + took;   // read by benchmarks/live_plots.py
        window.mpvizPlotDraws = (window.mpvizPlotDraws || 0) + 1;
        next = performance.now() + Math.max(MIN_GAP_MS, took * model.get("redraw_wait"));
      } while (again && !gone);
    } catch (e) {
      console.error("mpviz live plot:", e);
    } finally {
      busy = false;
    }
  };
  const resize = () => {   // first draw once attached; a fixed width re-clamped; autosize resized
    if (gone || !el.isConnected) return;
    if (!gd.layout || model.get("plot_layout").width) draw(); else Plotly.Plots.resize(gd);
  };
  model.on("change:traces", draw);
  model.on("change:plot_layout", draw);
  ro.observe(el);
  draw();
  return () => {
    gone = true;
    ro.disconnect();
    model.off("change:traces", draw);
    model.off("change:plot_layout", draw);
    Plotly.purge(gd);
  };
}
export default { render };
"""


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def _trace_state(trace: Any) -> dict:
    """A trace as widget state: float arrays as float64 buffers, the rest as plain JSON."""
    d = trace.to_plotly_json()
    arrays = {k: v for k, v in d.items() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}
    rest = json.loads(json.dumps({k: v for k, v in d.items() if k not in arrays}, cls=PlotlyJSONEncoder))
    for k, v in arrays.items():
        rest[k] = memoryview(np.ascontiguousarray(v, dtype=np.float64))
    return rest


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, memoryview) or isinstance(w, memoryview):
            if not (isinstance(v, memoryview) and isinstance(w, memoryview)
                    and np.array_equal(np.frombuffer(v, np.float64), np.frombuffer(w, np.float64),
                                       equal_nan=True)):
                return False
        elif v != w:
            return False
    return True


class LivePlot(anywidget.AnyWidget):
    """A plotly.js view of `figure`: call `push()` after changing the figure.

    >>> p = LivePlot(go.Figure(go.Scatter(x=[0, 1], y=[2, 3], meta="loss")))
    >>> p.figure.data[0].x = np.array([0, 1, 2.0]); p.figure.data[0].y = np.array([2, 3, 1.0])
    >>> p.push()
    1
    >>> p.push()   # nothing changed: nothing sent
    0
    """

    _esm = _RENDER
    plotly_js = traitlets.Unicode().tag(sync=True)   # plotly's own bundle (see _RENDER)
    traces = traitlets.List().tag(sync=True)
    plot_layout = traitlets.Dict().tag(sync=True)   # `layout` is the widget's own box layout
    redraw_wait = traitlets.Float(share_wait(1.0, PAGE_SHARE)).tag(sync=True)   # per unit of cost

    def __init__(self, figure: go.Figure, **kwargs: Any) -> None:
        super().__init__(plotly_js=_plotly_js(), **kwargs)
        self.figure = figure
        self.sent: list[int] = []   # bytes of the last 100 trace updates sent (tests, benchmarks)
        self.push()

    def push(self) -> int:
        """Send what changed in `figure` since the last push; returns how many traces changed
        (all traces travel when any did; the layout only when it changed)."""
        new = [_trace_state(t) for t in self.figure.data]
        old = self.traces
        changed = len(new) if len(new) != len(old) else sum(not _same(a, b) for a, b in zip(new, old))
        layout = json.loads(json.dumps(self.figure.layout.to_plotly_json(), cls=PlotlyJSONEncoder))
        if layout != self.plot_layout:
            self.plot_layout = layout
        if changed:
            self.traces = new
            state, _, buffers = _remove_buffers({"traces": new})
            self.sent.append(sum(b.nbytes for b in buffers) + len(json.dumps(state)))
            del self.sent[:-100]
        return changed
