"""`LabSession`: the precision lab without its widgets: the model the next session trains,
the training worker (one trainer per lane of a race), layer precisions, rules, advice,
scenarios, and the reads the page draws from. Torch runs only on `worker.torch_thread`.

    >>> s = LabSession("runs", task="mlp")            # doctest: +SKIP
    >>> layers = s.prepare()                          # the model, before any run exists
    >>> s.start("bf16", alongside=("fp32",), max_steps=50, pause_at=20)   # doctest: +SKIP
    >>> s.set_layer("fc3", "fp32")                    # from the next step   # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterable

from ..formats import AUTOCAST_PRECISIONS, DTYPE_PRECISION, did_you_mean
from ..scenarios import Scenario, get_scenario
from . import queries
from .speed import DEFAULT_GPU, Measured, Predictor, Speed, in_force, load_counts, measured
from .worker import IDLE, PAUSED, RUNNING, TrainingWorker, make_trainer, torch_thread

MAX_ALONGSIDE = 2      # race: the main run + up to two more
SESSION_S = 600        # a default session: until Stop, or this long (a kernel must not train forever)
NO_STEP_LIMIT = 2**62  # the worker's step limit when max_steps is 0
FRONT_STEPS = 20       # probe steps per policy of the trade-off front: seconds on a CPU
RACE_NEEDS_LOSS_FN = ("a race needs loss_fn: a train_step drives its own optimizer and scaler, "
                      "which a copy of the model cannot share. Clear 'alongside', or build the "
                      "lab with loss_fn=")

Layers = list[tuple[str, str, int, int]]   # (name, type, own parameters, depth), as runs record


class LabSession:
    """The lab's state and actions: a demo ``task`` or your model's ``parts`` (model,
    optimizer, data, loss_fn or train_step, optional scaler, eval_fn, eval_data)."""

    def __init__(self, runs_dir: str | Path, task: str = "digits",
                 parts: dict[str, Any] | None = None, every: int = 5, seed: int = 0,
                 eval_every: int | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.task = task   # the demo task, or your model's name: part of each run's name
        self.own = parts   # your model's parts: it keeps training across sessions
        self.every, self.seed, self.eval_every = every, seed, eval_every
        self.batch_size: int | None = None   # a demo's; None: its default
        self.lr: float | None = None
        self.scenario: Scenario | None = None
        self.rules: dict[str, str] = {}      # by name or glob (the rule box), kept across sessions
        self.overrides: dict[str, str] = {}  # per layer (the table), until the next prepare()
        self.layers: Layers = []             # of the model the session trains
        self.trainers: list[Any] = []        # [main, *race lanes]
        self.readers: list[Any] = []         # an mpviz.Run of each, same order
        self.labels: list[str] = []          # the legend of each
        self.worker: TrainingWorker | None = None
        self.gpu = DEFAULT_GPU               # the speed estimates are for this GPU
        self._predictor: Predictor | None = None   # the main run's counted step, priced
        self._next: dict[str, Any] | None = None   # the parts the next session trains
        self._created: list[Path] = []   # run dirs made here (removed again if never stepped)
        self._home_every = every
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ what it trains
    @property
    def parts(self) -> dict[str, Any] | None:
        """Your model's parts, or None: a demo task's or a scenario's, built for each session."""
        return None if self.scenario is not None else self.own

    @property
    def owns_step(self) -> bool:
        """True when the lab runs autocast, the GradScaler and the step (not a train_step)."""
        return self.parts is None or self.parts.get("train_step") is None

    @property
    def name(self) -> str:
        return self.scenario.name if self.scenario is not None else self.task

    @property
    def model(self) -> Any:
        """The model the session trains, or the next start will (None before `prepare`)."""
        if self.trainers:
            return self.trainers[0].model
        return self._next["model"] if self._next is not None else None

    @property
    def state(self) -> str:
        return self.worker.state if self.worker is not None else IDLE

    @property
    def live(self) -> bool:
        """Whether the main run's policy can still change (its session has not ended)."""
        return bool(self.trainers) and (self.worker is None or self.worker.alive)

    def prepare(self, task: str | None = None, batch_size: int | None = None,
                lr: float | None = None) -> Layers:
        """End any session; build the model the next one trains (a demo's or scenario's afresh,
        yours as it is). Nothing is recorded until `start`."""
        with self._lock:
            self.end()
            self.task = task or self.task
            self.batch_size, self.lr = batch_size, lr
            self._next = self._build_parts()
            self.layers = torch_thread.call(_model_layers, self._next["model"])
            self.overrides = {}
            return self.layers

    def _build_parts(self) -> dict[str, Any]:
        if self.scenario is not None:
            return torch_thread.call(self.scenario.parts, self.seed, self.lr)
        if self.own is not None:
            return self.own
        return torch_thread.call(_demo_parts, self.task, self.seed, self.batch_size, self.lr)

    def own_scaler_settings(self) -> dict[str, Any]:
        """The AMP settings of the scaler your train_step brought (``enabled``: False without)."""
        parts = self._next or self.parts or {}
        return scaler_settings(parts.get("scaler")) or {"enabled": False}

    def load_scenario(self, name: str | None, fixed: bool | None = None) -> Scenario | None:
        """Train a teaching scenario of `mpviz.scenarios` from now on (None: what the session was
        built with); ``fixed``: its healthy counterpart. Ends any session; `prepare` builds it."""
        sc = get_scenario(name) if name else None
        if sc is not None and fixed is not None:
            base = get_scenario(sc.name.removesuffix("-fixed"))
            sc = base.fixed() if fixed else base
        with self._lock:
            self.end()
            self.scenario = sc
            self.every = sc.every if sc is not None else self._home_every
            self.rules = dict(sc.policy or {}) if sc is not None else {}
        return sc

    # ------------------------------------------------------------------ sessions
    def start(self, precision: str, alongside: Iterable[str] = (), amp: dict[str, Any] | None = None,
              **limits: Any) -> None:
        """`begin` and `train` (``limits``: its keywords); resumes a paused session."""
        if self.state == PAUSED:
            return self.toggle_pause()
        if self.state != RUNNING:
            self.begin(precision, alongside, amp)
            self.train(**limits)

    def begin(self, precision: str, alongside: Iterable[str] = (),
              amp: dict[str, Any] | None = None) -> None:
        """End the session before; claim the main run at ``precision`` and a race lane per
        ``alongside`` precision (copies of the main model and optimizer, made now). ``amp``:
        the main run's grad_scaler, init_scale, growth_interval (lanes: a GradScaler if fp16)."""
        extra = [p for p in alongside if p != precision][:MAX_ALONGSIDE]
        if extra and not self.owns_step:
            raise ValueError(RACE_NEEDS_LOSS_FN)
        with self._lock:
            policy = self.policy()
            self.end()
            main = self._new_trainer(precision, policy, amp or {})
            self.trainers, self.readers = [main], [_open_run(main)]
            self._predictor = None
            if extra:  # every lane steps with its own copy of one RNG state: same dropout masks
                torch_thread.call(main.own_rng)
            for p in extra:
                amp_p = {**(amp or {}), "grad_scaler": p == "fp16"}
                t = torch_thread.call(main.fork, p, runs_root=str(self.runs_dir),
                                      run_name=self._run_name(f"vs-{p}"), every=self.every, **amp_p)
                self._created.append(t.run_dir)
                self.trainers.append(t)
                self.readers.append(_open_run(t))
            self.labels = [self._tag(precision)] + [f"{p} (alongside)" for p in extra]

    def train(self, max_steps: int = 0, max_seconds: float = SESSION_S, pause_at: int = 0,
              on_tick: Callable[[TrainingWorker], None] | None = None,
              on_done: Callable[[TrainingWorker], None] | None = None, tick_s: float = 0.5) -> None:
        """Train the runs of `begin` on the worker thread: until Stop, ``max_seconds`` or
        ``max_steps`` (0: no step limit); paused by itself after ``pause_at`` steps (0: never)."""
        with self._lock:
            self.worker = TrainingWorker(self.trainers, max_steps=max_steps or NO_STEP_LIMIT,
                                         max_seconds=max_seconds, on_tick=on_tick, on_done=on_done,
                                         tick_s=tick_s, pause_at=pause_at or None,
                                         eval_every=self.eval_every)
            self.worker.start()

    def _tag(self, precision: str) -> str:
        return precision if self.owns_step else "train_step"

    def _run_name(self, tag: str) -> str:
        return f"lab-{time.strftime('%Y%m%d-%H%M%S')}-{self.name}-{tag}"

    def _new_trainer(self, precision: str, policy: dict[str, str], amp: dict[str, Any]) -> Any:
        """The main trainer, in a run directory of its own (claimed atomically, now)."""
        tag = self._tag(precision)
        if not self.owns_step:   # the autocast, scaler and step are the train_step's
            precision, amp = "fp32", {}
        parts, self._next = self._next or self._build_parts(), None
        t = torch_thread.call(make_trainer, None, precision, parts=parts,
                              runs_root=str(self.runs_dir), run_name=self._run_name(tag),
                              seed=self.seed, every=self.every, policy=policy, meta={"app": "lab"},
                              **amp)
        self._created.append(t.run_dir)
        return t

    def toggle_pause(self) -> None:
        if self.state == RUNNING:
            self.worker.pause()
        elif self.state == PAUSED:
            self.worker.resume()

    def set_pause_at(self, steps: int) -> None:
        """Pause by itself after ``steps`` steps (0: never), also while training."""
        if self.worker is not None:
            self.worker.pause_at = steps or None

    def stop(self) -> None:
        """Stop training; the runs are closed and stay on disk."""
        if self.worker is not None and self.worker.alive:
            self.worker.stop()

    def end(self) -> None:
        """Stop training and let go of the session's trainers and readers."""
        with self._lock:
            self.stop()
            for t in self.trainers:
                torch_thread.call(t.close)
            for r in self.readers:
                r.close()
            for t in self.trainers:   # a run made here but never stepped is noise in runs/
                if t.run_dir in self._created and t.steps_done == 0:
                    shutil.rmtree(t.run_dir, ignore_errors=True)
                    self._created.remove(t.run_dir)
            self.trainers, self.readers, self.worker = [], [], None

    # ------------------------------------------------------------------ precisions
    def policy(self) -> dict[str, str]:
        """The rules a new session starts with: the rule box's, then the per-layer ones."""
        return {**self.rules, **self.overrides}

    def set_layer(self, layer: str, precision: str | None) -> bool:
        """Set one layer's precision (None: it follows the policy again) from the next step, or
        between sessions from the next start. Returns whether the session was live."""
        names = [name for name, *_ in self.layers if name]
        if layer not in names:
            raise ValueError(f"unknown layer {layer!r}; "
                             f"{did_you_mean(layer, names) or f'layers: {names[:8]}'}")
        if precision is None:
            self.overrides.pop(layer, None)
        else:
            self.overrides[layer] = precision
        if not self.live:
            return False
        main = self.trainers[0]

        def apply() -> None:  # on the torch thread: between two steps, or now when idle
            try:
                main.set_rules({layer: precision})
            except ValueError:
                if precision is not None:
                    raise   # else: the layer had no rule of its own to remove
        if self.worker is not None and self.worker.alive:
            self.worker.post(apply)
        else:
            torch_thread.call(apply)
        return True

    def add_rule(self, pattern: str, precision: str | None) -> bool:
        """Set ``pattern`` (a layer name or a glob) to ``precision`` (None: drop that rule) like
        `set_layer`. A rule the policy refuses raises ValueError (with the reason) and changes
        nothing."""
        live = self.live
        if live:
            self.trainers[0].set_rules({pattern: precision})   # checked now, applied at the next forward
        else:
            torch_thread.call(_check_rule, self.model, pattern, precision, self.rules)
        if precision is None:
            self.rules.pop(pattern, None)
        else:
            self.rules[pattern] = precision
        return live

    def apply_advice(self) -> tuple[dict[str, str], dict[str, str], dict]:
        """Keep in high precision the layers `mpviz.advise` names for the main run, from the
        next step. Returns ({layer: new precision}, policy.reasons, policy.estimate)."""
        import mpviz   # the advice returns a PrecisionPolicy (torch); this runs on a live session

        if not self.trainers:
            raise RuntimeError("no run yet: press Start first")
        self.trainers[0].flush()   # the last steps' rows are in the store
        precision = self.trainers[0].precision
        policy = mpviz.advise(self.readers[0],
                              target=precision if precision in AUTOCAST_PRECISIONS else "fp16")
        names = {name for name, *_ in self.layers if name}   # the root: a rule
        changed = {}
        for layer in policy.reasons:
            keep = policy.rules[layer]
            try:
                if layer in names:
                    self.set_layer(layer, keep)
                else:
                    self.add_rule(layer, keep)
            except (ValueError, RuntimeError, TypeError):
                continue   # a rule the policy refuses: the others still apply
            changed[layer] = keep
        return changed, dict(policy.reasons), dict(policy.estimate)

    # ------------------------------------------------------------------ the trade-off front
    def search_front(self, steps: int = FRONT_STEPS) -> Future:
        """`mpviz.search` for what the next session trains (fresh weights of a demo or a
        scenario, your model as it is), on the torch thread: a short probe per precision policy,
        each recorded under `runs_dir`, priced on `gpu`. The Future's result is the front.
        Refused while a session trains (the torch thread is its)."""
        if self.state in (RUNNING, PAUSED):
            raise RuntimeError("stop the session first: the probes train on the same thread")
        if not self.owns_step:
            raise ValueError("the trade-off front needs loss_fn: a train_step drives its own "
                             "optimizer, which each probe's copy of the model cannot share")
        if self.scenario is not None:
            sc, seed, lr = self.scenario, self.seed, self.lr
            build: Callable[[], dict[str, Any]] = lambda: sc.parts(seed, lr)   # noqa: E731
        elif self.own is not None:
            own = self.own
            build = lambda: own   # noqa: E731
        else:
            task, seed, bs, lr = self.task, self.seed, self.batch_size, self.lr
            build = lambda: _demo_parts(task, seed, bs, lr)   # noqa: E731
        return torch_thread.submit(_search, build, steps, self.gpu, self.runs_dir, self.seed)

    # ------------------------------------------------------------------ reading the runs
    def flush(self) -> None:
        """Commit every run's last steps, so that a read sees them."""
        for t in list(self.trainers):
            t.flush()

    def base_precision(self) -> str:
        """The precision the main run's layers run in without a rule of their own (with a
        train_step: the autocast it opened, as recorded)."""
        if self.trainers[0].owns_step:
            return self.trainers[0].precision
        return DTYPE_PRECISION.get(self.readers[0].meta.get("autocast_dtype"), "fp32")

    def layer_table(self, base: str | None = None) -> Any:
        """`queries.layer_table` of the main run, with the precisions in force now (``base``:
        `base_precision`, if read already)."""
        return queries.layer_table(self.readers[0], self.trainers[0].precision_in_force(),
                                   base=base or self.base_precision())

    def samples_per_s(self) -> float | None:
        """The main run's median speed over its last 20 steps (None before a step)."""
        m = self.measured()
        return m.samples_per_s if m is not None else None

    def measured(self) -> Measured | None:
        """The main run's speed on this machine: medians of its last 20 steps."""
        return measured(self.readers[0]) if self.readers else None

    def speed(self, gpu: str | None = None) -> Speed | None:
        """The predicted step time on ``gpu`` (default: `gpu`) of the policy in force, of fp32
        and of each race lane, from the step the main run counted at its first step (None
        before it). Predicted again only when a policy or the GPU changed."""
        if not self.trainers:
            return None
        if self._predictor is None:
            counts = load_counts(self.trainers[0].run_dir)
            if counts is None:
                return None
            self._predictor = Predictor(counts)
        main, *lanes = self.trainers
        policy = in_force(main.precision_in_force(), self.base_precision())
        race = [(label, in_force(t.precision_in_force(), t.precision))
                for label, t in zip(self.labels[1:], lanes)]
        return self._predictor.speed(policy, gpu or self.gpu, race)

    def evals(self) -> list[tuple[str, list[tuple[int, float]]]]:
        """``(label, [(step, metric), ...])`` of each run's evaluations so far."""
        return [(label, list(t.evals)) for label, t in zip(self.labels, self.trainers)]


