"""The run explorer: open any run directory, finished or still being written, and follow it.

>>> from mpviz.dashboard import explorer_app
>>> ex = explorer_app(runs_dir="runs")          # doctest: +SKIP
>>> ex.open("runs/exp1"); ex.set_range(0, 500)  # doctest: +SKIP

Following a live run, a `Follower` thread polls `run.steps_since(last)` and redraws from the
decimated views (`queries`). It ends when the run does, after `idle_timeout_s` without new steps,
after `max_follow_s`, or on `close()`/unticking Follow: an abandoned page does not pin a kernel.
"""

from __future__ import annotations

import html
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import ipywidgets as widgets

from ..diagnosis.advise import precision_in_force
from . import paths, queries, run_list, ui
from .diagnosis_panel import DiagnosisPanel, exponent_figure
from .estimate_panel import EstimatePanel
from .plots import RunFigure, layer_history_figure, show_static
from .speed import Predictor, load_counts, measured
from .steer_panel import SteerPanel
from .worker import UI_SHARE, share_wait

DRILL_EVERY_S = 2.0  # the drill-down chart re-renders at most this often while following
NO_LAYER = [("(pick a layer)", "")]
NO_COUNTS = ("No speed estimate for this run: its step was not counted (runs of the lab and of "
             "mpviz demo are; or save one with mpviz.cost.save_counts).")


