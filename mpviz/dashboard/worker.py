"""Training on the dashboards' one torch thread, bounded by a step limit, a time limit and Stop.

Widget events do not reach a kernel busy in a cell, so the lab trains on a daemon thread
(`torch_thread`, the only one that runs torch) and the kernel stays free for toggles. Voila
never culls a kernel whose thread keeps updating widgets, so training always ends: at
`max_steps`, after `max_seconds` (pauses included), or on `stop()`; `pause_at=N` pauses it by
itself after N steps, so that a toggle lands at a known step.

A race steps several trainers in turn on the same batch. `on_tick(worker)` (the page's redraw)
and, with ``eval_every=None``, evaluations are spaced by `share_wait` so that they take at most
`UI_SHARE` and `EVAL_SHARE` of the thread (plus one evaluation on the final weights).

>>> from mpviz.dashboard.worker import TrainingWorker, make_trainer
>>> t = make_trainer("mlp", "fp32", runs_root="runs", run_name="doc-worker")  # doctest: +SKIP
>>> w = TrainingWorker([t], max_steps=20); w.start(); w.join()      # doctest: +SKIP
>>> w.state, w.rounds                                               # doctest: +SKIP
('done', 20)
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any, Callable, Sequence

IDLE, RUNNING, PAUSED, DONE, FAILED = "idle", "running", "paused", "done", "failed"
UI_SHARE = 0.05   # the most of the training thread's time that on_tick (the page's redraws) takes
EVAL_SHARE = 0.01  # the most evaluations take when their cadence is left to the worker


def share_wait(cost_s: float, share: float) -> float:
    """How long to wait after work that took ``cost_s`` so that such work takes at most
    ``share`` of the time (50 ms at 5%: 0.95 s)."""
    return cost_s * (1 - share) / share


class _TorchThread:
    """The one thread on which the dashboards run torch: build, step, toggle and close trainers.

    Why one thread: OpenMP keeps a thread pool per calling thread, and once a second thread has
    run torch ops the two pools contend for the cores (small models train several times slower).
    So the kernel's main thread never touches torch. It is a daemon thread that sleeps on a
    queue when idle (nothing keeps the kernel busy), so Voila's culler still stops an abandoned
    kernel.
    """

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="mpviz-torch", daemon=True)
                self._thread.start()
        self._q.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn on the torch thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def _serve(self) -> None:
        while True:
            fut, fn, args, kwargs = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:
                fut.set_exception(e)


torch_thread = _TorchThread()


def make_trainer(task: str | None, precision: str, run_dir: str | None = None,
                 batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                 every: int = 10, policy: dict[str, str] | None = None,
                 meta: dict[str, Any] | None = None, *, parts: dict[str, Any] | None = None,
                 runs_root: str | None = None, run_name: str | None = None, **amp: Any) -> Any:
    """A recording `mpviz.training.Trainer` (imported here: the dashboard never imports torch).

    A demo ``task``, or your ``parts`` (model, optimizer, loss_fn or train_step, data, and
    optionally scaler, eval_fn, eval_data). Without ``run_dir``, a new directory
    ``runs_root/run_name`` (``-2``, ``-3``... when taken) is claimed atomically. ``amp``:
    grad_scaler, init_scale, growth_interval (with loss_fn)."""
    from mpviz.tasks import demo_parts
    from mpviz.training import Trainer

    if parts is None:
        parts = demo_parts(task or "digits", seed, batch_size, lr)
    parts = dict(parts)
    info = parts.pop("meta", None) or {}
    return Trainer(precision=precision, seed=seed, run_dir=run_dir, runs_root=runs_root,
                   run_name=run_name, every=every, policy=policy or None, record=True,
                   meta={"source": "mpviz.dashboard", **info, **(meta or {})}, **parts, **amp)


class TrainingWorker:
    """Steps `trainers` round-robin in a daemon thread until a limit or `stop()`.

    The trainers are closed (their runs marked finished) when the thread ends.
    """

    def __init__(self, trainers: Sequence[Any], max_steps: int = 1000, max_seconds: float = 600.0,
                 on_tick: Callable[["TrainingWorker"], None] | None = None,
                 on_done: Callable[["TrainingWorker"], None] | None = None,
                 tick_s: float = 0.25, pause_at: int | None = None,
                 eval_every: int | None = 0) -> None:
        if max_steps < 1 or max_seconds <= 0:
            raise ValueError(f"max_steps must be >= 1 and max_seconds > 0, got {max_steps}, {max_seconds}")
        if pause_at is not None and pause_at < 1:
            raise ValueError(f"pause_at must be >= 1 (steps done before pausing) or None, got {pause_at}")
        self.trainers = list(trainers)
        self.max_steps = int(max_steps)
        self.max_seconds = float(max_seconds)
        self.on_tick, self.on_done, self.tick_s = on_tick, on_done, tick_s
        self.pause_at = pause_at  # pause by itself when this many steps are done
        # trainer.run_eval() every N rounds (0: never; None: on the EVAL_SHARE budget)
        self.eval_every = None if eval_every is None else int(eval_every)
        self._next_eval, self._eval_round = 0.0, 0
        self.state = IDLE
        self.reason = ""          # why the thread ended: "step limit", "time limit", "stopped", error
        self.rounds = 0           # steps done by each trainer
        self.error: BaseException | None = None
        self.tick_error: str | None = None
        self.post_error: str | None = None
        self.tick_cost_s = 0.0
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._future: Future | None = None
        self._mailbox: queue.Queue = queue.Queue()

    # --------------------------------------------------------------- control (any thread)
    def start(self) -> None:
        if self._future is not None:
            raise RuntimeError("this worker already ran; create a new TrainingWorker to train again")
        self.state = RUNNING
        self.started_at = time.monotonic()
        self._future = torch_thread.submit(self._loop)

    def post(self, fn: Callable[[], None]) -> None:
        """Run fn on the training thread between two steps (a policy toggle, for instance)."""
        self._mailbox.put(fn)

    def pause(self) -> None:
        if self.state == RUNNING:
            self._resume.clear()
            self.state = PAUSED

    def resume(self) -> None:
        if self.state == PAUSED:
            self.state = RUNNING
            self._resume.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the thread to end after the current step and wait for it."""
        self._stop.set()
        self._resume.set()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._future is not None and threading.current_thread() is not torch_thread._thread:
            try:
                self._future.exception(timeout)
            except TimeoutError:
                pass

    @property
    def alive(self) -> bool:
        return self._future is not None and not self._future.done()

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    # --------------------------------------------------------------- the thread
    def _loop(self) -> None:
        next_tick = 0.0
        try:
            while not self._ended():
                self._drain_mailbox()
                if not self._resume.is_set():
                    # Paused: the time limit keeps running, so an abandoned tab still ends.
                    self._resume.wait(0.25)
                    continue
                # A race: every lane trains on the same batch, drawn once from the first.
                batch = self.trainers[0].next_batch() if len(self.trainers) > 1 else None
                for t in self.trainers:
                    t.step(batch)
                self.rounds += 1
                if self._eval_due():
                    self._eval()
                if self.rounds == self.pause_at:
                    self.pause()
                    next_tick = 0.0   # draw the paused state now
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick()
            self._drain_mailbox()
            if self.eval_every is None and self._eval_round != self.rounds:
                self._eval()    # the curve ends on the final weights
            self.state = DONE   # before the last tick, so it draws everything (tables included)
            self._tick()
        except BaseException as e:  # shown in the UI; the runs are still closed below
            self.error = e
            self.reason = f"{type(e).__name__}: {e}"
            self.state = FAILED
            traceback.print_exc()
        finally:
            self._close()

    def _ended(self) -> bool:
        """True, with the ``reason``, once Stop was pressed or a limit is reached."""
        if self._stop.is_set():
            self.reason = "stopped"
        elif self.rounds >= self.max_steps:
            self.reason = "step limit"
        elif self.elapsed_s >= self.max_seconds:
            self.reason = "time limit"
        else:
            return False
        return True

    def _close(self) -> None:
        """Close the trainers (their runs marked finished), then call on_done; errors printed."""
        for t in self.trainers:
            try:
                t.close()
            except Exception:
                traceback.print_exc()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:
                traceback.print_exc()

    def _eval_due(self) -> bool:
        if self.eval_every is None:   # on the EVAL_SHARE budget
            return time.monotonic() >= self._next_eval
        return bool(self.eval_every) and self.rounds % self.eval_every == 0

    def _eval(self) -> None:
        t0 = time.perf_counter()
        for t in self.trainers:
            t.run_eval()
        self._eval_round = self.rounds
        cost = time.perf_counter() - t0
        self._next_eval = time.monotonic() + share_wait(cost, EVAL_SHARE)

    def _drain_mailbox(self) -> None:
        while True:
            try:
                fn = self._mailbox.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception as e:  # a bad toggle must not stop training; the status shows it
                self.post_error = f"{type(e).__name__}: {e}"
                traceback.print_exc()

    def _tick(self) -> float:
        """Run on_tick; returns how long to wait before the next one."""
        if self.on_tick is None:
            return self.tick_s
        t0 = time.perf_counter()
        try:
            self.on_tick(self)
            self.tick_error = None
        except Exception as e:  # a UI glitch must not kill training; it shows in the status line
            self.tick_error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.tick_cost_s = time.perf_counter() - t0
        return max(self.tick_s, share_wait(self.tick_cost_s, UI_SHARE))
