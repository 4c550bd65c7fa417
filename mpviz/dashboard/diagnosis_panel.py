"""The Diagnosis panel of the explorer and the lab: :func:`mpviz.diagnose`'s findings worst
first, the last loss-scale backoffs, the suggested GradScaler settings and the headroom notes,
for the whole run. Re-diagnosed only when the run grew, at most every ``min_interval_s`` and at
most ``COST_SHARE`` of the time (``refresh``; ``refresh_later`` on a thread of its own). An
"Apply advice" button calls ``on_apply`` (the lab's model, or a live steerable job). No torch.
"""

from __future__ import annotations

import html
import math
import threading
import time
from typing import Any, Callable

import ipywidgets as widgets
import numpy as np

import mpviz   # the diagnosis reads the store with pandas; no torch
from mpviz.formats import FORMATS, NONFINITE_BIN, ZERO_BIN, bin_of
from . import ui
from .worker import share_wait

COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#607d8b"}
SHOWN_BACKOFFS = 5
COST_SHARE = 0.1   # diagnose at most this share of the time while a run is followed
PENDING = '<b>Diagnosis</b> <span class="mpviz-muted mpviz-diagnosing">diagnosing the run…</span>'


def _steps(steps: tuple[int, int] | None) -> str:
    if not steps:
        return ""
    return f"step {steps[0]}" if steps[0] == steps[1] else f"steps {steps[0]}–{steps[1]}"


def _layers(layers: list[str], n: int = 4) -> str:
    names = [f"<code>{html.escape(l)}</code>" if l else "(model)" for l in layers[:n]]
    more = f" and {len(layers) - n} more" if len(layers) > n else ""
    return ", ".join(names) + more


def _scale(v: float) -> str:
    if v is None or not (isinstance(v, (int, float)) and math.isfinite(v)) or v <= 0:
        return ui.fmt(v)
    k = math.log2(v)
    return f"2^{k:g}" if k.is_integer() else ui.fmt(v)


def _unavailable(e: BaseException) -> str:
    return (f'<b>Diagnosis</b> <span class="mpviz-bad">unavailable: '
            f"{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>")


def diagnosis_html(d: Any, backoffs: int = SHOWN_BACKOFFS) -> str:
    """The panel's HTML for a :class:`mpviz.Diagnosis` (escaped; classes ``mpviz-finding`` and
    ``mpviz-sev-<severity>`` on each finding)."""
    if not d.findings:
        parts = ['<b>Diagnosis</b> <span class="mpviz-muted">nothing found in '
                 f'{d.n_steps} steps</span>']
    else:
        counts = ", ".join(f"{n} {s}" for s in ("error", "warning", "info")
                           if (n := sum(f.severity == s for f in d.findings)))
        parts = [f'<b>Diagnosis</b> <span class="mpviz-muted">{d.n_steps} steps: {counts}</span>',
                 '<ul style="margin:2px 0;padding-left:18px">']
        for f in d.findings:
            where = " · ".join(x for x in (_steps(f.steps), _layers(f.layers)) if x)
            sugg = (f'<br><span class="mpviz-muted">→</span> {html.escape(f.suggestion)}'
                    if f.suggestion else "")
            parts.append(
                f'<li class="mpviz-finding mpviz-sev-{f.severity}" data-kind="{f.kind}">'
                f'<b style="color:{COLORS.get(f.severity, "#000")}">{f.severity}</b> '
                f'<b>{html.escape(f.kind)}</b>' + (f" ({where})" if where else "")
                + f"<br>{html.escape(f.message)}{sugg}</li>")
        parts.append("</ul>")
    tl = d.timeline
    back = tl[tl["event"] == "backoff"] if len(tl) else tl
    if len(back):
        rows = [(str(int(s)), f"{_scale(a)} → {_scale(b)}", html.escape(str(c or "")),
                 _layers(list(ls), 2))
                for s, a, b, c, ls in zip(back["step"], back["scale"], back["scale_after"],
                                          back["cause"], back["layers"])][-backoffs:]
        shown = f"last {len(rows)} of {len(back)}" if len(back) > len(rows) else f"{len(back)}"
        parts.append(f'<b>Loss-scale backoffs</b> <span class="mpviz-muted">({shown})</span>'
                     + ui.html_table(["step", "scale", "cause", "layers"], rows,
                                     cls="mpviz-backoffs"))
    adv = d.scale_advice or {}
    if adv.get("reason"):
        knobs = ", ".join(f"{k}={_scale(v) if k == 'init_scale' else v}" for k, v in adv.items()
                          if k in ("init_scale", "growth_interval") and v is not None)
        parts.append(f'<div class="mpviz-scale-advice"><b>GradScaler</b> {html.escape(adv["reason"])}'
                     + (f" → <code>{html.escape(knobs)}</code>" if knobs else "") + "</div>")
    for n in d.notes:
        parts.append(f'<div class="mpviz-muted">headroom: {html.escape(n)}</div>')
    return "".join(parts)