def _open_run(trainer: Any) -> Any:
    import mpviz   # mpviz.run reads SQLite; no torch

    return mpviz.load_run(trainer.run_dir)


def scaler_settings(scaler: Any) -> dict[str, Any] | None:
    """`mpviz.compat.scaler_settings`, on the torch thread."""
    return torch_thread.call(_scaler_settings, scaler)


# Builders that need torch, for the torch thread (imported there, never by the dashboard).
def _demo_parts(task: str, seed: int, batch_size: int | None, lr: float | None) -> dict[str, Any]:
    from mpviz.tasks import demo_parts

    return demo_parts(task, seed, batch_size, lr)


def _search(build: Callable[[], dict[str, Any]], steps: int, gpu: str, runs_dir: Path,
            seed: int) -> Any:
    """`mpviz.search` over ``build()``'s parts with their optimizer's kind and learning rate."""
    from mpviz.searching import search

    parts = build()
    batches = list(itertools.islice(iter(parts["data"]), steps))
    name, lr = _optimizer_kind(parts["optimizer"])
    runs_dir.mkdir(parents=True, exist_ok=True)
    return search(parts["model"], batches, parts["loss_fn"], steps=steps, device=gpu,
                  optimizer=name, lr=lr, seed=seed, run_root=runs_dir)


def _optimizer_kind(opt: Any) -> tuple[str, float]:
    """The name `mpviz.search` builds (and prices) an optimizer like ``opt`` by, and its lr."""
    group = opt.param_groups[0]
    kind = type(opt).__name__
    if kind == "SGD":
        name = "sgd_momentum" if group.get("momentum") else "sgd"
    else:
        name = {"Adam": "adam"}.get(kind, "adamw")   # AdamW, and the others priced as it
    return name, float(group["lr"])


def _model_layers(model: Any) -> Layers:
    from mpviz.training import model_layers

    return model_layers(model)


def _scaler_settings(scaler: Any) -> dict[str, Any] | None:
    from mpviz.compat import scaler_settings

    return scaler_settings(scaler)


def _check_rule(model: Any, pattern: str, precision: str | None, rules: dict[str, str]) -> None:
    """Check a rule against the model between sessions, when no policy is live."""
    if precision is None:
        if pattern not in rules:
            raise ValueError(f"no rule {pattern!r} to remove; rules: {list(rules) or 'none'}")
        return
    from mpviz.precision import canonical, validate_rules

    first = next(iter(model.parameters()), None)
    validate_rules(model, [pattern], first.device.type if first is not None else "cpu",
                   [canonical(precision)])
