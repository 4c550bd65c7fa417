"""The estimate panel of the lab and the explorer: a "predicted on" GPU menu and one line that puts
the speed measured on the machine that trained beside the step time `mpviz.cost` predicts on that
GPU for the policy in force, for fp32, and for each race lane (`speed.py` computes them).

Always labelled: the measured figure is this machine's, the other an estimate for a named GPU.
"""

from __future__ import annotations

import html
from typing import Callable

import ipywidgets as widgets

from .speed import DEFAULT_GPU, LAUNCH_BOUND, Measured, Speed, gpu_choices, launch_share
# The estimate's "overhead" is its floor per kernel: "launch-bound", as GPU people say.
BOUND_WORDS = {"compute": "compute", "memory": "memory", "overhead": "launch"}


class EstimatePanel:
    """``on_gpu(name)`` runs when another GPU is picked; `show` draws the line."""

    def __init__(self, on_gpu: Callable[[str], None], measured_label: str = "measured here") -> None:
        self.measured_label = measured_label
        self.gpu = widgets.Dropdown(options=gpu_choices(), value=DEFAULT_GPU,
                                    description="predicted on",
                                    style={"description_width": "85px"},
                                    layout=widgets.Layout(width="330px"))
        self.gpu.add_class("mpviz-gpu")
        self.gpu.observe(lambda ch: on_gpu(ch["new"]), names="value")
        self.text = widgets.HTML(layout=widgets.Layout(flex="1 1 400px"))
        self.text.add_class("mpviz-estimate")
        self.widget = widgets.HBox([self.gpu, self.text],
                                   layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        self.widget.add_class("mpviz-estimate-panel")

    def say(self, text: str) -> None:
        """One plain line instead of figures (no counts yet, none with this run)."""
        value = f'<span class="mpviz-muted">{html.escape(text)}</span>'
        if self.text.value != value:
            self.text.value = value

    def show(self, speed: Speed | None, measured: Measured | None, waiting: str = "") -> None:
        """The measured speed and ``speed``'s estimates; ``waiting`` where there is no estimate."""
        value = speed_html(speed, measured, self.measured_label, waiting)
        if self.text.value != value:
            self.text.value = value


def speed_html(speed: Speed | None, measured: Measured | None, label: str = "measured here",
               waiting: str = "") -> str:
    """The panel's lines: measured (``label``, the device), the estimates, the race lanes' speed
    against fp32, and notes (a precision the GPU lacks; a step mostly bound by the floor per
    kernel)."""
    parts = []
    if measured is not None:
        rate = f", {rate_text(measured.samples_per_s)} samples/s" if measured.samples_per_s else ""
        parts.append(f'<b>{html.escape(label)} ({html.escape(_device(measured.device))})</b>: '
                     f'<span class="mpviz-measured">{step_time(measured.step_time_s)}/step'
                     f'{rate}</span>')
    if speed is None:
        if waiting:
            parts.append(f'<span class="mpviz-muted">{html.escape(waiting)}</span>')
        return "<br>".join(parts)
    samples = measured.samples if measured is not None else None
    est = [f"<b>estimate for {html.escape(speed.gpu)}</b>:"]
    if speed.policy is not None:
        est.append(f'policy in force ({html.escape(speed.policy.precision)}) '
                   f'<span class="mpviz-predicted">{step_time(speed.policy.step_time_s)}/step</span>'
                   f'{_rate(samples, speed.policy.step_time_s)} ·')
    est.append(f'fp32 <span class="mpviz-predicted-fp32">{step_time(speed.fp32.step_time_s)}/step'
               f'</span>{_rate(samples, speed.fp32.step_time_s)}')
    x = speed.speedup(speed.policy)
    if x is not None:
        est.append(f'· <span class="mpviz-speedup">{x:.2f}× the speed of fp32</span>')
    parts.append(" ".join(est))
    if speed.lanes:
        lanes = ", ".join(f"{html.escape(label)} {_times(speed.speedup(e))}"
                          for label, e in speed.lanes)
        parts.append(f'<span class="mpviz-lanes">race, predicted speed vs fp32: {lanes}</span>')
    notes = []
    if speed.problem:
        notes.append(html.escape(speed.problem))
    if speed.policy is not None and launch_share(speed.policy) > LAUNCH_BOUND:
        notes.append("launch-bound: most of this step is the floor per GPU kernel (its kernels are "
                     "small), so lower precision buys little on a GPU until the model or batch is "
                     "larger")
    if notes:
        parts.append('<span class="mpviz-muted">' + "; ".join(notes) + "</span>")
    sc = speed.scaled
    if sc is not None:
        n = f", {sc.factor * samples:,} samples" if samples else ""
        parts.append(f'<span class="mpviz-scaled">estimate at a GPU-sized batch (×{sc.factor}{n}): '
                     f'{html.escape(sc.label)} {sc.speedup:.2f}× the speed of fp32 on '
                     f'{html.escape(speed.gpu)}</span>')
    return "<br>".join(parts)


def share_html(share: float, bound: str | None) -> str:
    """A layer's share of the predicted step time and what bounds it, for a table cell ('' for a
    layer that runs no kernel of its own: a container)."""
    if not share and not bound:
        return ""
    pct = "&lt;1%" if 0 < share < 0.005 else f"{share:.0%}"
    word = BOUND_WORDS.get(bound or "", bound)
    what = f" {word}" if word else ""
    why = f", {word}-bound" if word else ""
    return (f'<span class="mpviz-share" style="white-space:nowrap" '
            f'title="share of the predicted step{why}">{pct}{what}</span>')


def step_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def rate_text(x: float) -> str:
    """1234 -> '1.23k', 8.8e5 -> '880k', 2.1e6 -> '2.1M'."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _rate(samples: int | None, seconds: float) -> str:
    return f" ({rate_text(samples / seconds)} samples/s)" if samples and seconds else ""


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _device(device: str) -> str:
    return device.upper() if device in ("cpu", "mps") else device

