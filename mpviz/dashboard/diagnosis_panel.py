"""The Diagnosis panel: what :func:`mpviz.diagnose` says about a run, in the explorer and the lab.

It shows the findings worst first (severity colour, kind, steps, layers, message, suggestion),
the last loss-scale backoffs with their cause and layers, the suggested GradScaler settings and
the headroom notes. ``refresh(run)`` re-diagnoses at most every ``min_interval_s`` and only when
the run grew, so the apps can call it on every redraw. Given ``on_apply``, an "Apply advice"
button calls it (the lab applies :func:`mpviz.advise` to its running model) and shows what it
changed. The diagnosis covers the whole run, whatever step range a plot shows. No torch.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any, Callable

import ipywidgets as widgets

from . import ui

COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#607d8b"}
SHOWN_BACKOFFS = 5


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
    """``mpviz.diagnose(run)`` as a short list, refreshed live (rate-limited).

    ``on_apply(diagnosis_panel) -> (changed, reasons, estimate)``: shows an "Apply advice"
    button that calls it, then shows what it changed (see :func:`advice_html`).
    """

    def __init__(self, min_interval_s: float = 2.0, backoffs: int = SHOWN_BACKOFFS,
                 on_apply: Callable[[], tuple[dict, dict, dict]] | None = None) -> None:
        self.min_interval_s, self.backoffs, self.on_apply = min_interval_s, backoffs, on_apply
        self.diagnosis: Any = None
        self._at = -math.inf
        self._key: tuple | None = None
        self.html = widgets.HTML()
        self.html.add_class("mpviz-diagnosis")
        self.advice = widgets.HTML()
        self.advice.add_class("mpviz-advice")
        self.apply_btn = ui.button("Apply advice", "mpviz-apply-advice", "info")
        self.apply_btn.tooltip = ("keep in fp32 only the layers the diagnosis says need it "
                                  "(mpviz.advise), from the next step")
        self.apply_btn.on_click(lambda _: self.apply())
        children = [self.html] + ([widgets.HBox([self.apply_btn]), self.advice] if on_apply else [])
        self.widget = widgets.VBox(children)
        self.widget.add_class("mpviz-diagnosis-panel")

    def refresh(self, run: Any, force: bool = False) -> bool:
        """Diagnose ``run`` again if it grew (or is another run or rank) and ``min_interval_s``
        passed since the last time (``force``: however recent that was). Returns whether it did.
        A failure shows one line in the panel, never raises."""
        now = time.monotonic()
        if run is None:
            return False
        key = (str(run.run_dir), getattr(run, "rank", None), run.last_step)
        if key == self._key or (not force and now - self._at < self.min_interval_s):
            return False
        self._at, self._key = now, key
        import mpviz   # mpviz.diagnosis reads the store with pandas; no torch

        try:
            self.diagnosis = mpviz.diagnose(run)
            text = diagnosis_html(self.diagnosis, self.backoffs)
        except Exception as e:   # the panel must not break the app's redraw
            self.diagnosis = None
            text = (f'<b>Diagnosis</b> <span class="mpviz-bad">unavailable: '
                    f"{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>")
        if self.html.value != text:
            self.html.value = text
        return True

    def apply(self) -> dict[str, str]:
        """Call ``on_apply`` and show what changed; returns ``{layer: reason}``."""
        if self.on_apply is None:
            return {}
        try:
            changed, reasons, estimate = self.on_apply()
        except Exception as e:
            self.advice.value = (f'<span class="mpviz-bad">advice not applied: '
                                 f"{html.escape(str(e))}</span>")
            return {}
        self.advice.value = advice_html(changed, reasons, estimate)
        return reasons

    def clear(self) -> None:
        self.diagnosis, self._key, self._at = None, None, -math.inf
        self.html.value = self.advice.value = ""