def advice_html(changed: dict[str, str], reasons: dict[str, str], estimate: dict[str, Any]) -> str:
    """What "Apply advice" changed: one line per layer with its new precision and why."""
    if not reasons:
        return '<span class="mpviz-muted">advice: no layer needs to change</span>'
    lines = [f"<code>{html.escape(l)}</code> → {html.escape(changed.get(l, '?'))}: "
             f"{html.escape(why)}" for l, why in reasons.items()]
    share = estimate.get("time_share") if estimate else None
    tail = (f'<br><span class="mpviz-muted">~{share:.0%} of the matmul work stays in high '
            "precision</span>" if isinstance(share, float) and math.isfinite(share) else "")
    return "<b>Advice applied</b> (from the next step)<br>" + "<br>".join(lines) + tail


class DiagnosisPanel:
    """``mpviz.diagnose(run)`` as a short list, refreshed live (rate-limited). ``on_apply() ->
    (changed, reasons, estimate)`` or HTML: the "Apply advice" button; ``offer(run, diagnosis)
    -> (enabled, why)`` enables it with each new diagnosis; ``advice``: where the outcome shows."""

    def __init__(self, min_interval_s: float = 2.0, backoffs: int = SHOWN_BACKOFFS,
                 on_apply: Callable[[], tuple[dict, dict, dict] | str] | None = None,
                 offer: Callable[[Any, Any], tuple[bool, str]] | None = None,
                 advice: widgets.HTML | None = None) -> None:
        self.min_interval_s, self.backoffs, self.on_apply = min_interval_s, backoffs, on_apply
        self.offer_fn = offer
        self.diagnosis: Any = None
        self._at = -math.inf
        self._key: tuple | None = None
        self.cost_s = 0.0   # how long the last diagnosis took
        self._lock = threading.Lock()
        self._gen = 0                      # requests accepted so far (the newest is shown)
        self._request: tuple | None = None   # refresh_later's next one: (gen, (run_dir, rank))
        self._where: tuple | None = None     # the run refresh_later last diagnosed
        self._worker: threading.Thread | None = None
        self.html = widgets.HTML()
        self.html.add_class("mpviz-diagnosis")
        self.advice = advice if advice is not None else widgets.HTML()
        self.advice.add_class("mpviz-advice")
        self.offer_note = widgets.HTML()   # why the button is disabled
        self.offer_note.add_class("mpviz-advice-offer")
        self.apply_btn = ui.button("Apply advice", "mpviz-apply-advice", "info")
        self.apply_btn.tooltip = ("keep in fp32 only the layers the diagnosis says need it "
                                  "(mpviz.advise), from the next step")
        self.apply_btn.on_click(lambda _: self.apply())
        self._tip = self.apply_btn.tooltip
        children = [self.html] + ([widgets.HBox([self.apply_btn, self.offer_note]), self.advice]
                                  if on_apply else [])
        self.widget = widgets.VBox(children)
        self.widget.add_class("mpviz-diagnosis-panel")

    def refresh(self, run: Any, force: bool = False) -> bool:
        """Diagnose ``run`` again if it grew (or is another run or rank) and ``min_interval_s``
        passed since the last time (``force``: however recent that was). Returns whether it did.
        A failure shows one line in the panel, never raises."""
        if run is None or not self._due(run, force):
            return False
        self._show(*self._diagnose(run))
        return True

    def refresh_later(self, run: Any, force: bool = False) -> bool:
        """:meth:`refresh` on a thread of its own, so that the app's plots do not wait for the
        diagnosis (a long run's takes a second or more). The thread reads its own
        :class:`mpviz.Run` of the same store (the app may close ``run`` meanwhile); a result is
        shown unless a newer one was asked for. Returns whether one was asked for."""
        if run is None or not self._due(run, force):
            return False
        where = (str(run.run_dir), getattr(run, "rank", None))
        with self._lock:
            if where != self._where:   # another run: the diagnosis shown is not this one's
                self._where, self.diagnosis = where, None
                self.html.value = PENDING
                if self.offer_fn is not None:
                    self.offer(False, "waiting for the diagnosis")
            self._request = (self._gen, where)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="mpviz-diagnosis",
                                                daemon=True)
                self._worker.start()
        return True

    def _due(self, run: Any, force: bool) -> bool:
        now = time.monotonic()
        # the status too: a run that ends without a new step is no longer one to steer
        key = (str(run.run_dir), getattr(run, "rank", None), run.last_step,
               (getattr(run, "meta", None) or {}).get("status"))
        # started at most every cost + share_wait(cost): it takes at most COST_SHARE of the time
        wait = max(self.min_interval_s, self.cost_s + share_wait(self.cost_s, COST_SHARE))
        if key == self._key or (not force and now - self._at < wait):
            return False
        with self._lock:
            self._at, self._key = now, key
            self._gen += 1   # results asked for before this one are not shown
        return True

    def _diagnose(self, run: Any) -> tuple[Any, str, tuple[bool, str] | None]:
        """(the diagnosis or None, the panel's HTML, the offer or None); never raises."""
        t0 = time.monotonic()
        try:
            d = mpviz.diagnose(run)
            text, offer = diagnosis_html(d, self.backoffs), None
            if self.offer_fn is not None:
                try:
                    offer = self.offer_fn(run, d)
                except Exception as e:   # the diagnosis stays shown
                    offer = (False, f"advice unavailable: {type(e).__name__}: {e}")
            self.cost_s = time.monotonic() - t0
            return d, text, offer
        except Exception as e:   # the panel must not break the app's redraw
            return None, _unavailable(e), None

    def _show(self, d: Any, text: str, offer: tuple[bool, str] | None) -> None:
        if offer is not None:
            self.offer(*offer)
        if self.html.value != text:
            self.html.value = text
        self.diagnosis = d   # last: once it is set, the panel shows it (tests wait on it)

    def _serve(self) -> None:
        """The thread of :meth:`refresh_later`: the newest request, until none is left."""
        while True:
            with self._lock:
                request, self._request = self._request, None
                if request is None:
                    self._worker = None
                    return
            gen, (run_dir, rank) = request
            try:
                run = mpviz.load_run(run_dir, rank=rank)
            except Exception as e:
                result = (None, _unavailable(e), None)
            else:
                try:
                    result = self._diagnose(run)
                finally:
                    run.close()
            with self._lock:
                if gen == self._gen:
                    self._show(*result)

    def offer(self, enabled: bool, why: str = "") -> None:
        """Enable "Apply advice" (``why``: what it would do, in its tooltip), or disable it
        with ``why`` in its tooltip and beside it."""
        self.apply_btn.disabled = not enabled
        self.apply_btn.tooltip = why or self._tip
        note = "" if enabled else f'<span class="mpviz-muted">{html.escape(why)}</span>'
        if self.offer_note.value != note:
            self.offer_note.value = note

    def apply(self) -> dict[str, str]:
        """Call ``on_apply`` and show what changed; returns ``{layer: reason}``."""
        if self.on_apply is None:
            return {}
        try:
            out = self.on_apply()
        except Exception as e:
            self.advice.value = (f'<span class="mpviz-bad">advice not applied: '
                                 f"{html.escape(str(e))}</span>")
            return {}
        if isinstance(out, str):   # the explorer: a request sent to the job, shown as is
            self.advice.value = out
            return {}
        changed, reasons, estimate = out
        self.advice.value = advice_html(changed, reasons, estimate)
        return reasons

    def clear(self) -> None:
        with self._lock:
            self._gen += 1   # a diagnosis under way is not shown
            self._request = self._where = None
            self.diagnosis, self._key, self._at = None, None, -math.inf
            self.html.value = self.advice.value = self.offer_note.value = ""

    def close(self, timeout: float = 10.0) -> None:
        """Clear the panel and wait (at most ``timeout`` s) for a diagnosis under way to end."""
        self.clear()
        worker = self._worker
        if worker is not None:
            worker.join(timeout)


