"""The precision lab: train a demo task live, toggle layer precisions, watch what happens.

>>> from mpviz.dashboard import lab_app
>>> lab = lab_app(runs_dir="runs")            # doctest: +SKIP
>>> lab                                       # doctest: +SKIP
>>> lab.start(max_steps=50, pause_at=20)      # doctest: +SKIP
>>> lab.set_layer_precision("head", "fp32")   # doctest: +SKIP
>>> lab.toggle_pause()                        # doctest: +SKIP

In a notebook or Voila, `lab_app(...)` as the last line of a cell displays the app; the Start
button and the layer menus do what `start` and `set_layer_precision` do; "pause at" pauses
training by itself after that many steps (0: never), so a toggle lands at a step you choose.

Data flow: the worker thread steps the `mpviz.demos.Trainer`(s); a few times a second it reads
the recorded runs back through `mpviz.load_run` + SQL (`queries`), and updates one FigureWidget
in place (`plots.RunFigure`). Toggles post to `trainer.policy_handle.update()` (a thread-safe
mailbox); the change takes effect at the next step and is read back from `run.policy_changes`.
"""

from __future__ import annotations

import html
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from . import queries, ui
from .plots import RunFigure
from .worker import DONE, FAILED, IDLE, PAUSED, RUNNING, TrainingWorker, make_trainer, torch_thread

TASKS = ("digits", "text", "mlp")
INHERIT = "(policy)"  # dropdown value: no per-layer override
MAX_ALONGSIDE = 2     # race: the main run + up to two more
TABLE_EVERY_S = 1.0   # the layer/overflow tables refresh at most this often
DETAIL_EVERY_S = 2.0  # the dtype map and gradient heatmap too


