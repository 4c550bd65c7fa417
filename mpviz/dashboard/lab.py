"""The precision lab: train a demo task or your own model live, toggle layer precisions, watch
what happens.

>>> from mpviz.dashboard import lab_app
>>> lab = lab_app(runs_dir="runs")            # doctest: +SKIP
>>> lab = lab_app(model=model, optimizer=opt, loss_fn=lambda m, b: m(**b).loss,
...               data=loader)                # doctest: +SKIP
>>> lab                                       # doctest: +SKIP
>>> lab.start(max_steps=50, pause_at=20)      # doctest: +SKIP
>>> lab.set_layer_precision("head", "fp32")   # doctest: +SKIP
>>> lab.toggle_pause()                        # doctest: +SKIP

In a notebook or Voila, `lab_app(...)` as the last line of a cell displays the app; the Start
button and the layer menus do what `start` and `set_layer_precision` do; "pause at" pauses
training by itself after that many steps (0: never), so a toggle lands at a step you choose.
A session trains until Stop, or for `max_seconds` (default 10 minutes: a kernel must never
train forever), or `max_steps` when set. Opening the page builds the model and lists its layers;
the run directory is claimed only when training starts, so visits that never press Start leave
nothing in the runs folder.

Your model: `loss_fn(model, batch) -> loss` (forward only; the lab owns autocast, the
GradScaler, backward and the optimizer step, and shows AMP's knobs as controls) or
`train_step(model, batch) -> loss` (does backward and the step itself; the knobs are yours and
shown read-only). `data` is any iterable, iterated again when it ends. Your model keeps training
from where it is across sessions (Reset/Start begin a new run, not new weights); a race trains
copies of it, and of the optimizer state, made when the race starts. A demo task is the same
code path: `mpviz.demos.demo_parts` builds its model, optimizer, data and `loss_fn`. So is a
teaching scenario (`mpviz.scenarios`: the Scenario menu, `lab.load_scenario(name)`,
`lab_app(scenario=name)`), whose parts are built afresh for each session.

Data flow: the worker thread steps the `mpviz.demos.Trainer`(s); a few times a second it reads
the recorded runs back through `mpviz.load_run` + SQL (`queries`), and updates one LivePlot
in place (`plots.RunFigure`). Toggles post to `trainer.policy_handle.update()` (a thread-safe
mailbox); the change takes effect at the next step and is read back from `run.policy_changes`.
"""

from __future__ import annotations

import html
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..formats import AUTOCAST_PRECISIONS, DTYPE_PRECISION, PRECISIONS, did_you_mean
from ..scenarios import SCENARIOS, Scenario, get_scenario
from . import queries, ui
from .diagnosis_panel import DiagnosisPanel
from .plots import RunFigure
from .worker import (DONE, EVAL_SHARE, FAILED, IDLE, PAUSED, RUNNING, TrainingWorker, make_trainer,
                     torch_thread)

