"""The precision lab: train a demo task or your own model live, toggle layer precisions, watch
what happens.

>>> lab = lab_app(runs_dir="runs")            # doctest: +SKIP
>>> lab.start(max_steps=50, pause_at=20)      # doctest: +SKIP
>>> lab.set_layer_precision("head", "fp32")   # doctest: +SKIP
>>> lab.toggle_pause()                        # doctest: +SKIP

The page is a view over a `LabSession` (session.py: what trains, start and stop, precisions,
rules, advice, scenarios); `LiveView` redraws the figure and tables from the runs on the worker
thread, between steps. A run directory is claimed only at Start: a page that is only looked at
leaves nothing in the runs folder.
"""

from __future__ import annotations

import html
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ipywidgets as widgets

from ..formats import PRECISIONS
from ..scenarios import SCENARIOS, Scenario
from . import queries, ui
from .diagnosis_panel import DiagnosisPanel
from .estimate_panel import EstimatePanel, share_html
from .front_panel import FrontPanel
from .plots import RunFigure
from .policy_widgets import INHERIT, PrecisionTable, RuleBox
from .session import MAX_ALONGSIDE, NO_STEP_LIMIT, SESSION_S, LabSession, scaler_settings
from .worker import DONE, EVAL_SHARE, FAILED, PAUSED, RUNNING, TrainingWorker

TASKS = ("digits", "text", "mlp")
REMOVE = "(remove rule)"  # rule box: drop the rule for that pattern
SCALES = tuple(2.0**k for k in range(0, 25, 2))  # GradScaler init_scale choices
TABLE_EVERY_S = 2.0   # the layer/overflow tables refresh at most this often
DETAIL_EVERY_S = 10.0  # the dtype map and gradient heatmap too (re-drawn whole by the page) ...
DETAIL_AFTER_CHANGE_S = 2.0  # ... and this long after a precision change shows on the loss curve
LIVE_POINTS = 600      # points per line while training (the plots are ~400-800 px wide)
LIVE_HEAT_CELLS = 6000  # cells of the live gradient heatmap (columns merged beyond)
PRESS_START = ("Press <b>Start</b> to train: the loss, samples/s and loss scale are drawn here, "
               "step by step")
NOT_COUNTED_YET = "the speed estimate comes once the first step is counted"
NOT_COUNTED = ("no speed estimate: this model's step could not be counted (the reason is in the "
               "run's recorder_errors)")