class Lab(ui.App):
    """The live precision lab. Build with `lab_app()`; `lab.widget` is the app."""

    def __init__(self, runs_dir: str | Path | None = None, task: str = "digits",
                 precision: str = "fp16", max_steps: int = 1000, max_seconds: float = 600.0,
                 every: int = 5, seed: int = 0, redraw_s: float = 0.5) -> None:
        self.runs_dir = ui.runs_root(runs_dir)
        self.every, self.seed, self.redraw_s = every, seed, redraw_s
        self.worker: TrainingWorker | None = None
        self.trainers: list[Any] = []     # [main, *alongside] of the current session
        self.readers: list[Any] = []      # mpviz.Run over each trainer's run, same order
        self._created: list[Path] = []    # run dirs this lab made (empty ones are tidied up)
        self._table_at = self._detail_at = 0.0
        self._lock = threading.RLock()

        # ---- controls
        self.task = widgets.Dropdown(options=TASKS, value=task, description="task")
        self.precision = widgets.Dropdown(options=queries.PRECISIONS, value=precision,
                                          description="precision")
        self.batch = widgets.Dropdown(options=[("default", 0)] + [(str(b), b) for b in (16, 32, 64, 128, 256)],
                                      value=0,
                                      description="batch")
        self.lr = widgets.Dropdown(options=[("default", 0.0)] + [(f"{v:g}", v) for v in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)],
                                   value=0.0, description="lr")
        self.alongside = widgets.SelectMultiple(
            options=queries.PRECISIONS, value=(), rows=5, description="alongside",
            tooltip="Race: train these too, same model, seed and data, interleaved step by step")
        wide = {"description_width": "90px"}
        self.max_steps = widgets.BoundedIntText(value=max_steps, min=1, max=1_000_000,
                                                description="max steps", style=wide)
        self.max_seconds = widgets.BoundedIntText(value=int(max_seconds), min=1, max=86_400,
                                                  description="max seconds", style=wide)
        self.pause_at = widgets.BoundedIntText(value=0, min=0, max=1_000_000, description="pause at",
                                               style=wide, tooltip="pause after this many steps (0: never)")
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
        for w in (self.task, self.precision, self.batch, self.lr):
            w.observe(lambda _: self.reset(), names="value")
        self.pause_at.observe(lambda _: self._set_pause_at(), names="value")  # also while training

        # ---- figure and tables
        self.fig = RunFigure(n_slots=1 + MAX_ALONGSIDE, width=900)
        self.fig.widget.add_class("mpviz-figure")
        self.layer_box = widgets.VBox()
        self.layer_box.add_class("mpviz-layer-table")
        self.overflows = widgets.HTML()
        self.overflows.add_class("mpviz-overflows")
        self._rows: dict[str, tuple[widgets.HTML, widgets.Dropdown]] = {}

        controls = widgets.VBox([
            widgets.HBox([self.task, self.precision, self.batch, self.lr]),
            widgets.HBox([self.alongside,
                          widgets.HTML("<span class='mpviz-muted'>race: also train these, same seed "
                                       "and data,<br>interleaved step by step (ctrl-click, up to "
                                       f"{MAX_ALONGSIDE}; pick fp32 for a baseline)</span>"),
                          widgets.VBox([self.max_steps, self.max_seconds, self.pause_at])]),
            widgets.HBox([self.start_btn, self.pause_btn, self.reset_btn, self.stop_btn, self.status]),
        ])
        side = widgets.VBox([widgets.HTML("<b>Layers</b> <span class='mpviz-muted'>(precision "
                                          "applies at the next step)</span>"),
                             self.layer_box, self.overflows],
                            layout=widgets.Layout(flex="1 1 420px", overflow="auto"))
        plot = widgets.Box([self.fig.widget], layout=widgets.Layout(flex="0 0 auto"))
        self.widget = widgets.VBox([
            ui.title("mpviz precision lab", "mixed-precision training, live, layer by layer"),
            controls, widgets.HBox([plot, side])])
        self.widget.add_class("mpviz-app")
        self.widget.add_class("mpviz-lab")
        self.reset()

    # --------------------------------------------------------------------- sessions
    @property
    def state(self) -> str:
        return self.worker.state if self.worker is not None else IDLE

    def _new_trainer(self, precision: str, policy: dict[str, str] | None, tag: str) -> Any:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = self.runs_dir / f"lab-{stamp}-{self.task.value}-{tag}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = self.runs_dir / f"lab-{stamp}-{self.task.value}-{tag}-{n}"
        t = torch_thread.call(make_trainer, self.task.value, precision, str(run_dir),
                              batch_size=self.batch.value or None, lr=self.lr.value or None,
                              seed=self.seed, every=self.every, policy=policy, meta={"app": "lab"})
        self._created.append(run_dir)
        return t

    def _open_reader(self, trainer: Any) -> Any:
        import mpviz  # mpviz.run reads SQLite; no torch

        return mpviz.load_run(trainer.recorder.run_dir)

    def reset(self) -> None:
        """Stop any training, start a fresh model and run (the previous run stays on disk)."""
        with self._lock:
            self._end_session()
            self.fig.clear()
            self.overflows.value = ""
            main = self._new_trainer(self.precision.value, None, self.precision.value)
            self.trainers, self.readers = [main], [self._open_reader(main)]
            self.fig.set_labels([self.precision.value])
            self._build_layer_table()
            self._set_status(f"ready: {self.task.value}, {self.precision.value} "
                             f"(run {main.recorder.run_dir.name})")
            self._sync_buttons()

    def start(self, max_steps: int | None = None, max_seconds: float | None = None,
              pause_at: int | None = None) -> None:
        """Start training (or resume when paused). After a finished session, a new one begins
        from fresh weights with the current layer toggles. `pause_at`: pause by itself after
        that many steps (0: never; the "pause at" box)."""
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
            if self.worker is not None:  # the previous session closed its trainers
                overrides = self.overrides()
                self._end_session()
                self.fig.clear()
                main = self._new_trainer(self.precision.value, overrides, self.precision.value)
                self.trainers, self.readers = [main], [self._open_reader(main)]
            extra = [p for p in self.alongside.value if p != self.precision.value][:MAX_ALONGSIDE]
            for p in extra:
                t = self._new_trainer(p, None, f"vs-{p}")
                self.trainers.append(t)
                self.readers.append(self._open_reader(t))
            self.fig.set_labels([self.precision.value] + [f"{p} (alongside)" for p in extra])
            self.worker = TrainingWorker(self.trainers, max_steps=self.max_steps.value,
                                         max_seconds=self.max_seconds.value,
                                         on_tick=self._refresh, on_done=self._on_done,
                                         tick_s=self.redraw_s, pause_at=self.pause_at.value or None)
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

    # --------------------------------------------------------------------- layer toggles
    def overrides(self) -> dict[str, str]:
        """The per-layer precisions set in the table ({layer: precision})."""
        return {name: dd.value for name, (_, dd) in self._rows.items() if dd.value != INHERIT}

    def set_layer_precision(self, layer: str, precision: str) -> None:
        """Set one layer's precision from the next step (what the table's dropdowns do)."""
        if layer not in self._rows:
            import difflib

            close = difflib.get_close_matches(layer, list(self._rows), n=3)
            raise ValueError(f"unknown layer {layer!r}; close matches: {close or list(self._rows)[:8]}")
        self._rows[layer][1].value = precision  # fires _on_toggle

    def _on_toggle(self, layer: str, change: dict) -> None:
        if not self.trainers or (self.worker is not None and not self.worker.alive):
            self._set_status("layer precision set: it applies when you Start again")
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

    def _build_layer_table(self) -> None:
        layers = self.readers[0].layers
        rows, self._rows = [], {}
        for name, typ, n_params, depth in zip(layers["layer"], layers["type"], layers["n_params"],
                                              layers["depth"]):
            if name == "":
                continue  # the root follows the base precision control
            label = widgets.HTML(
                f'<span style="padding-left:{12 * (int(depth) - 1)}px" title="{html.escape(typ)}">'
                f'{html.escape(name)}</span> <span class="mpviz-muted">{html.escape(typ)} '
                f'{ui.fmt(n_params) if n_params else ""}</span>',
                layout=widgets.Layout(width="48%"))
            cells = widgets.HTML(layout=widgets.Layout(width="32%"))
            cells.add_class("mpviz-cell")
            dd = widgets.Dropdown(options=(INHERIT,) + queries.PRECISIONS, value=INHERIT,
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
        # every DETAIL_EVERY_S while training.
        detail = final or now - self._detail_at >= DETAIL_EVERY_S
        if detail:
            self._detail_at = now
        for slot, reader in enumerate(readers):
            snap = queries.snapshot(reader, detail=detail and slot == 0)
            self.fig.update(slot, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
        if now - self._table_at >= TABLE_EVERY_S or final:
            self._table_at = now
            self._refresh_tables(trainers[0], readers[0])
        if final:
            self._sync_buttons()   # paused by `pause_at`: the buttons say Resume
        self._set_status()

    def _refresh_tables(self, trainer: Any, reader: Any) -> None:
        effective = trainer.policy_handle.effective() if trainer.policy_handle is not None else {}
        table = queries.layer_table(reader, effective, base=trainer.precision)
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

    def _set_status(self, note: str = "") -> None:
        w = self.worker
        if w is None:
            text = note or "ready"
        else:
            parts = [f"<b>{w.state}</b>", f"step {w.rounds} / {w.max_steps}",
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


def lab_app(runs_dir: str | Path | None = None, **kwargs: Any) -> Lab:
    """The precision lab app (display it: last line of a cell, or `display(lab_app())`).

    `runs_dir`: where runs are written (`$MPVIZ_RUNS_DIR` overrides it). Other keywords go to
    `Lab` (task, precision, max_steps, max_seconds, every, seed, redraw_s: the least time
    between two redraws while training).

    >>> lab = lab_app(runs_dir="runs", task="mlp", precision="bf16")   # doctest: +SKIP
    """
    return Lab(runs_dir=runs_dir, **kwargs)