# ---------------------------------------------------------------- exponent histogram view
MAX_COLUMNS = 300   # steps drawn at most (evenly spaced among the recorded ones)
LINE_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
LINE_COLORS = {"fp16": "#c62828", "bf16": "#1565c0", "fp8_e4m3": "#2e7d32", "fp8_e5m2": "#6a1b9a"}


def exponent_history(run: Any, layer: str, tensor: str, lo: int, hi: int,
                     max_columns: int = MAX_COLUMNS) -> tuple[list[int], dict[int, list[float]]]:
    """One layer's stored log2 histograms over steps [lo, hi] (at most ``max_columns`` steps,
    evenly spaced): ``(steps, {bin: [share of elements per step]})`` for every bin that holds
    anything (bins: :mod:`mpviz.formats`)."""
    have = run.histogram_steps(layer, tensor, lo, hi)
    stride = max(1, math.ceil(len(have) / max_columns))
    steps, counts = run.histograms_of(layer, tensor, have[::stride])
    if not steps:
        return [], {}
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return steps, {int(k): shares[:, k].tolist() for k in np.flatnonzero(counts.any(axis=0))}


def exponent_figure(run: Any, layer: str, lo: int, hi: int,
                    tensors: tuple[str, ...] = ("activation", "grad")) -> Any:
    """Per tensor, log2|x| over time as a heatmap (share of elements per binade; zero and
    inf/nan as rows of their own), with each format's largest value and smallest subnormal as
    lines. Gradients are shown unscaled (divided by the loss scale). ``fig.meta`` holds, per
    tensor, the ``steps`` and the ``bins`` of each heatmap row (tests)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    data = [(t, *exponent_history(run, layer, t, lo, hi)) for t in tensors]
    data = [d for d in data if d[1]]
    if not data:
        fig = go.Figure()
        fig.update_layout(height=120, title=dict(text=f"{layer}: no histograms recorded in steps "
                                                       f"{lo}-{hi}", font=dict(size=12)))
        return fig
    fig = make_subplots(rows=len(data), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{layer} · {t}" + (" (unscaled)" if t == "grad" else "")
                                        for t, _, _ in data])
    meta = {}
    for r, (tensor, steps, shares) in enumerate(data, start=1):
        bins, ys, (y_lo, y_hi) = _exponent_rows(shares)
        z = [[(v if v > 0 else None) for v in shares.get(k, [0.0] * len(steps))] for k in bins]
        fig.add_trace(go.Heatmap(x=steps, y=ys, z=z, colorscale="Viridis", zmin=0, zmax=1,
                                 showscale=r == 1, name=tensor,
                                 colorbar=dict(title="share", len=0.5, y=1, yanchor="top"),
                                 hovertemplate="step %{x}<br>log2|x| %{y}<br>share %{z:.3f}"
                                               "<extra></extra>"), row=r, col=1)
        _format_lines(fig, r, y_lo, y_hi)
        ticks = list(range(y_lo - y_lo % 8, y_hi + 2, 8))
        tv, tt = [float(t) for t in ticks], [f"2^{t}" for t in ticks]
        if ZERO_BIN in shares:
            tv, tt = [y_lo - 1.5] + tv, ["zero"] + tt
        if NONFINITE_BIN in shares:
            tv, tt = tv + [y_hi + 2.5], tt + ["inf/nan"]
        fig.update_yaxes(tickvals=tv, ticktext=tt, row=r, col=1)
        meta[tensor] = {"steps": steps, "bins": bins}
    fig.update_layout(height=230 * len(data) + 40, margin=dict(l=60, r=70, t=40, b=30),
                      meta=meta, showlegend=False)
    fig.update_xaxes(title_text="step", row=len(data), col=1)
    return fig


def _exponent_rows(shares: dict[int, list[float]]) -> tuple[list[int], list[float], tuple[int, int]]:
    """The heatmap's rows: bins, their y (the binade's middle, in log2 units; zero below and
    inf/nan above, when they hold anything), and the exponents shown."""
    mid = sorted(k for k in shares if ZERO_BIN < k < NONFINITE_BIN)
    floor, top = FORMATS["fp16"].log2_range()   # always shown: fp16's whole range
    y_lo = min(mid[0] - bin_of(0), floor) if mid else floor
    y_hi = max(mid[-1] - bin_of(0), top + 1) if mid else top + 1
    bins = list(range(bin_of(y_lo), bin_of(y_hi) + 1))
    ys = [k - bin_of(0) + 0.5 for k in bins]
    if ZERO_BIN in shares:
        bins, ys = [ZERO_BIN] + bins, [y_lo - 1.5] + ys
    if NONFINITE_BIN in shares:
        bins, ys = bins + [NONFINITE_BIN], ys + [y_hi + 2.5]
    return bins, ys, (y_lo, y_hi)


def _format_lines(fig: Any, row: int, y_lo: int, y_hi: int) -> None:
    """Each format's largest value (solid) and smallest subnormal (dotted) within the rows."""
    for name in LINE_FORMATS:
        f = FORMATS[name]
        for v, dash in ((f.max, "solid"), (f.min_subnormal, "dot")):
            y = math.log2(v)
            if y_lo - 0.5 <= y <= y_hi + 1.5:
                fig.add_hline(y=y, line=dict(color=LINE_COLORS[name], width=1, dash=dash),
                              row=row, col=1, annotation_text=name, annotation_font_size=9,
                              annotation_position="right")