class Follower:
    """The thread that follows a live run: ``poll(woken)`` every ``poll_s`` (less often when a
    redraw, ``cost()`` seconds, would take more than UI_SHARE of a core), or at once after
    :meth:`wake`. ``poll`` returns whether new steps arrived, or None when the run ended; the
    thread also ends after ``idle_timeout_s`` without new steps, after ``max_s``, or on
    :meth:`stop`. ``on_error(e)`` gets what ``poll`` raised; ``on_end()`` runs last."""

    def __init__(self, poll: Callable[[bool], bool | None], cost: Callable[[], float],
                 on_error: Callable[[Exception], None], on_end: Callable[[], None],
                 poll_s: float, idle_timeout_s: float, max_s: float) -> None:
        self.poll, self.cost, self.on_error, self.on_end = poll, cost, on_error, on_end
        self.poll_s, self.idle_timeout_s, self.max_s = poll_s, idle_timeout_s, max_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.thread: threading.Thread | None = None   # None once it ended

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._stop.clear()
        self.thread = threading.Thread(target=self._loop, name="mpviz-explorer-follow", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop_soon(self) -> None:
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        """End the thread and wait for it (unless called from it)."""
        self.stop_soon()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(10)
        self.thread = None

    def _loop(self) -> None:
        started = last_new = time.monotonic()
        try:
            while not self._stop.is_set():
                # Redraws take at most UI_SHARE of a core (a refresh that took 50 ms waits
                # ~1 s): a page on the machine that trains takes little from it.
                self._wake.wait(max(self.poll_s, share_wait(self.cost(), UI_SHARE)))
                woken = self._wake.is_set()
                self._wake.clear()
                if self._stop.is_set():
                    break
                new = self.poll(woken)
                if new is None:
                    break
                now = time.monotonic()
                last_new = now if new else last_new
                if now - last_new > self.idle_timeout_s or now - started > self.max_s:
                    break
        except Exception as e:
            self.on_error(e)
        finally:
            if self.thread is threading.current_thread():
                self.thread = None
            self.on_end()


class Explorer(ui.App):
    """Plots of one run, a step range selector, a per-layer drill-down; follows live runs."""

    def __init__(self, run_dir: str | Path | None = None, runs_dir: str | Path | None = None,
                 follow: bool = True, poll_s: float = 0.5, idle_timeout_s: float = 600.0,
                 max_follow_s: float = 4 * 3600.0) -> None:
        self.runs_dir = ui.runs_root(runs_dir)
        self.run: Any = None
        self.last_seen = -1          # last step the follower has seen
        self.refresh_cost_s = 0.0
        self._lock = threading.RLock()   # one refresh at a time (follower vs. callbacks)
        self.follower = Follower(self._poll, lambda: self.refresh_cost_s, self._follow_failed,
                                 self._follow_ended, poll_s, idle_timeout_s, max_follow_s)
        self._own_slider_change = self._own_rank_change = False
        self._drill_at = 0.0
        self._predictor: Predictor | None = None   # the run's counted step, priced
        self._make_widgets(follow)
        self.rescan(select=run_dir)

    def _make_widgets(self, follow: bool) -> None:
        self.picker = widgets.Dropdown(description="run", layout=widgets.Layout(width="60%"))
        self.picker.add_class("mpviz-run-picker")
        rescan = ui.button("Rescan", "mpviz-rescan")
        # A distributed run: which rank's store to show (shown only when the run has several).
        self.rank_pick = widgets.Dropdown(description="rank", options=[("rank 0", 0)], value=0,
                                          layout=widgets.Layout(width="150px", display="none"))
        self.rank_pick.add_class("mpviz-rank-pick")
        self.follow = widgets.Checkbox(value=follow, description="follow live", indent=False)
        self.follow.add_class("mpviz-follow")
        self.info = _html("mpviz-steps")
        self.meta = widgets.HTML()
        self.range = widgets.IntRangeSlider(value=(0, 0), min=0, max=0, description="steps",
                                            continuous_update=False,
                                            layout=widgets.Layout(width="95%"))
        self.range.add_class("mpviz-range")
        self.layer = widgets.Dropdown(description="drill-down", options=NO_LAYER)
        self.layer.add_class("mpviz-layer-pick")
        self.drill = widgets.Output()
        self.drill.add_class("mpviz-drill")
        self.exponents = widgets.Output()  # the drill-down layer's log2|x| over time
        self.exponents.add_class("mpviz-exponents")
        self.overflows = _html("mpviz-overflows")
        # Static: it follows runs already training, and a page that loads while a live widget
        # is being updated can freeze that widget (liveplot.py); an Output never does.
        self.fig = RunFigure(n_slots=1, static=True)
        self.fig.widget.add_class("mpviz-figure")
        self.estimate = EstimatePanel(self._gpu_picked,
                                      measured_label="measured in this run")
        self.steer = SteerPanel()  # shown for a live run recorded with steerable=True
        # mpviz.diagnose(run) after each draw, on its own thread, at most every 2 s (or 10x its
        # cost); "Apply advice" steers a live steerable run
        self.diagnosis = DiagnosisPanel(on_apply=self.steer.apply_advice,
                                        offer=self.steer.advice_offer, advice=self.steer.advice)
        self._lay_out(rescan)

    def _lay_out(self, rescan: widgets.Button) -> None:
        rescan.on_click(lambda _: self.rescan())
        self.picker.observe(self._on_pick, names="value")
        self.rank_pick.observe(self._on_rank, names="value")
        self.follow.observe(self._on_follow, names="value")
        self.range.observe(self._on_range, names="value")
        self.layer.observe(lambda _: self._request_refresh(drill=True), names="value")
        column = widgets.Layout
        self.widget = widgets.VBox([
            ui.title("mpviz run explorer", "open a run, finished or still training"),
            widgets.HBox([self.picker, self.rank_pick, rescan, self.follow]),
            self.info, self.meta, self.estimate.widget, self.range, self.fig.view, self.steer.widget,
            widgets.HBox([widgets.VBox([self.layer, self.drill, self.exponents], layout=column(width="60%")),
                          widgets.VBox([self.overflows, self.diagnosis.widget], layout=column(width="40%"))]),
        ])
        self.widget.add_class("mpviz-app")
        self.widget.add_class("mpviz-explorer")

    # ------------------------------------------------------------------ opening
    def rescan(self, select: str | Path | None = None) -> None:
        """Re-list the runs under runs_dir; open `select` (default: the newest run that has
        steps)."""
        runs, refused = run_list.scan(self.runs_dir, [] if select is None else [select],
                                      given_first=True)
        if refused:
            select = None
        if select is None and runs and not refused:
            # An empty run (a job starting, or one killed at once) would show empty plots.
            select = run_list.newest_with_steps(runs) or runs[0]
        if not runs:
            self.info.value = (f"No runs under <code>{self.runs_dir}</code> yet: train one in the lab "
                               f"or with <code>python -m mpviz demo --run-dir {self.runs_dir}/demo</code>, "
                               f"then press Rescan.")
        self.picker.options = [(p.name, str(p)) for p in runs]
        if refused:
            self.picker.value = None
            self._show_problem(refused[0])
        elif select is not None:
            if self.picker.value == str(select):
                self.open(str(select))
            else:
                self.picker.value = str(select)  # fires _on_pick -> open

    def _on_pick(self, change: dict) -> None:
        if change["new"]:
            self.open(change["new"])

    def open(self, run_dir: str | Path) -> None:
        """Show the run in `run_dir` (and follow it if it is still being written)."""
        self.follower.stop()
        with self._lock:
            if self.run is not None:
                self.run.close()
                self.run = None
            try:
                self.run = paths.open_run(self.runs_dir, run_dir)  # confined, and read once
            except paths.RunUnavailable as e:  # corrupt, empty, foreign, newer, outside the root
                self._show_problem(e)
                return
            self._show_ranks()
            self.last_seen = self.run.last_step
            self._show_meta(self.run.meta)
            self._predictor = None
            self.layer.options = NO_LAYER + [(queries.layer_label(n), n) for n in self.run.layers["layer"]]
            self.fig.clear()
            self.steer.show(self.run)
            self._set_slider(0, max(self.last_seen, 0), follow_end=True, reset=True)
            self.refresh(drill=True)
        if self.follow.value:
            self._start_follower()

    def _show_meta(self, meta: dict) -> None:
        self.meta.value = ui.html_table(
            ["status", "model", "task", "precision", "autocast", "every", "device", "torch"],
            [[html.escape(queries.run_status(meta))] + [html.escape(str(meta.get(k, ""))) for k in
              ("model", "task", "precision", "autocast_dtype", "every", "device", "torch_version")]])

    def _show_ranks(self) -> None:
        """A run of several ranks: show the rank menu (rank 0 first) and read that rank only."""
        ranks = list(self.run.ranks)
        self._own_rank_change = True
        try:
            self.rank_pick.options = [(f"rank {r}", r) for r in ranks]
            self.rank_pick.value = ranks[0]
        finally:
            self._own_rank_change = False
        self.rank_pick.layout.display = None if len(ranks) > 1 else "none"
        if len(ranks) > 1:
            one = self.run.for_rank(ranks[0])
            self.run.close()
            self.run = one

    def _on_rank(self, change: dict) -> None:
        if self._own_rank_change or self.run is None or change["new"] is None:
            return
        self.follower.stop()
        with self._lock:
            try:
                one = self.run.for_rank(int(change["new"]))
            except paths.STORE_ERRORS as e:
                self._show_problem(paths.describe(self.run.run_dir, e))
                return
            self.run.close()
            self.run = one
            self.last_seen = one.last_step
            self._set_slider(0, max(self.last_seen, 0), follow_end=True)
            self.refresh(drill=True)
        if self.follow.value:
            self._start_follower()

    # ------------------------------------------------------------------ range
    def set_range(self, lo: int, hi: int) -> None:
        """Show steps [lo, hi] (the slider does the same)."""
        self.range.value = (lo, hi)

    def _set_slider(self, lo: int, hi_max: int, follow_end: bool, reset: bool = False) -> None:
        """Grow the slider to the run's length; keep the user's window unless it touched the end."""
        self._own_slider_change = True
        try:
            # One message for max and value: a page that applied a new value before the new max
            # clamped it to the old max and sent that back, and the range stopped following.
            with self.range.hold_sync():
                old_lo, old_hi = self.range.value
                at_end = old_hi >= self.range.max
                self.range.max = max(hi_max, 0)
                if reset:
                    self.range.value = (0, self.range.max)
                elif follow_end and at_end:
                    self.range.value = (old_lo, self.range.max)
        finally:
            self._own_slider_change = False

    def _on_range(self, change: dict) -> None:
        if not self._own_slider_change:
            self._request_refresh(drill=True)

    def _request_refresh(self, drill: bool = False) -> None:
        if drill:
            self._drill_at = 0.0
        if self.follower.alive:
            self.follower.wake()   # the follower refreshes on its own thread
        else:
            self.refresh(drill=drill)

    # ------------------------------------------------------------------ drawing
    def refresh(self, drill: bool = False) -> None:
        """Re-read the run over the selected step range and update every view; a store that
        became unreadable (corrupt, deleted) shows one message instead."""
        self._with_run(lambda run: self._draw(drill))

    def _with_run(self, draw: Callable[[Any], None]) -> None:
        """``draw(run)`` under the lock, if a run is open; a store that became unreadable
        (corrupt, deleted) shows one message instead."""
        with self._lock:
            run = self.run
            if run is None:
                return
            try:
                draw(run)
            except paths.STORE_ERRORS as e:
                self._show_problem(paths.describe(run.run_dir, e))

    def _show_problem(self, message: str | BaseException) -> None:
        """Show one message instead of a run: the run is closed, the views emptied, following
        stops. Picking another run works as before."""
        self.follower.stop_soon()
        with self._lock:
            run, self.run = self.run, None
            if run is not None:
                run.close()
            self.fig.clear()
            self.meta.value = self.overflows.value = ""
            self.estimate.say("")
            self.drill.outputs = self.exponents.outputs = ()
            self.steer.hide()
            self.diagnosis.clear()
            self.layer.options = NO_LAYER
            self._set_slider(0, 0, follow_end=False, reset=True)
            self.info.value = (f"<span class='mpviz-bad mpviz-problem'>{html.escape(str(message))}"
                               f"</span>")

    def _draw(self, drill: bool = False) -> None:
        if self.run is None:
            return
        with self._lock:
            t0 = time.perf_counter()
            run = self.run
            lo, hi = self.range.value
            if hi >= self.range.max:
                hi = max(run.last_step, hi)
            snap = queries.snapshot(run, lo, hi)
            self.fig.update(0, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
            df, total = queries.overflow_table(run, limit=20)
            self.overflows.value = ui.overflow_html(df, total)
            self.steer.refresh(run)
            self._show_speed(run)
            now = time.monotonic()
            if self.layer.value and (drill or now - self._drill_at >= DRILL_EVERY_S):
                self._drill_at = now
                hist = queries.layer_history(run, self.layer.value, lo, hi)
                show_static(self.drill, layer_history_figure(hist, self.layer.value))
                show_static(self.exponents, exponent_figure(run, self.layer.value, lo, hi))
            # after the plots, on a thread of its own: a long run's diagnosis takes seconds
            self.diagnosis.refresh_later(run, force=drill or run.meta.get("status") != "running")
            self.refresh_cost_s = time.perf_counter() - t0
            self._show_info()

    def _gpu_picked(self, _: str) -> None:
        self._with_run(self._show_speed)

    def _show_speed(self, run: Any) -> None:
        """The speed measured in the run beside the estimate, on the GPU picked, of the precision
        in force and of fp32, from the step counted with the run (one line when it has none)."""
        if self._predictor is None:
            try:
                counts = load_counts(run.run_dir)
            except (OSError, ValueError, KeyError, TypeError) as e:   # a damaged counts file
                self.estimate.say(f"No speed estimate: this run's counts.json.gz is unreadable ({e}).")
                self.estimate.gpu.layout.display = "none"
                return
            if counts is None:   # a live run counts its first step: it may come later
                self.estimate.say(NO_COUNTS)
                self.estimate.gpu.layout.display = "none"
                return
            self._predictor = Predictor(counts)
            self.estimate.gpu.layout.display = None
        speed = self._predictor.speed(precision_in_force(run), self.estimate.gpu.value)
        self.estimate.show(speed, measured(run))

    def _show_info(self) -> None:
        run = self.run
        n = run.last_step + 1
        status = queries.run_status(run.meta)
        self.info.value = (f"<b>{run.run_dir.name}</b> · <span class='mpviz-step-count'>{n}</span> steps"
                           f" · {status}" + (" · following" if self.follower.alive else "")
                           + f" · drawn in {self.refresh_cost_s * 1000:.0f} ms")

    # ------------------------------------------------------------------ following
    def _on_follow(self, change: dict) -> None:
        if change["new"]:
            self._start_follower()
        else:
            self.follower.stop()
            if self.run is not None:
                self._show_info()

    def _start_follower(self) -> None:
        if self.run is None or self.follower.alive:
            return
        if not self.run.is_live or queries.process_gone(self.run.meta):
            return  # a finished (or killed) run does not grow
        self.follower.start()

    def _poll(self, woken: bool) -> bool | None:
        """The follower's look at the run: whether new steps arrived; None once it ended."""
        run = self.run
        if run is None:
            return None
        if not run.path.exists():   # rmtree'd while open: the connection would still read
            self._show_problem(f"{run.run_dir.name} was deleted while open (it had "
                               f"{self.last_seen + 1} steps): pick another run or press Rescan")
            return None
        new = run.steps_since(self.last_seen)
        meta = run.meta
        live = meta.get("status") == "running" and not queries.process_gone(meta)
        if len(new):
            self.last_seen = int(new["step"].iloc[-1])
            with self._lock:
                self._set_slider(0, self.last_seen, follow_end=True)
        if len(new) or woken or not live:
            self.refresh(drill=woken)
        if not live and not len(new):
            return None  # finished (or failed): nothing more will come
        return bool(len(new))

    def _follow_failed(self, e: Exception) -> None:
        run = self.run
        if isinstance(e, paths.STORE_ERRORS):   # the store broke (or vanished) while following
            if run is not None:
                self._show_problem(paths.describe(run.run_dir, e))
        else:   # the page keeps what it has; the status line says following stopped
            traceback.print_exception(e, file=sys.__stderr__)   # the server log, not the page

    def _follow_ended(self) -> None:
        try:
            if self.run is not None:
                self._show_info()
        except Exception:
            pass

    def close(self) -> None:
        self.follower.stop()
        self.diagnosis.close()
        if self.run is not None:
            self.run.close()
        self.widget.close()


def _html(cls: str) -> widgets.HTML:
    w = widgets.HTML()
    w.add_class(cls)
    return w


def explorer_app(run_dir: str | Path | None = None, runs_dir: str | Path | None = None,
                 **kwargs: Any) -> Explorer:
    """The run explorer app. Opens `run_dir`, or the newest run under `runs_dir` that has steps
    (`$MPVIZ_RUNS_DIR` overrides it).

    >>> ex = explorer_app(runs_dir="runs")   # doctest: +SKIP
    """
    return Explorer(run_dir=run_dir, runs_dir=runs_dir, **kwargs)