class Lab(ui.App):
    """The live precision lab. Build with `lab_app()`; `lab.widget` is the app."""

    def __init__(self, runs_dir: str | Path | None = None, task: str = "digits",
                 precision: str | None = None, max_steps: int = 0, max_seconds: float = SESSION_S,
                 every: int = 5, seed: int = 0, redraw_s: float = 0.5, *,
                 model: Any = None, optimizer: Any = None, loss_fn: Any = None,
                 train_step: Any = None, data: Any = None, scaler: Any = None,
                 eval_fn: Any = None, eval_data: Any = None, eval_every: int | None = None,
                 name: str | None = None, grad_scaler: bool | None = None,
                 init_scale: float = 2.0**16, growth_interval: int = 2000,
                 scenario: str | None = None) -> None:
        parts = None
        if model is not None:
            parts = {"model": model, "optimizer": optimizer, "loss_fn": loss_fn,
                     "train_step": train_step, "data": data, "eval_fn": eval_fn,
                     "eval_data": eval_data}
            if train_step is not None:
                parts["scaler"] = scaler
            elif scaler is not None:  # its settings become the knobs' starting values
                s = scaler_settings(scaler) or {}
                grad_scaler = bool(s.get("enabled")) if grad_scaler is None else grad_scaler
                init_scale = s.get("init_scale", init_scale)
                growth_interval = s.get("growth_interval", growth_interval)
            task = name or type(model).__name__
        self.session = LabSession(ui.runs_root(runs_dir), task, parts, every, seed, eval_every)
        if precision is None:
            precision = "fp32" if model is not None else "fp16"
        if not self.session.owns_step:
            precision = "fp32"   # the autocast is the train_step's; fp32 = none added by the lab
        self._syncing = False
        self._settings(task, precision, mine=model is not None)
        self._limits(max_steps, max_seconds)
        self._amp_knobs((precision == "fp16") if grad_scaler is None else bool(grad_scaler),
                        init_scale, growth_interval)
        self._scenario_menu()
        self._home = {"task": self.task.options, "precision": precision, "lrs": self.lr.options,
                      "grad_scaler": self.grad_scaler.value, "max_steps": max_steps}
        self.bar = SessionBar(self)
        self.rules = RuleBox(self._send_rule, "mpviz-rule", "Apply rule", "mpviz-rule-apply",
                             REMOVE, "layer or glob, e.g. encoder.*.norm*")
        self.live = LiveView(self.session, self._picked, self.apply_advice, self._show_base,
                             redraw_s)
        self.front = FrontPanel(self.session.search_front, on_busy=self._sync)
        self.widget = self._layout()
        if scenario:
            self.load_scenario(scenario)
        else:
            self.reset()

    # --------------------------------------------------------------------- building the page
    def _settings(self, task: str, precision: str, mine: bool) -> None:
        """What a session trains: task (or your model), precision, batch, lr, race lanes."""
        self.task = widgets.Dropdown(options=(task,) if mine else TASKS, value=task,
                                     description="model" if mine else "task", disabled=mine)
        self.precision = widgets.Dropdown(options=PRECISIONS, value=precision,
                                          description="precision")
        self.batch = widgets.Dropdown(options=[("default", 0)] + [(str(b), b) for b in (16, 32, 64, 128, 256)],
                                      value=0, description="batch")
        self.lr = widgets.Dropdown(options=[("default", 0.0)] + [(f"{v:g}", v) for v in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)],
                                   value=0.0, description="lr")
        self.alongside = widgets.SelectMultiple(
            options=PRECISIONS, value=(), rows=5, description="alongside",
            tooltip="Race: train these too, same model, seed and data, interleaved step by step")
        if mine:   # your data and optimizer set batch size and lr
            self.batch.layout.display = self.lr.layout.display = "none"
        for w, cls in ((self.task, "mpviz-task"), (self.precision, "mpviz-precision"),
                       (self.alongside, "mpviz-alongside")):
            w.add_class(cls)
        self.precision.observe(self._on_precision, names="value")
        for w in (self.task, self.batch, self.lr):
            w.observe(self._on_config, names="value")

    def _limits(self, max_steps: int, max_seconds: float) -> None:
        wide = {"description_width": "90px"}
        self.max_steps = widgets.BoundedIntText(value=max_steps, min=0, max=1_000_000,
                                                description="max steps", style=wide,
                                                tooltip="0: no step limit (Stop or the time limit ends it)")
        self.max_seconds = widgets.BoundedIntText(value=int(max_seconds), min=1, max=86_400,
                                                  description="max seconds", style=wide)
        self.pause_at = widgets.BoundedIntText(value=0, min=0, max=1_000_000, description="pause at",
                                               style=wide, tooltip="pause after this many steps (0: never)")
        self.max_steps.add_class("mpviz-max-steps")
        self.pause_at.add_class("mpviz-pause-at")
        self.pause_at.observe(lambda _: self.session.set_pause_at(self.pause_at.value), names="value")

    def _amp_knobs(self, grad_scaler: bool, init_scale: float, growth_interval: int) -> None:
        """AMP's own knobs: controls when the lab owns the step, read-only with a train_step."""
        self.grad_scaler = widgets.Checkbox(value=grad_scaler, description="GradScaler", indent=False,
                                            layout=widgets.Layout(width="110px"))
        scales = sorted(set(SCALES) | {float(init_scale)})
        self.init_scale = widgets.Dropdown(options=[(_scale_label(v), v) for v in scales],
                                           value=float(init_scale), description="init scale",
                                           layout=widgets.Layout(width="170px"))
        self.growth_interval = widgets.BoundedIntText(value=int(growth_interval), min=1, max=1_000_000,
                                                      description="growth interval",
                                                      style={"description_width": "105px"},
                                                      layout=widgets.Layout(width="230px"))
        self.amp_note = widgets.HTML()
        for w, cls in ((self.grad_scaler, "mpviz-grad-scaler"), (self.init_scale, "mpviz-init-scale"),
                       (self.growth_interval, "mpviz-growth-interval")):
            w.add_class(cls)
            w.observe(self._on_config, names="value")

    def _scenario_menu(self) -> None:
        """Scenarios that teach (`mpviz.scenarios`): one click loads a run made to fail one way."""
        self.scenario = widgets.Dropdown(options=[("(none)", "")] + [(sc.title, n) for n, sc in SCENARIOS.items()],
                                         value="", description="scenario",
                                         layout=widgets.Layout(width="430px"))
        self.scenario_fixed = widgets.Checkbox(value=False, description="with the fix", indent=False,
                                               layout=widgets.Layout(width="110px"))
        self.scenario_note = widgets.HTML()
        for w, cls in ((self.scenario, "mpviz-scenario"), (self.scenario_fixed, "mpviz-scenario-fixed"),
                       (self.scenario_note, "mpviz-scenario-note")):
            w.add_class(cls)
        for w in (self.scenario, self.scenario_fixed):
            w.observe(lambda _: self._syncing or self.load_scenario(self.scenario.value or None,
                                                                     self.scenario_fixed.value),
                      names="value")

    def _layout(self) -> widgets.Box:
        race = ("<span class='mpviz-muted'>race: also train these, same seed and data,<br>"
                f"interleaved step by step (ctrl-click, up to {MAX_ALONGSIDE}; pick fp32 for a "
                "baseline)</span>")
        controls = widgets.VBox([
            widgets.HBox([self.scenario, self.scenario_fixed]), self.scenario_note,
            widgets.HBox([self.task, self.precision, self.batch, self.lr]),
            widgets.HBox([self.alongside, widgets.HTML(race),
                          widgets.VBox([self.max_steps, self.max_seconds, self.pause_at])],
                         layout=widgets.Layout(flex_flow="row wrap")),   # narrow: limits below
            widgets.HBox([self.grad_scaler, self.init_scale, self.growth_interval, self.amp_note]),
            self.bar.widget, self.live.estimate.widget,
        ])
        side = widgets.VBox([widgets.HTML("<b>Layers</b> <span class='mpviz-muted'>(precision "
                                          "applies at the next step)</span>"),
                             self.rules.row, self.rules.msg, self.live.table.widget,
                             self.live.eval_out, self.live.overflows, self.live.diagnosis.widget],
                            layout=widgets.Layout(flex="1 1 420px", overflow="auto"))
        page = widgets.VBox([
            ui.title("mpviz precision lab", "mixed-precision training, live, layer by layer"),
            controls, ui.wrap_row(self.live.fig.view, side), self.front.widget])
        page.add_class("mpviz-app")
        page.add_class("mpviz-lab")
        return page

    # --------------------------------------------------------------------- sessions
    @property
    def state(self) -> str:
        return self.session.state

    def reset(self) -> None:
        """Stop any training and get a fresh model ready (the previous run stays on disk). Its
        run is claimed at Start: a page that is only looked at records nothing."""
        s = self.session
        layers = s.prepare(self.task.value if s.scenario is None else None,
                           self.batch.value or None, self.lr.value or None)
        self.live.clear([self._tag()], PRESS_START)
        self._show_amp()
        self.live.table.build(layers)
        self._status(f"ready: {self.task.value}, {self.precision.value} · press Start "
                     "to train (the run is recorded from then)")
        self._sync()

    def start(self, max_steps: int | None = None, max_seconds: float | None = None,
              pause_at: int | None = None) -> None:
        """Start training (or resume when paused) in a new run directory. After a finished
        session, a new one begins from fresh weights with the current layer toggles.
        `max_steps`: 0 for no step limit (the default: until Stop or `max_seconds`); `pause_at`:
        pause by itself after that many steps (0: never; the "pause at" box)."""
        if self.state == PAUSED:
            return self.toggle_pause()
        if self.state == RUNNING:
            return
        for box, value in ((self.max_steps, max_steps), (self.max_seconds, max_seconds),
                           (self.pause_at, pause_at)):
            if value is not None:
                box.value = int(value)
        amp = {"grad_scaler": self.grad_scaler.value, "init_scale": float(self.init_scale.value),
               "growth_interval": int(self.growth_interval.value)}
        try:
            self.session.begin(self.precision.value, self.alongside.value, amp)
        except ValueError as e:   # a race with a train_step
            self._status(str(e))
            return
        self.live.clear(self.session.labels)
        self.session.train(self.max_steps.value, self.max_seconds.value, self.pause_at.value,
                           on_tick=self._tick, on_done=self._on_done, tick_s=self.live.redraw_s)
        self._sync()

    def toggle_pause(self) -> None:
        self.session.toggle_pause()
        self._sync()
        self._status()

    def stop(self) -> None:
        """Stop training; the runs are closed and stay on disk."""
        self.session.stop()
        self._sync()

    def close(self) -> None:
        """Stop training and close the widgets."""
        self.session.end()
        self.widget.close()

    def _tick(self, worker: TrainingWorker) -> None:
        """The worker's redraw, on its thread between steps."""
        final = self.live.refresh(worker)
        if final is None:
            return
        if final:
            self._sync()   # paused by `pause_at`: the buttons say Resume
        self._status()

    def _on_done(self, worker: TrainingWorker) -> None:
        self._sync()
        self._status()

    # --------------------------------------------------------------------- scenarios
    def load_scenario(self, name: str | None, fixed: bool | None = None) -> Scenario | None:
        """Load a teaching scenario of `mpviz.scenarios` (the Scenario menu): its model, data,
        optimizer and AMP knobs, through the same path as ``lab_app(model=...)``, with its
        explanation shown; each session starts from fresh weights. ``fixed=True`` (or
        ``"NAME-fixed"``): its healthy counterpart. None or "": back to what the lab was built
        with. Stops any training first; press Start (or ``start()``) to train it."""
        sc = self.session.load_scenario(name, fixed)
        home, mine = self._home, self.session.own is not None and sc is None
        self._syncing = True
        try:
            self.scenario.value = sc.name.removesuffix("-fixed") if sc else ""
            self.scenario_fixed.value = bool(sc and sc.name.endswith("-fixed"))
            self.task.options = (sc.name,) if sc else home["task"]
            if self.session.owns_step:
                self.precision.options = PRECISIONS
            self.precision.value = sc.precision if sc else home["precision"]
            self.grad_scaler.value = sc.grad_scaler if sc else home["grad_scaler"]
            self.max_steps.value = sc.max_steps if sc else home["max_steps"]
            if sc is not None:
                self._set_init_scale(sc.init_scale)
                lrs = sorted({v for _, v in home["lrs"] if v} | {sc.lr, sc.fixed().lr})
                self.lr.options = [(f"{sc.lr:g} (scenario)", 0.0)] + [(f"{v:g}", v) for v in lrs]
            else:
                self.lr.options = home["lrs"]
            self.lr.value = 0.0
            self.alongside.value = ()
        finally:
            self._syncing = False
        self.batch.layout.display = "none" if sc or mine else None
        self.lr.layout.display = "none" if mine else None
        self.scenario_note.value = _scenario_html(sc) if sc else ""
        self.reset()
        return sc

    # --------------------------------------------------------------------- configuration
    def _tag(self) -> str:
        return self.precision.value if self.session.owns_step else "train_step"

    def _on_precision(self, change: dict) -> None:
        """A new autocast dtype: the GradScaler follows (on for fp16), then one reset."""
        if self._syncing or not self.session.owns_step:
            return    # with a train_step the menu only shows the autocast it recorded
        self._syncing = True
        try:
            self.grad_scaler.value = change["new"] == "fp16"
        finally:
            self._syncing = False
        self.reset()

    def _on_config(self, change: dict) -> None:
        if not self._syncing:
            self.reset()

    def _show_amp(self) -> None:
        """With a train_step, show the AMP settings of the scaler it brought (read-only)."""
        if self.session.owns_step:
            self.amp_note.value = ('<span class="mpviz-muted">AMP knobs apply at Start / Reset'
                                   '</span>')
            return
        amp = self.session.own_scaler_settings()
        self._syncing = True
        try:
            self.grad_scaler.value = bool(amp["enabled"])
            if amp.get("init_scale") is not None:
                self._set_init_scale(amp["init_scale"])
            if amp.get("growth_interval") is not None:
                self.growth_interval.value = int(amp["growth_interval"])
        finally:
            self._syncing = False
        self.amp_note.value = ('<span class="mpviz-muted">set by your train_step and scaler '
                               '(read-only); autocast: seen once it steps</span>')

    def _show_base(self, base: str) -> None:
        """With a train_step, the precision menu shows the autocast it recorded."""
        label = f"autocast {base} (train_step)"
        if not self.session.owns_step and self.precision.options != (label,):
            self.precision.options = (label,)

    def _set_init_scale(self, value: float) -> None:
        """Show ``value`` in the init-scale menu (added to its choices if it is not one)."""
        v = float(value)
        if v not in [o[1] for o in self.init_scale.options]:
            self.init_scale.options = list(self.init_scale.options) + [(f"{v:g}", v)]
        self.init_scale.value = v

    def set_gpu(self, name: str) -> None:
        """Predict the speed on GPU ``name`` (one of `mpviz.devices()`; the "predicted on" menu)."""
        self.live.estimate.gpu.value = name   # observed: LiveView redraws the estimates

    def session_policy(self) -> dict[str, str]:
        """The rules a new session starts with: the rule box's, then the table's per-layer ones."""
        return self.session.policy()

    # --------------------------------------------------------------------- precisions
    def overrides(self) -> dict[str, str]:
        """The per-layer precisions set in the table ({layer: precision})."""
        return dict(self.session.overrides)

    def set_layer_precision(self, layer: str, precision: str) -> None:
        """Set one layer's precision from the next step (what the table's menus do)."""
        value = None if precision in (None, INHERIT) else precision
        self._picked(layer, value)
        self.live.table.show({layer: value})

    def _picked(self, layer: str, value: str | None) -> None:
        if not self.session.set_layer(layer, value):
            self._status("layer precision set: it applies from Start")
            return
        what = "follows the policy" if value is None else f"→ {value}"
        self._status(f"{queries.layer_label(layer)} {what} from the next step")

    def add_rule(self, pattern: str, precision: str | None) -> bool:
        """Set ``pattern`` (a layer name or a glob such as ``encoder.*.norm*``) to ``precision``
        from the next step (None or "(remove rule)": drop that rule). A rule the policy refuses
        (unknown layer, a glob matching nothing, a precision the device cannot run) is not
        applied: its reason is shown under the box. Returns whether it was accepted."""
        return self.rules.submit(pattern, precision)

    def _send_rule(self, pattern: str, value: str | None) -> bool:
        try:
            live = self.session.add_rule(pattern, value)
        except (ValueError, RuntimeError, TypeError) as e:
            self.rules.msg.value = f'<span class="mpviz-bad">refused: {html.escape(str(e))}</span>'
            return False
        self._show_rule(pattern, value, live)
        return True

    def _show_rule(self, pattern: str, value: str | None, live: bool) -> None:
        when = "from the next step" if live else "from the next Start"
        what = "rule removed" if value is None else f"→ {value}"
        rules = ", ".join(f"{html.escape(k)} → {v}" for k, v in self.session.rules.items()) or "none"
        self.rules.msg.value = (f"{html.escape(pattern)} {what} {when}"
                                f'<br><span class="mpviz-muted">rules: {rules}</span>')

    def apply_advice(self) -> tuple[dict[str, str], dict[str, str], dict]:
        """Keep in fp32 the layers `mpviz.advise` names for the main run (the Apply advice
        button), through the layer table's precision menus (rule box for other names); from the
        next step. Returns ({layer: new precision}, policy.reasons, policy.estimate)."""
        changed, reasons, estimate = self.session.apply_advice()
        self.live.table.show(changed)
        for layer, keep in changed.items():
            if layer in self.live.table.rows:
                self._status(f"{queries.layer_label(layer)} → {keep} from the next step")
            else:
                self._show_rule(layer, keep, self.session.live)
        return changed, reasons, estimate

    # --------------------------------------------------------------------- status, buttons
    def _status(self, note: str = "") -> None:
        w = self.session.worker
        if w is None:
            return self.bar.say(note or "ready")
        limit = f" / {w.max_steps}" if w.max_steps < NO_STEP_LIMIT else ""
        parts = [f"<b>{w.state}</b>", f"step {w.rounds}{limit}",
                 f"{w.elapsed_s:.0f} s / {w.max_seconds:.0f} s"]
        try:   # the status line never fails a redraw: a store being written may refuse a read
            speed = self.session.samples_per_s() if self.session.readers else None
        except Exception:
            speed = None
        if speed is not None:
            parts.append(f"{speed:.0f} samples/s")
        if w.state in (DONE, FAILED) and w.reason:
            parts.append(html.escape(w.reason))
        if w.tick_error:
            parts.append(f'<span class="mpviz-bad">display: {html.escape(w.tick_error)}</span>')
        if w.post_error:
            parts.append(f'<span class="mpviz-bad">toggle: {html.escape(w.post_error)}</span>')
        if note:
            parts.append(html.escape(note))
        self.bar.say(" · ".join(parts))

    def _sync(self) -> None:
        """Buttons and controls for the session's state: settings are locked while it trains."""
        s, owns_step = self.state, self.session.owns_step
        busy = s in (RUNNING, PAUSED)
        self.bar.sync(s)
        searching = self.front.busy   # the probes hold the torch thread until they end
        if searching:
            self.bar.start.disabled = True
        self.front.button.disabled = busy or searching or not owns_step
        if not owns_step:
            self.front.status.value = ('<span class="mpviz-muted">the trade-off front needs '
                                       'loss_fn: a train_step drives its own optimizer</span>')
        for w in (self.batch, self.lr, self.alongside, self.scenario, self.scenario_fixed):
            w.disabled = busy
        self.task.disabled = busy or self.session.own is not None or self.session.scenario is not None
        for w in (self.precision, self.grad_scaler, self.init_scale, self.growth_interval):
            w.disabled = busy or not owns_step

    # --------------------------------------------------------------------- read by tests, scripts
    @property
    def model(self) -> Any:
        """The model the current session trains, or the next Start will."""
        return self.session.model

    @property
    def trainers(self) -> list[Any]:
        return self.session.trainers

    @property
    def worker(self) -> TrainingWorker | None:
        return self.session.worker

    @property
    def diagnosis(self) -> DiagnosisPanel:
        return self.live.diagnosis

    @property
    def _rows(self) -> dict[str, tuple[widgets.HTML, widgets.Dropdown]]:
        return self.live.table.rows

    @property
    def _rules(self) -> dict[str, str]:
        return self.session.rules

    @property
    def _scenario(self) -> Scenario | None:
        return self.session.scenario