TASKS = ("digits", "text", "mlp")
INHERIT = "(policy)"  # dropdown value: no per-layer override
REMOVE = "(remove rule)"  # rule box: drop the rule for that pattern
SCALES = tuple(2.0**k for k in range(0, 25, 2))  # GradScaler init_scale choices
MAX_ALONGSIDE = 2     # race: the main run + up to two more
TABLE_EVERY_S = 2.0   # the layer/overflow tables refresh at most this often
DETAIL_EVERY_S = 10.0  # the dtype map and gradient heatmap too (re-drawn whole by the page) ...
DETAIL_AFTER_CHANGE_S = 2.0  # ... and this long after a precision change shows on the loss curve
LIVE_POINTS = 600      # points per line while training (the plots are ~400-800 px wide)
LIVE_HEAT_CELLS = 6000  # cells of the live gradient heatmap (columns merged beyond)
SESSION_S = 600       # a default session: until Stop, or this long (a kernel must not train forever)
NO_STEP_LIMIT = 2**62  # the worker's step limit when "max steps" is 0
PRESS_START = ("Press <b>Start</b> to train: the loss, samples/s and loss scale are drawn here, "
               "step by step")


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
        self.runs_dir = ui.runs_root(runs_dir)
        self.every, self.seed, self.redraw_s, self.eval_every = every, seed, redraw_s, eval_every
        # Your model's parts (None: a demo task, built fresh by each session).
        self._parts: dict[str, Any] | None = None
        if model is not None:
            self._parts = {"model": model, "optimizer": optimizer, "loss_fn": loss_fn,
                           "train_step": train_step, "data": data, "eval_fn": eval_fn,
                           "eval_data": eval_data}
            if train_step is not None:
                self._parts["scaler"] = scaler
            elif scaler is not None:  # its settings become the knobs' starting values
                s = torch_thread.call(_scaler_settings, scaler) or {}
                grad_scaler = bool(s.get("enabled")) if grad_scaler is None else grad_scaler
                init_scale = s.get("init_scale", init_scale)
                growth_interval = s.get("growth_interval", growth_interval)
            task = name or type(model).__name__
        self.owns_step = train_step is None
        if precision is None:
            precision = "fp32" if model is not None else "fp16"
        if not self.owns_step:
            precision = "fp32"   # the autocast is the train_step's; fp32 = none added by the lab
        self._rules: dict[str, str] = {}  # glob/name rules from the rule box, kept across sessions
        self._syncing = False
        self.worker: TrainingWorker | None = None
        self.trainers: list[Any] = []     # [main, *alongside] of the current session
        self._next: dict[str, Any] | None = None  # the parts the next Start trains (built at reset)
        self.readers: list[Any] = []      # mpviz.Run over each trainer's run, same order
        self._created: list[Path] = []    # run dirs this lab made (empty ones are tidied up)
        self._table_at = self._detail_at = 0.0
        self._marks_seen = 0   # precision changes shown on the loss curve (see _refresh)
        self._lock = threading.RLock()

        # ---- controls
        self.task = widgets.Dropdown(options=TASKS if model is None else (task,), value=task,
                                     description="task" if model is None else "model",
                                     disabled=model is not None)
        self.precision = widgets.Dropdown(options=PRECISIONS, value=precision,
                                          description="precision")
        self.batch = widgets.Dropdown(options=[("default", 0)] + [(str(b), b) for b in (16, 32, 64, 128, 256)],
                                      value=0,
                                      description="batch")
        self.lr = widgets.Dropdown(options=[("default", 0.0)] + [(f"{v:g}", v) for v in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)],
                                   value=0.0, description="lr")
        self.alongside = widgets.SelectMultiple(
            options=PRECISIONS, value=(), rows=5, description="alongside",
            tooltip="Race: train these too, same model, seed and data, interleaved step by step")
        wide = {"description_width": "90px"}
        self.max_steps = widgets.BoundedIntText(value=max_steps, min=0, max=1_000_000,
                                                description="max steps", style=wide,
                                                tooltip="0: no step limit (Stop or the time limit ends it)")
        self.max_seconds = widgets.BoundedIntText(value=int(max_seconds), min=1, max=86_400,
                                                  description="max seconds", style=wide)
        self.pause_at = widgets.BoundedIntText(value=0, min=0, max=1_000_000, description="pause at",
                                               style=wide, tooltip="pause after this many steps (0: never)")
        # AMP's own knobs: controls when the lab owns the step, read-only with a train_step.
        self.grad_scaler = widgets.Checkbox(
            value=(precision == "fp16") if grad_scaler is None else bool(grad_scaler),
            description="GradScaler", indent=False, layout=widgets.Layout(width="110px"))
        scales = sorted(set(SCALES) | {float(init_scale)})
        self.init_scale = widgets.Dropdown(options=[(f"2^{math.log2(v):g}" if v > 0 and math.log2(v).is_integer()
                                                     else f"{v:g}", v) for v in scales],
                                           value=float(init_scale), description="init scale",
                                           layout=widgets.Layout(width="170px"))
        self.growth_interval = widgets.BoundedIntText(value=int(growth_interval), min=1, max=1_000_000,
                                                      description="growth interval",
                                                      style={"description_width": "105px"},
                                                      layout=widgets.Layout(width="230px"))
        self.amp_note = widgets.HTML()
        # Rules by name or glob ("encoder.*.norm*"), kept across sessions.
        self.rule_text = widgets.Text(placeholder="layer or glob, e.g. encoder.*.norm*",
                                      description="rule",
                                      layout=widgets.Layout(width="auto", flex="1 1 160px",
                                                            min_width="160px"))
        self.rule_precision = widgets.Dropdown(options=PRECISIONS + (REMOVE,), value="fp32",
                                               layout=widgets.Layout(width="130px"))
        self.rule_btn = ui.button("Apply rule", "mpviz-rule-apply")
        self.rule_btn.on_click(lambda _: self.add_rule(self.rule_text.value, self.rule_precision.value))
        self.rule_msg = widgets.HTML()
        self.eval_out = widgets.Output()
        self._eval_shown = -1
        for w, cls in ((self.grad_scaler, "mpviz-grad-scaler"), (self.init_scale, "mpviz-init-scale"),
                       (self.growth_interval, "mpviz-growth-interval"), (self.rule_text, "mpviz-rule"),
                       (self.rule_precision, "mpviz-rule-precision"), (self.rule_msg, "mpviz-rule-msg"),
                       (self.eval_out, "mpviz-eval")):
            w.add_class(cls)
        for w, cls in ((self.task, "mpviz-task"), (self.precision, "mpviz-precision"),
                       (self.alongside, "mpviz-alongside"), (self.max_steps, "mpviz-max-steps"),
                       (self.pause_at, "mpviz-pause-at")):
            w.add_class(cls)
        self.start_btn = ui.button("Start", "mpviz-start", "success")
        self.pause_btn = ui.button("Pause", "mpviz-pause")
        self.reset_btn = ui.button("Reset", "mpviz-reset", "warning")
        self.stop_btn = ui.button("Stop", "mpviz-stop", "danger")
        self.status = widgets.HTML()
        self.status.add_class("mpviz-status")
        self.start_btn.on_click(lambda _: self.start())
        self.pause_btn.on_click(lambda _: self.toggle_pause())
        self.reset_btn.on_click(lambda _: self.reset())
        self.stop_btn.on_click(lambda _: self.stop())
        if model is not None:   # your data and optimizer set batch size and lr
            self.batch.layout.display = self.lr.layout.display = "none"
        self.precision.observe(self._on_precision, names="value")
        for w in (self.task, self.batch, self.lr, self.grad_scaler, self.init_scale, self.growth_interval):
            w.observe(self._on_config, names="value")
        self.pause_at.observe(lambda _: self._set_pause_at(), names="value")  # also while training
        # Scenarios that teach (mpviz.scenarios): one click loads a run made to fail in one way.
        self._scenario: Scenario | None = None
        self._home = {"parts": self._parts, "owns_step": self.owns_step, "task": self.task.options,
                      "precision": precision, "every": every, "lrs": self.lr.options,
                      "grad_scaler": self.grad_scaler.value, "max_steps": max_steps}
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

        # ---- figure and tables
        # Heatmaps: a static plot the page re-creates each time (measured: the page's largest
        # cost while training), so at most every 10 s while training; the last state always arrives.
        self.fig = RunFigure(n_slots=1 + MAX_ALONGSIDE, width=900, max_heat_cells=LIVE_HEAT_CELLS,
                             detail_every_s=10.0)
        self.fig.widget.add_class("mpviz-figure")
        self.layer_box = widgets.VBox()
        self.layer_box.add_class("mpviz-layer-table")
        self.overflows = widgets.HTML()
        self.overflows.add_class("mpviz-overflows")
        self._rows: dict[str, tuple[widgets.HTML, widgets.Dropdown]] = {}
        self.diagnosis = DiagnosisPanel(on_apply=self.apply_advice)  # live; Apply advice

        controls = widgets.VBox([
            widgets.HBox([self.scenario, self.scenario_fixed]), self.scenario_note,
            widgets.HBox([self.task, self.precision, self.batch, self.lr]),
            widgets.HBox([self.alongside,
                          widgets.HTML("<span class='mpviz-muted'>race: also train these, same seed "
                                       "and data,<br>interleaved step by step (ctrl-click, up to "
                                       f"{MAX_ALONGSIDE}; pick fp32 for a baseline)</span>"),
                          widgets.VBox([self.max_steps, self.max_seconds, self.pause_at])],
                         layout=widgets.Layout(flex_flow="row wrap")),   # narrow: limits below
            widgets.HBox([self.grad_scaler, self.init_scale, self.growth_interval, self.amp_note]),
            widgets.HBox([self.start_btn, self.pause_btn, self.reset_btn, self.stop_btn, self.status]),
        ])
        # The rule box shrinks, and its button wraps below it on a narrow side panel (never
        # clipped, no sideways scrolling).
        self.rule_row = widgets.HBox([self.rule_text, self.rule_precision, self.rule_btn],
                                     layout=widgets.Layout(flex_flow="row wrap", width="100%"))
        self.rule_row.add_class("mpviz-rule-row")
        side = widgets.VBox([widgets.HTML("<b>Layers</b> <span class='mpviz-muted'>(precision "
                                          "applies at the next step)</span>"),
                             self.rule_row,
                             self.rule_msg, self.layer_box, self.eval_out, self.overflows,
                             self.diagnosis.widget],
                            layout=widgets.Layout(flex="1 1 420px", overflow="auto"))
        self.widget = widgets.VBox([
            ui.title("mpviz precision lab", "mixed-precision training, live, layer by layer"),
            controls, ui.wrap_row(self.fig.view, side)])
        self.widget.add_class("mpviz-app")
        self.widget.add_class("mpviz-lab")
        if scenario:
            self.load_scenario(scenario)
        else:
            self.reset()

    # --------------------------------------------------------------------- sessions
    @property
    def state(self) -> str:
        return self.worker.state if self.worker is not None else IDLE

    def _run_name(self, tag: str) -> str:
        return f"lab-{time.strftime('%Y%m%d-%H%M%S')}-{self.task.value}-{tag}"

    def _amp(self, precision: str, main: bool) -> dict[str, Any]:
        """The AMP knobs for a new trainer (none with a train_step: they are its own)."""
        if not self.owns_step:
            return {}
        # Race lanes get a GradScaler exactly when they are fp16; the main run, the checkbox.
        on = self.grad_scaler.value if main else precision == "fp16"
        return {"grad_scaler": on, "init_scale": float(self.init_scale.value),
                "growth_interval": int(self.growth_interval.value)}

    @property
    def model(self) -> Any:
        """The model the current session trains, or the next Start will (None before any)."""
        if self.trainers:
            return self.trainers[0].model
        return self._next["model"] if self._next is not None else None

    def _session_parts(self) -> dict[str, Any]:
        """What a new session trains: your model (it keeps its weights across sessions), or a
        demo task's or a scenario's parts built afresh (fresh weights: the phenomenon shows again)."""
        if self._scenario is not None:
            return torch_thread.call(self._scenario.parts, self.seed, self.lr.value or None)
        if self._parts is not None:
            return self._parts
        return torch_thread.call(_demo_parts, self.task.value, self.seed, self.batch.value or None,
                                 self.lr.value or None)

    def _new_trainer(self, precision: str, policy: dict[str, str] | None, tag: str) -> Any:
        """The session's main trainer, in a run directory of its own (claimed atomically, now)."""
        precision = precision if self.owns_step else "fp32"   # a train_step brings its autocast
        parts, self._next = self._next or self._session_parts(), None
        t = torch_thread.call(make_trainer, None, precision, parts=parts,
                              runs_root=str(self.runs_dir), run_name=self._run_name(tag),
                              seed=self.seed, every=self.every, policy=policy, meta={"app": "lab"},
                              **self._amp(precision, main=True))
        self._created.append(Path(t.recorder.run_dir))
        return t

    def _fork(self, main: Any, precision: str) -> Any:
        """A race lane: copies of the main model and optimizer state, made now."""
        t = torch_thread.call(main.fork, precision, runs_root=str(self.runs_dir),
                              run_name=self._run_name(f"vs-{precision}"), every=self.every,
                              **self._amp(precision, main=False))
        self._created.append(Path(t.recorder.run_dir))
        return t

    def _open_reader(self, trainer: Any) -> Any:
        import mpviz  # mpviz.run reads SQLite; no torch

        return mpviz.load_run(trainer.recorder.run_dir)

    def reset(self) -> None:
        """Stop any training and get a fresh model ready (the previous run stays on disk). Its
        run is claimed at Start: a page that is only looked at records nothing."""
        with self._lock:
            self._end_session()
            self.fig.clear()
            self.fig.set_placeholder(PRESS_START)
            self.overflows.value = ""
            self.diagnosis.clear()
            self._next = self._session_parts()
            self._labels = [self._tag()]
            self.fig.set_labels(self._labels)
            self._eval_shown = -1
            self.eval_out.outputs = ()
            self._show_amp(self._next)
            self._build_layer_table(torch_thread.call(_model_layers, self._next["model"]))
            self._set_status(f"ready: {self.task.value}, {self.precision.value} · press Start "
                             "to train (the run is recorded from then)")
            self._sync_buttons()

    def start(self, max_steps: int | None = None, max_seconds: float | None = None,
              pause_at: int | None = None) -> None:
        """Start training (or resume when paused) in a new run directory. After a finished
        session, a new one begins from fresh weights with the current layer toggles.
        `max_steps`: 0 for no step limit (the default: until Stop or `max_seconds`); `pause_at`:
        pause by itself after that many steps (0: never; the "pause at" box)."""
        with self._lock:
            if self.state == PAUSED:
                return self.toggle_pause()
            if self.state == RUNNING:
                return
            if max_steps is not None:
                self.max_steps.value = int(max_steps)
            if max_seconds is not None:
                self.max_seconds.value = int(max_seconds)
            if pause_at is not None:
                self.pause_at.value = int(pause_at)
            extra = [p for p in self.alongside.value if p != self.precision.value][:MAX_ALONGSIDE]
            if extra and not self.owns_step:
                self._set_status("a race needs loss_fn: a train_step drives its own optimizer and "
                                 "scaler, which a copy of the model cannot share. Clear "
                                 "'alongside', or build the lab with loss_fn=")
                return
            policy = self.session_policy()
            self._end_session()   # a previous session's trainers (closed when it ended)
            self.fig.clear()
            self.fig.set_placeholder(None)
            main = self._new_trainer(self.precision.value, policy, self._tag())
            self.trainers, self.readers = [main], [self._open_reader(main)]
            if extra:  # every lane steps with its own copy of one RNG state: same dropout masks
                torch_thread.call(self.trainers[0].own_rng)
            for p in extra:
                t = self._fork(self.trainers[0], p)
                self.trainers.append(t)
                self.readers.append(self._open_reader(t))
            self._labels = [self._tag()] + [f"{p} (alongside)" for p in extra]
            self.fig.set_labels(self._labels)
            self._eval_shown = -1
            self.worker = TrainingWorker(self.trainers, max_steps=self.max_steps.value or NO_STEP_LIMIT,
                                         max_seconds=self.max_seconds.value,
                                         on_tick=self._refresh, on_done=self._on_done,
                                         tick_s=self.redraw_s, pause_at=self.pause_at.value or None,
                                         eval_every=self.eval_every)
            self.worker.start()
            self._sync_buttons()

    def toggle_pause(self) -> None:
        if self.worker is None:
            return
        if self.worker.state == RUNNING:
            self.worker.pause()
        elif self.worker.state == PAUSED:
            self.worker.resume()
        self._sync_buttons()
        self._set_status()

    def _set_pause_at(self) -> None:
        if self.worker is not None:
            self.worker.pause_at = self.pause_at.value or None

    def stop(self) -> None:
        """Stop training; the runs are closed and stay on disk."""
        if self.worker is not None and self.worker.alive:
            self.worker.stop()
        self._sync_buttons()

    def close(self) -> None:
        """Stop training and close the widgets."""
        self._end_session()
        self.widget.close()

    def _end_session(self) -> None:
        if self.worker is not None and self.worker.alive:
            self.worker.stop()
        for t in self.trainers:
            torch_thread.call(t.close)
        for r in self.readers:
            r.close()
        # A run this lab created but never stepped is noise in runs/: remove it.
        for t in self.trainers:
            d = Path(t.recorder.run_dir)
            if d in self._created and t.steps_done == 0:
                shutil.rmtree(d, ignore_errors=True)
                self._created.remove(d)
        self.trainers, self.readers, self.worker = [], [], None

    def _on_done(self, worker: TrainingWorker) -> None:
        self._sync_buttons()
        self._set_status()

    # --------------------------------------------------------------------- scenarios
    def load_scenario(self, name: str | None, fixed: bool | None = None) -> Scenario | None:
        """Load a teaching scenario of `mpviz.scenarios` (the Scenario menu): its model, data,
        optimizer and AMP knobs, through the same path as ``lab_app(model=...)``, with its
        explanation shown; each session starts from fresh weights. ``fixed=True`` (or
        ``"NAME-fixed"``): its healthy counterpart. None or "": back to what the lab was built
        with. Stops any training first; press Start (or ``start()``) to train it."""
        sc = get_scenario(name) if name else None
        if sc is not None and fixed is not None:
            base = get_scenario(sc.name.removesuffix("-fixed"))
            sc = base.fixed() if fixed else base
        with self._lock:
            self._end_session()
            home = self._home
            self._scenario = sc
            self._syncing = True
            try:
                self.scenario.value = sc.name.removesuffix("-fixed") if sc else ""
                self.scenario_fixed.value = bool(sc and sc.name.endswith("-fixed"))
                self._parts = None if sc else home["parts"]
                self.owns_step = True if sc else home["owns_step"]
                self.task.options = (sc.name,) if sc else home["task"]
                self.precision.options = PRECISIONS if self.owns_step else self.precision.options
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
                self.every = sc.every if sc else home["every"]
                self._rules = dict(sc.policy or {}) if sc else {}
                self.alongside.value = ()
            finally:
                self._syncing = False
            own = home["parts"] is not None and sc is None
            self.batch.layout.display = "none" if sc or own else None
            self.lr.layout.display = "none" if own else None
            self.scenario_note.value = _scenario_html(sc) if sc else ""
            self.reset()
        return sc

    # --------------------------------------------------------------------- configuration
    def _tag(self) -> str:
        return self.precision.value if self.owns_step else "train_step"

    def _on_precision(self, change: dict) -> None:
        """A new autocast dtype: the GradScaler follows (on for fp16), then one reset."""
        if self._syncing or not self.owns_step:
            return    # with a train_step the menu only shows the autocast it recorded
        if self.owns_step:
            self._syncing = True
            try:
                self.grad_scaler.value = change["new"] == "fp16"
            finally:
                self._syncing = False
        self.reset()

    def _on_config(self, change: dict) -> None:
        if not self._syncing:
            self.reset()

    def _show_amp(self, parts: dict[str, Any]) -> None:
        """With a train_step, show the AMP settings of the scaler it brought (read-only)."""
        if self.owns_step:
            self.amp_note.value = ('<span class="mpviz-muted">AMP knobs apply at Start / Reset'
                                   '</span>')
            return
        amp = torch_thread.call(_scaler_settings, parts.get("scaler")) or {"enabled": False}
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

    def _set_init_scale(self, value: float) -> None:
        """Show ``value`` in the init-scale menu (added to its choices if it is not one)."""
        v = float(value)
        if v not in [o[1] for o in self.init_scale.options]:
            self.init_scale.options = list(self.init_scale.options) + [(f"{v:g}", v)]
        self.init_scale.value = v

    def session_policy(self) -> dict[str, str]:
        """The rules a new session starts with: the rule box's, then the table's per-layer ones."""
        return {**self._rules, **self.overrides()}

    # --------------------------------------------------------------------- rules (names, globs)
    def _live_handle(self) -> Any:
        """The main run's PolicyHandle while it can still change (None after a session ended)."""
        if not self.trainers or (self.worker is not None and not self.worker.alive):
            return None
        return self.trainers[0].policy_handle

    def add_rule(self, pattern: str, precision: str | None) -> bool:
        """Set ``pattern`` (a layer name or a glob such as ``encoder.*.norm*``) to ``precision``
        from the next step (None or "(remove rule)": drop that rule). A rule the policy refuses
        (unknown layer, a glob matching nothing, a precision the device cannot run) is not
        applied: its reason is shown under the box. Returns whether it was accepted."""
        pattern = (pattern or "").strip()
        value = None if precision in (None, REMOVE) else precision
        if not pattern:
            self.rule_msg.value = '<span class="mpviz-bad">type a layer name or a glob first</span>'
            return False
        handle = self._live_handle()
        try:
            if handle is not None:
                handle.update({pattern: value})   # checked here, applied at the next forward
            else:
                torch_thread.call(_check_rule, self.model, pattern, value, self._rules)
        except (ValueError, RuntimeError, TypeError) as e:
            self.rule_msg.value = f'<span class="mpviz-bad">refused: {html.escape(str(e))}</span>'
            return False
        if value is None:
            self._rules.pop(pattern, None)
        else:
            self._rules[pattern] = value
        when = "from the next step" if handle is not None else "from the next Start"
        what = "rule removed" if value is None else f"→ {value}"
        rules = ", ".join(f"{html.escape(k)} → {v}" for k, v in self._rules.items()) or "none"
        self.rule_msg.value = (f"{html.escape(pattern)} {what} {when}"
                               f'<br><span class="mpviz-muted">rules: {rules}</span>')
        return True

    # --------------------------------------------------------------------- layer toggles
    def overrides(self) -> dict[str, str]:
        """The per-layer precisions set in the table ({layer: precision})."""
        return {name: dd.value for name, (_, dd) in self._rows.items() if dd.value != INHERIT}

    def set_layer_precision(self, layer: str, precision: str) -> None:
        """Set one layer's precision from the next step (what the table's dropdowns do)."""
        if layer not in self._rows:
            close = did_you_mean(layer, self._rows) or f"layers: {list(self._rows)[:8]}"
            raise ValueError(f"unknown layer {layer!r}; {close}")
        self._rows[layer][1].value = precision  # fires _on_toggle

    def _on_toggle(self, layer: str, change: dict) -> None:
        if not self.trainers or (self.worker is not None and not self.worker.alive):
            self._set_status("layer precision set: it applies from Start")
            return
        handle = self.trainers[0].policy_handle
        value = change["new"]

        def apply() -> None:  # on the torch thread: between two steps, or now when idle
            if value == INHERIT:
                try:  # drop this layer's own rule: it follows the policy again
                    handle.update({layer: None})
                except ValueError:
                    pass  # it had no rule of its own
            else:
                handle.update({layer: value})

        if self.worker is not None and self.worker.alive:
            self.worker.post(apply)
        else:
            torch_thread.call(apply)
        what = "follows the policy" if value == INHERIT else f"→ {value}"
        self._set_status(f"{queries.layer_label(layer)} {what} from the next step")

    def apply_advice(self) -> tuple[dict[str, str], dict[str, str], dict]:
        """Keep in fp32 the layers `mpviz.advise` names for the main run (the Apply advice
        button), through the layer table's precision menus (rule box for other names); from the
        next step. Returns ({layer: new precision}, policy.reasons, policy.estimate)."""
        import mpviz

        if not self.trainers:
            raise RuntimeError("no run yet: press Start first")
        self.trainers[0].recorder.flush()   # the last steps' rows are in the store
        target = self.precision.value if self.precision.value in AUTOCAST_PRECISIONS else "fp16"
        policy = mpviz.advise(self.readers[0], target=target)
        changed = {}
        for layer in policy.reasons:
            keep = policy.rules[layer]
            if layer in self._rows:
                self.set_layer_precision(layer, keep)
            elif not self.add_rule(layer, keep):
                continue
            changed[layer] = keep
        return changed, dict(policy.reasons), dict(policy.estimate)

    def _build_layer_table(self, layers: list[tuple[str, str, int, int]]) -> None:
        """One row per layer: (name, type, parameters, depth), as `mpviz.demos.model_layers`."""
        rows, self._rows = [], {}
        for name, typ, n_params, depth in layers:
            if name == "":
                continue  # the root follows the base precision control
            label = widgets.HTML(
                f'<span style="padding-left:{12 * (int(depth) - 1)}px" title="{html.escape(typ)}">'
                f'{html.escape(name)}</span> <span class="mpviz-muted">{html.escape(typ)} '
                f'{ui.fmt(n_params) if n_params else ""}</span>',
                layout=widgets.Layout(width="48%"))
            cells = widgets.HTML(layout=widgets.Layout(width="32%"))
            cells.add_class("mpviz-cell")
            dd = widgets.Dropdown(options=(INHERIT,) + PRECISIONS, value=INHERIT,
                                  layout=widgets.Layout(width="20%"))
            dd.add_class("mpviz-toggle")
            dd.observe(lambda ch, n=name: self._on_toggle(n, ch), names="value")
            row = widgets.HBox([label, cells, dd])
            row.add_class("mpviz-layer-row")
            self._rows[name] = (cells, dd)
            rows.append(row)
        self.layer_box.children = [widgets.HTML(
            '<span class="mpviz-muted">layer · type · params &nbsp;|&nbsp; precision in force · '
            'last |grad| · headroom (binades)</span>')] + rows

    # --------------------------------------------------------------------- refresh
    def _refresh(self, worker: TrainingWorker | None = None) -> None:
        """Read the runs back and update the page (called from the training thread)."""
        trainers, readers = list(self.trainers), list(self.readers)
        if not readers:
            return
        for t in trainers:
            t.recorder.flush()  # rows of the last steps are committed before reading
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
        if now - self._table_at >= TABLE_EVERY_S or final:
            self._table_at = now
            self._refresh_tables(trainers[0], readers[0])
        if detail:
            self._draw_evals()   # a static plot, re-drawn whole by the page: as rarely as the heatmaps
        self.diagnosis.refresh(readers[0], force=final)
        if final:
            self._sync_buttons()   # paused by `pause_at`: the buttons say Resume
        self._set_status()

    def _refresh_tables(self, trainer: Any, reader: Any) -> None:
        effective = trainer.policy_handle.effective() if trainer.policy_handle is not None else {}
        base = trainer.precision
        if not self.owns_step:  # the autocast your train_step opened, as recorded
            seen = reader.meta.get("autocast_dtype")
            base = DTYPE_PRECISION.get(seen, "fp32")
            label = f"autocast {base} (train_step)"
            if self.precision.options != (label,):
                self.precision.options = (label,)
        table = queries.layer_table(reader, effective, base=base)
        for name, prec, g, head in zip(table["layer"], table["precision"], table["grad_norm"],
                                       table["headroom"]):
            if name not in self._rows:
                continue
            bad = ' class="mpviz-bad"' if head < 1 else ""  # under one binade left (or overflowed)
            text = (f'<b>{html.escape(prec)}</b> · {ui.fmt(g) or "–"} · '
                    f'<span{bad}>{ui.binades(head)}</span>')
            cells = self._rows[name][0]
            if cells.value != text:
                cells.value = text
        df, total = queries.overflow_table(reader, limit=15)
        self.overflows.value = ui.overflow_html(df, total)

    def _draw_evals(self) -> None:
        """The eval metric of each run (eval_fn every eval_every steps, or on the worker's
        EVAL_SHARE budget), a small static chart."""
        series = [(lab, list(t.evals)) for lab, t in zip(self._labels, self.trainers)]
        n = sum(len(e) for _, e in series)
        if n == 0 or n == self._eval_shown:
            return
        self._eval_shown = n
        import plotly.graph_objects as go

        from .plots import COLORS, show_static

        name = getattr(self.trainers[0].eval_fn, "__name__", "eval") or "eval"
        how = (f"every {self.eval_every} steps" if self.eval_every
               else f"taking at most {EVAL_SHARE:.0%} of training time")
        fig = go.Figure([go.Scatter(x=[s for s, _ in e], y=[v for _, v in e], name=lab,
                                    mode="lines+markers", line=dict(color=COLORS[i % len(COLORS)]))
                         for i, (lab, e) in enumerate(series)])
        fig.update_layout(height=220, margin=dict(l=50, r=10, t=30, b=30),
                          title=dict(text=f"eval: {name} (fp32, {how})",
                                     font=dict(size=12)))
        show_static(self.eval_out, fig)

    def _set_status(self, note: str = "") -> None:
        w = self.worker
        if w is None:
            text = note or "ready"
        else:
            limit = f" / {w.max_steps}" if w.max_steps < NO_STEP_LIMIT else ""
            parts = [f"<b>{w.state}</b>", f"step {w.rounds}{limit}",
                     f"{w.elapsed_s:.0f} s / {w.max_seconds:.0f} s"]
            if self.readers:
                try:
                    last = self.readers[0].query(
                        "SELECT samples_per_s FROM steps ORDER BY step DESC LIMIT 20")
                    if len(last):
                        parts.append(f"{last['samples_per_s'].median():.0f} samples/s")
                except Exception:
                    pass
            if w.state in (DONE, FAILED) and w.reason:
                parts.append(html.escape(w.reason))
            if w.tick_error:
                parts.append(f'<span class="mpviz-bad">display: {html.escape(w.tick_error)}</span>')
            if w.post_error:
                parts.append(f'<span class="mpviz-bad">toggle: {html.escape(w.post_error)}</span>')
            if note:
                parts.append(html.escape(note))
            text = " · ".join(parts)
        if self.status.value != text:
            self.status.value = text

    def _sync_buttons(self) -> None:
        s = self.state
        busy = s in (RUNNING, PAUSED)
        self.start_btn.disabled = s == RUNNING
        self.start_btn.description = "Resume" if s == PAUSED else "Start"
        self.pause_btn.disabled = not busy
        self.pause_btn.description = "Resume" if s == PAUSED else "Pause"
        self.stop_btn.disabled = not busy
        for w in (self.task, self.precision, self.batch, self.lr, self.alongside):
            w.disabled = busy
        self.task.disabled = busy or self._parts is not None or self._scenario is not None
        self.scenario.disabled = self.scenario_fixed.disabled = busy
        for w in (self.grad_scaler, self.init_scale, self.growth_interval):
            w.disabled = busy or not self.owns_step
        self.precision.disabled = busy or not self.owns_step


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


def _demo_parts(task: str, seed: int, batch_size: int | None, lr: float | None) -> dict[str, Any]:
    from mpviz.demos import demo_parts  # torch: on the torch thread

    return demo_parts(task, seed, batch_size, lr)


def _model_layers(model: Any) -> list[tuple[str, str, int, int]]:
    from mpviz.demos import model_layers  # torch: on the torch thread

    return model_layers(model)


def _scaler_settings(scaler: Any) -> dict[str, Any] | None:
    from mpviz.compat import scaler_settings  # torch: on the torch thread

    return scaler_settings(scaler)


def _check_rule(model: Any, pattern: str, precision: str | None, rules: dict[str, str]) -> None:
    """Check a rule against the model when no policy is live (between sessions)."""
    if precision is None:
        if pattern not in rules:
            raise ValueError(f"no rule {pattern!r} to remove; rules: {list(rules) or 'none'}")
        return
    from mpviz.precision import canonical, validate_rules

    first = next(iter(model.parameters()), None)
    validate_rules(model, [pattern], first.device.type if first is not None else "cpu",
                   [canonical(precision)])


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