class SessionBar:
    """Start, Pause/Resume, Reset, Stop and the status line."""

    def __init__(self, lab: Lab) -> None:
        self.start = ui.button("Start", "mpviz-start", "success")
        self.pause = ui.button("Pause", "mpviz-pause")
        self.reset = ui.button("Reset", "mpviz-reset", "warning")
        self.stop = ui.button("Stop", "mpviz-stop", "danger")
        self.status = widgets.HTML()
        self.status.add_class("mpviz-status")
        self.start.on_click(lambda _: lab.start())
        self.pause.on_click(lambda _: lab.toggle_pause())
        self.reset.on_click(lambda _: lab.reset())
        self.stop.on_click(lambda _: lab.stop())
        self.widget = widgets.HBox([self.start, self.pause, self.reset, self.stop, self.status])

    def sync(self, state: str) -> None:
        busy = state in (RUNNING, PAUSED)
        self.start.disabled = state == RUNNING
        self.start.description = "Resume" if state == PAUSED else "Start"
        self.pause.disabled = self.stop.disabled = not busy
        self.pause.description = "Resume" if state == PAUSED else "Pause"

    def say(self, text: str) -> None:
        if self.status.value != text:
            self.status.value = text


class LiveView:
    """The loss figure, the layer table, the eval chart, the overflow table and the Diagnosis
    panel, redrawn from the session's runs (on the worker thread, between steps)."""

    def __init__(self, session: LabSession, on_pick: Callable[[str, str | None], None],
                 on_apply: Callable[[], Any], on_base: Callable[[str], None],
                 redraw_s: float) -> None:
        self.session, self.on_base = session, on_base
        self.redraw_s = redraw_s   # the least time between two redraws while training
        self.fig = RunFigure(n_slots=1 + MAX_ALONGSIDE, width=900, max_heat_cells=LIVE_HEAT_CELLS,
                             detail_every_s=DETAIL_EVERY_S)
        self.fig.widget.add_class("mpviz-figure")
        self.table = PrecisionTable(
            on_pick, "mpviz-layer-row", "mpviz-toggle",
            header='<span class="mpviz-muted">layer · type · params &nbsp;|&nbsp; precision in '
                   'force · last |grad| · headroom (binades) · share of the predicted step '
                   '(bound)</span>')
        self.estimate = EstimatePanel(self._gpu_picked)
        self._cells: dict[str, str] = {}   # each layer's cell without its predicted share
        self._cell_lock = threading.Lock()  # the worker's redraw and a GPU picked on the page
        self.table.widget.add_class("mpviz-layer-table")
        self.overflows = widgets.HTML()
        self.overflows.add_class("mpviz-overflows")
        self.eval_out = widgets.Output()
        self.eval_out.add_class("mpviz-eval")
        self.diagnosis = DiagnosisPanel(on_apply=on_apply)  # live; Apply advice
        self._table_at = self._detail_at = 0.0
        self._marks_seen = 0   # precision changes shown on the loss curve (see refresh)
        self._eval_shown = -1

    def clear(self, labels: list[str], placeholder: str | None = None) -> None:
        """Empty plots for runs named ``labels``; with a ``placeholder`` (no run yet), the
        tables, eval chart and diagnosis of the last session go too."""
        self.fig.clear()
        self.fig.set_placeholder(placeholder)
        self.fig.set_labels(labels)
        self._eval_shown = -1
        if placeholder is not None:
            with self._cell_lock:
                self._cells = {}
            self.estimate.say(f"Press Start: {NOT_COUNTED_YET}.")
            self.overflows.value = ""
            self.diagnosis.clear()
            self.eval_out.outputs = ()

    def refresh(self, worker: TrainingWorker | None = None) -> bool | None:
        """Read the runs back and update the page. Returns whether it was the last redraw of a
        stretch of training (paused or ended), None with no run to read."""
        s = self.session
        readers = list(s.readers)
        if not readers:
            return None
        s.flush()   # rows of the last steps are committed before reading
        now = time.monotonic()
        final = worker is None or worker.state != RUNNING
        # The heatmaps are the heaviest part of a redraw (JSON, re-rendered by the page): at most
        # every DETAIL_EVERY_S while training, and soon after a precision change (its dtypes).
        detail = final or now - self._detail_at >= DETAIL_EVERY_S
        if detail:
            self._detail_at = now
        for slot, reader in enumerate(readers):
            snap = queries.snapshot(reader, detail=detail and slot == 0, max_points=LIVE_POINTS)
            self.fig.update(slot, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
            if slot == 0 and len(snap.marks) != self._marks_seen:
                self._marks_seen = len(snap.marks)
                self._detail_at = min(self._detail_at, now - DETAIL_EVERY_S + DETAIL_AFTER_CHANGE_S)
        if final or now - self._table_at >= TABLE_EVERY_S:
            self._table_at = now
            self._tables()
        if detail:
            self._evals()   # a static plot, re-drawn whole by the page: as rarely as the heatmaps
        self.diagnosis.refresh(readers[0], force=final)
        return final

    def _tables(self) -> None:
        base = self.session.base_precision()
        self.on_base(base)
        table = self.session.layer_table(base)
        cells = {}
        for name, prec, g, head in zip(table["layer"], table["precision"], table["grad_norm"],
                                       table["headroom"]):
            if name in self.table.rows:
                bad = ' class="mpviz-bad"' if head < 1 else ""  # under one binade left (or overflowed)
                cells[name] = (f'<b>{html.escape(prec)}</b> · {ui.fmt(g) or "–"} · '
                               f'<span{bad}>{ui.binades(head)}</span>')
        with self._cell_lock:
            self._cells = cells
        self.show_speed()
        df, total = queries.overflow_table(self.session.readers[0], limit=15)
        self.overflows.value = ui.overflow_html(df, total)

    def _gpu_picked(self, name: str) -> None:
        self.session.gpu = name
        self.show_speed()

    def show_speed(self) -> None:
        """The estimate panel and each layer's share of the predicted step (`LabSession.speed`:
        predicted again only when the policy or the GPU changed). Under the lock, so that the
        last drawn is for the GPU picked last."""
        s = self.session
        with self._cell_lock:
            speed, measured = s.speed(), s.measured()
            waiting = NOT_COUNTED if measured is not None else NOT_COUNTED_YET
            self.estimate.show(speed, measured, waiting)
            shares = speed.shares() if speed is not None else {}
            for name, cell in self._cells.items():
                share = share_html(*shares[name]) if name in shares else ""
                self.table.set_cell(name, f"{cell} · {share}" if share else cell)

    def _evals(self) -> None:
        """The eval metric of each run (eval_fn every eval_every steps, or on the worker's
        EVAL_SHARE budget), a small static chart."""
        series = self.session.evals()
        n = sum(len(e) for _, e in series)
        if n == 0 or n == self._eval_shown:
            return
        self._eval_shown = n
        import plotly.graph_objects as go

        from .plots import COLORS, show_static

        name = getattr(self.session.trainers[0].eval_fn, "__name__", "eval") or "eval"
        every = self.session.eval_every
        how = f"every {every} steps" if every else f"taking at most {EVAL_SHARE:.0%} of training time"
        fig = go.Figure([go.Scatter(x=[s for s, _ in e], y=[v for _, v in e], name=lab,
                                    mode="lines+markers", line=dict(color=COLORS[i % len(COLORS)]))
                         for i, (lab, e) in enumerate(series)])
        fig.update_layout(height=220, margin=dict(l=50, r=10, t=30, b=30),
                          title=dict(text=f"eval: {name} (fp32, {how})", font=dict(size=12)))
        show_static(self.eval_out, fig)


def _scale_label(v: float) -> str:
    return f"2^{math.log2(v):g}" if v > 0 and math.log2(v).is_integer() else f"{v:g}"


def _scenario_html(sc: Scenario) -> str:
    """A scenario's explanation, what the Diagnosis should say, and the fix."""
    e = html.escape
    if sc.name.endswith("-fixed"):
        expect = (f"<b>The fixed run</b>: {e(sc.fix)} Expect nothing above <i>info</i> in the "
                  "Diagnosis; untick 'with the fix' to see it fail.")
    else:
        layers = ", ".join(f"<code>{e(l)}</code>" for l in sc.layers[:4])
        more = f" and {len(sc.layers) - 4} more" if len(sc.layers) > 4 else ""
        expect = (f"<b>Expect</b>: within {sc.max_steps} steps the Diagnosis names "
                  f"<code>{e(sc.expect)}</code> in {layers}{more}. <b>The fix</b>: {e(sc.fix)} "
                  "('with the fix' loads it).")
    return (f'<div style="max-width:900px"><b>{e(sc.title)}</b>. {e(sc.explanation)}<br>{expect}'
            "</div>")


def lab_app(runs_dir: str | Path | None = None, **kwargs: Any) -> Lab:
    """The precision lab app (display it: last line of a cell, or `display(lab_app())`).

    `runs_dir`: where runs are written (`$MPVIZ_RUNS_DIR` overrides it). Other keywords go to
    `Lab`: task, precision, max_steps (default 0: no step limit), max_seconds (default 600: a
    session trains until Stop or for 10 minutes), every, seed, redraw_s (the least time
    between two redraws while training); for your own model `model`, `optimizer`, `data` and
    `loss_fn` or `train_step` (+ `scaler`), optionally `eval_fn(model, batch) -> metric` with
    `eval_data` (held-out batches; default: the last training batch) every `eval_every` steps
    (default None: as often as takes at most 1% of the training thread, and on the final weights),
    `name`, and AMP's starting knobs `grad_scaler`, `init_scale`, `growth_interval`.
    `scenario`: start with a teaching scenario of `mpviz.scenarios` loaded (see
    `Lab.load_scenario`), e.g. ``lab_app(scenario="fp16-no-scaling")``.

    >>> lab = lab_app(runs_dir="runs", task="mlp", precision="bf16")   # doctest: +SKIP
    >>> lab = lab_app(model=model, optimizer=opt, data=loader,
    ...               loss_fn=lambda model, batch: model(**batch).loss)  # doctest: +SKIP
    """
    return Lab(runs_dir=runs_dir, **kwargs)
