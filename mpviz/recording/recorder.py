"""``Recorder``: turns an AMP training loop into per-step, per-layer records on disk.

    rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir="runs/exp1")
    with rec:
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update(); opt.zero_grad()
            rec.step(loss=loss, samples=len(x))

The Recorder is the facade: it wires hooks to its parts and runs the step's lifecycle
(:mod:`.step`). Its parts: :mod:`.activations` (per-module hooks: dtypes, activations),
:mod:`.gradients` (reading, checking and measuring gradients), :mod:`.overflow` (the replay that
names the layer that went inf/nan first), :mod:`.rows` (statistics rows, on the writer thread).

mpviz only observes: the recorder never changes what training computes (parameters, buffers,
optimizer and GradScaler state stay bit-identical to a run without it; ``tests/test_twin.py``),
and an error inside it is recorded in ``run.meta["recorder_errors"]`` with one warning, stops
that part of the recording, and is never raised into the training loop.

What it costs, and where the host syncs are:
- every step: a forward pre-hook and hook on the model (inputs, autocast and RNG state kept for a
  replay), a hook in the optimizer's step (or, with a GradScaler or without an optimizer, a tensor
  hook at the end of backward) that reads the gradients, and :meth:`Recorder.step`. Without a
  GradScaler, one fused inf/nan check of all gradients (GradScaler's own kernel) and one sync in
  the optimizer's step pre-hook, to find an overflow's culprit before the weights change. On an
  accelerator, ONE host copy per step (loss, loss scale, flags, statistics); on the CPU the values
  are read where they lie. With a GradScaler, a ``rec.step()`` that saw no optimizer step reads
  the scale (a sync on an accelerator) to tell a skipped step from a micro-batch.
- on "watched" steps (statistics steps, and steps where dtypes may change): a forward hook per
  module (dtypes, activations).
- on statistics steps: activation, gradient and weight statistics (:mod:`mpviz.stats`). By
  default at most every 10 steps and within a budget of 3% of the training time (what they cost
  is measured; :mod:`.schedule`); ``every=N``: exactly every N steps.
- steps with inf/nan: the forward of that step is replayed once with checks on.
Rows go to a background writer thread (:mod:`mpviz.store`); nothing is written on this thread.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import compat, distributed
from ..formats import dtype_name
from ..run import Run
from ..stats import ROW
from ..store import RunStoreError, RunWriter, db_path
from . import overflow
from .activations import ForwardWatch
from .diagnostics import attach_diagnostics
from .gradients import Gradients
from .rows import stat_rows
from .schedule import DEFAULT_BUDGET, DEFAULT_EVERY, StatsSchedule
from .step import Parts, StepState

# A rec.step() with an optimizer but no optimizer step is a micro-batch. If the optimizer's step
# is never seen at all (a wrapper that bypasses torch's step hooks), after this many calls each
# rec.step() is recorded as a step, with a warning.
_MAX_MICRO_BATCHES = 64


def _closure(args: tuple, kwargs: dict) -> Any:
    """The closure given to ``optimizer.step`` (its step hooks see ``args = (optimizer, ...)``)."""
    return args[1] if len(args) > 1 else kwargs.get("closure")


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``, which
    subclass Optimizer but skip its step hooks."""
    if optimizer is None:
        return None
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None), got "
                        f"{type(optimizer).__name__}: pass the optimizer your loop steps, e.g. "
                        "Recorder(model, optimizer=opt, ...)")
    return optimizer


class Recorder:
    """Record a mixed-precision training run, per layer and per step, to ``run_dir``.

    Args:
        model: the ``nn.Module`` being trained.
        optimizer: optional; a recorded step is one ``optimizer.step()``, and steps GradScaler
            skipped are known. ``rec.step()`` calls between two optimizer steps are micro-batches
            (gradient accumulation): their losses (averaged) and samples join the step.
        scaler: optional ``torch.amp.GradScaler`` (enabled or not); gradients are recorded
            *unscaled*.
        run_dir: where the run is written (default ``runs/<time>``); must not hold a run yet.
        every: per-layer tensor statistics exactly every ``every`` steps. None (default): at
            most every 10 steps (on multiples of 10), stretched so that what statistics cost
            stays within ``stats_budget`` of the training time (:mod:`.schedule`; in a
            distributed job exactly every 10, so that ranks take the same steps). Loss, scale,
            skips, overflow events with their layers, dtypes and timing are recorded every step
            either way.
        stats_budget: the share of training time statistics may cost (default 0.03 when
            ``every`` is None in a single process; in a distributed job, and with an explicit
            ``every``, no budget unless given, then the budget stretches that period).
            ``run.meta["stats_cost"]`` says what they cost.
        policy: an :class:`mpviz.PrecisionPolicy` (or its rules dict) to apply while recording;
            its changes are recorded in ``run.policy_changes``.
        meta: extra JSON-able facts stored in ``run.meta``.
        steerable: accept precision changes from other processes through the run directory
            (:func:`mpviz.steer`), checked and applied at step boundaries (see
            :mod:`mpviz.mailbox`); without ``policy``, an empty one is applied to carry them.
        resume: continue the run already in ``run_dir`` (a job restarted from a checkpoint):
            rows it holds for steps >= ``start_step`` are dropped, and ``run.meta["resumed"]``
            says how many. Without a run there, a new one is started. Without ``resume``, a
            ``run_dir`` that holds a run is refused.
        start_step: the index of the first step recorded (the checkpoint's step when resuming).
        stats_ranks: in a distributed job, the ranks that take per-layer statistics: a list
            (``[0, 7]``), ``"sample:K"`` (K ranks spread evenly), or None (every rank). Every rank
            records its steps, losses and overflow events (with DDP, whether its own gradients
            were non-finite: :mod:`mpviz.distributed`).
        lost_updates: on statistics steps, the fraction of each bf16/fp16 weight's elements
            whose optimizer update was rounded away (``run.lost_updates()``); None (default):
            on when the model holds bf16/fp16 parameters. See :mod:`.diagnostics`.
        shadow, shadow_every: layer names or globs (``["fc1", "blocks.*.mlp"]``) rerun in fp32
            on the very inputs they saw every ``shadow_every`` steps (``run.shadow()``: relative
            error and SQNR of their outputs, and of their weight gradients from the same
            upstream gradient). Off by default.

    ``attach()`` (or ``with rec:``) is all-or-nothing: if anything in it fails, what was attached
    is removed and the run (if its store was created) is marked ``failed``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scaler: Any = None, run_dir: str | os.PathLike | None = None, every: int | None = None,
                 policy: Any = None, name: str | None = None, flush_every_s: float = 2.0,
                 meta: dict[str, Any] | None = None, resume: bool = False,
                 start_step: int = 0, steerable: bool = False, stats_ranks: Any = None,
                 lost_updates: bool | None = None, shadow: Any = None,
                 shadow_every: int = 50, stats_budget: float | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Recorder needs an nn.Module, got {type(model).__name__}")
        self.rank, self.world_size = compat.dist_rank_world()
        if every is None:
            every = DEFAULT_EVERY
            # (in a distributed job each rank would measure and decide on its own, and ranks
            # would take statistics on different steps: there the default is exactly every 10)
            if stats_budget is None and self.world_size == 1:
                stats_budget = DEFAULT_BUDGET
        self._schedule = StatsSchedule(every, stats_budget)  # checks both
        if scaler is not None and not callable(getattr(scaler, "is_enabled", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (or None), got "
                            f"{type(scaler).__name__}")
        self.model, self.scaler = model, scaler
        self.optimizer = _unwrap_optimizer(optimizer)
        self.every = int(every)
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.resume, self.start_step = bool(resume), int(start_step)
        self.flush_every_s = flush_every_s
        self.name = name or type(model).__name__
        self._extra_meta = dict(meta or {})
        self._policy_arg = {} if steerable and policy is None else policy
        self.steerable = bool(steerable)
        self._steering: Any = None  # recording.steering.Steering while attached
        if run_dir is None:
            run_dir = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir)
        self.stats_ranks = distributed.stats_ranks(stats_ranks, self.world_size)
        self._diag_args = (lost_updates, shadow, int(shadow_every))
        self._origin: distributed.OriginWatch | None = None
        self.policy = None  # PolicyHandle while attached
        self._writer: RunWriter | None = None
        self._handles: list[Any] = []
        self._run: Run | None = None
        self._attached = False
        self._closed = False
        self._errors: list[dict[str, Any]] = []
        self._broken: set[str] = set()

    # ----------------------------------------------------------------- attach / detach
    def __enter__(self) -> "Recorder":
        self.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(error=exc)

    def attach(self) -> "Recorder":
        """Hook into the model (and optimizer), apply the policy, open the run. All or nothing."""
        if self._attached:
            return self
        if self._closed:
            raise RuntimeError("this Recorder was closed; create a new one (with a new run_dir)")
        with contextlib.ExitStack() as undo:
            self._attach(undo)
            self._undo = undo.pop_all()
        self._attached = True
        return self

    def _attach(self, undo: contextlib.ExitStack) -> None:
        model = self.model
        distributed.check_supported(model)  # FSDP: refused before anything is attached
        # Layers go by the user's own names, also behind torch.compile's wrapper ("_orig_mod.").
        named = compat.named_modules(model)
        self._names = [n for n, _ in named]
        self._modules = [m for _, m in named]
        self._name_idx = {n: i for i, n in enumerate(self._names)}
        self._parent = [self._name_idx.get(n.rpartition(".")[0], 0) if n else -1
                        for n in self._names]
        # Each parameter belongs to the first module (in named_modules order) that owns it.
        self._params: list[nn.Parameter] = []
        self._param_layer: list[int] = []
        seen: set[int] = set()
        for i, m in enumerate(self._modules):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    self._params.append(p)
                    self._param_layer.append(i)
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")

        # The policy is checked first: a bad rule fails here, before anything is on the model or
        # on disk. It is applied last, so that its hooks run before the recorder's.
        policy = None
        if self._policy_arg is not None:
            from ..precision import PrecisionPolicy, validate_rules

            policy = self._policy_arg
            if not isinstance(policy, PrecisionPolicy):
                policy = PrecisionPolicy(policy)
            validate_rules(model, policy.rules, self.device.type, policy.precisions())

        layers = []
        for i, (name, m) in enumerate(zip(self._names, self._modules)):
            ps = list(m.parameters(recurse=False))
            layers.append((i, name, type(m).__name__, sum(p.numel() for p in ps),
                           dtype_name(ps[0].dtype) if ps else None,
                           0 if name == "" else name.count(".") + 1,
                           int(not any(True for _ in m.children()))))
        meta = {
            "model": self.name, "device": str(self.device), "torch_version": torch.__version__,
            "autocast_dtype": None, "scaler": compat.scaler_settings(self.scaler),
            "optimizer": type(self.optimizer).__name__ if self.optimizer else None,
            "every": self.every, "stats_budget": self._schedule.budget,
            "start_time": time.time(), "end_time": None, "status": "running",
            "host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "rank": self.rank, "world_size": self.world_size, "steerable": self.steerable,
            "stats_ranks": self.stats_ranks,
            **self._extra_meta,
        }
        self._writer = RunWriter(db_path(self.run_dir, self.rank), meta, layers,
                                 flush_every_s=self.flush_every_s,
                                 resume_from=self.start_step if self.resume else None)
        undo.push(self._fail_writer)
        self._schedule.writer = self._writer

        self._grads = Gradients(self._params, self._param_layer, self.scaler, self.device)
        self._watch = ForwardWatch(self._modules, lambda fn: self._contained("layers", fn))
        undo.callback(self._watch.remove)
        # The model runs compiled code: module hooks inside it do not run as Python, so its
        # per-layer dtypes and activations come from an eager rerun of the same batch.
        self._compiled = self._watch.compiled = compat.is_compiled_wrapper(model) or \
            getattr(model, "_compiled_call_impl", None) is not None
        self._traced = _Traced()
        self._in_root = False
        self._autocast_known = False
        self._entries: set[int] = {0}
        self._optim_seen = False
        self._micro_batches = 0  # rec.step() calls since the last optimizer step
        self._calls_are_steps = self.optimizer is None
        self._replaying = False
        self._new_state(self.start_step)

        def hook(h: Any) -> None:
            self._handles.append(h)
            undo.callback(h.remove)

        self._hook = hook
        hook(model.register_forward_pre_hook(self._entry_hook(0), with_kwargs=True, prepend=True))
        hook(model.register_forward_hook(self._root_end, always_call=True))
        if getattr(model, "_compiled_call_impl", None) is not None:
            _wrap_compiled_call(model, self._entry_hook(0), undo)  # model.compile()
        # Gradients are read when backward has accumulated them, before any clipping or
        # unscaling by the loop: a hook on one parameter of each top-level part of the model
        # queues the read at the end of backward (whichever part the loop calls, compiled or not).
        for p in _backward_markers(self._modules[0]):
            hook(p.register_post_accumulate_grad_hook(
                self._contained("gradients", self._on_grad_accumulated)))
        if self.optimizer is not None:
            hook(self.optimizer.register_step_pre_hook(
                self._contained("optimizer", self._on_optimizer_step)))
            hook(self.optimizer.register_step_post_hook(
                self._contained("optimizer", self._on_optimizer_stepped)))
        parts = Parts(self._names, self._modules, self._params, self._param_layer, self.device,
                      lambda: self._state, lambda: self._replaying, self._writer.put,
                      self._contained)
        attach_diagnostics(parts, self.optimizer, hook, *self._diag_args)  # lost updates, shadow
        if self._compiled:
            self._compiled_found()
        self._origin = distributed.watch(model, parts)  # DDP: each rank's own inf/nan
        if self._origin is not None:
            undo.callback(self._origin.remove)
        if policy is not None:
            from ..precision import apply_policy

            self.policy = apply_policy(model, policy, device_type=self.device.type)
            undo.callback(self._drop_policy)
            # (policy changes may be applied while dynamo traces a compiled model: run anyway)
            self.policy.add_listener(self._contained("policy", self._on_policy_change,
                                                     traced=True))
        if self.steerable:
            from .steering import Steering

            if self.world_size > 1:
                raise ValueError("steerable=True is for single-process jobs: in a distributed "
                                 "job each rank would pick a request up at a different step. "
                                 "Use Recorder(..., steerable=False) with torch.distributed.")
            self._steering = Steering(self.run_dir, self.policy)
            self._steer_poll = self._contained("steering", self._steering.poll)

    def _drop_policy(self) -> None:
        if self.policy is not None:
            self.policy.remove()
            self.policy = None

    def _fail_writer(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """attach() failed after the store was created: mark the run failed and close it."""
        if self._writer is not None:
            self._writer.set_meta(status="failed", end_time=time.time(),
                                  error=f"attach failed: {type(exc).__name__}: {exc}")
            self._writer.close()
            self._writer = None

    def close(self, error: BaseException | None = None) -> None:
        """Detach every hook, restore the model, and finish the run on disk. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._attached:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._watch.remove()
        if self._origin is not None:
            self._origin.remove()
        if self._steering is not None:
            self._contained("steering", self._steering.close)(self._state.index)
        self._drop_policy()
        self._state = None  # type: ignore[assignment]
        self._grads.views = {}
        if self._writer is not None:
            self._writer.flush()  # rows made on the writer thread may fail: recorded below
            self._take_writer_errors()
            status = "finished" if error is None else "failed"
            extra = {} if error is None else {"error": f"{type(error).__name__}: {error}"}
            if self._schedule.budget is not None:
                extra["stats_cost"] = self._schedule.summary()
            self._writer.set_meta(status=status, end_time=time.time(), **extra)
            self._writer.close()
        self._attached = False

    # ----------------------------------------------------------------- reading
    @property
    def run(self) -> Run:
        """The live :class:`mpviz.Run` of this recording (pending rows are flushed before reads)."""
        if self._run is None:
            if self._writer is None:
                raise RuntimeError("the recorder has not been attached yet: use `with rec:` first")
            self._run = Run(self._writer.path, before_read=self.flush)
        return self._run

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Errors contained inside the recorder so far (also in ``run.meta["recorder_errors"]``)."""
        return list(self._errors)

    def flush(self) -> None:
        if self._writer is not None and not self._closed:
            self._writer.flush()

    def set_precision(self, rules: dict[str, str]) -> None:
        """Change per-layer precision from now on (same as ``rec.policy.update(rules)``)."""
        if self.policy is None:
            raise RuntimeError("this Recorder was created without a policy: pass "
                               "policy=mpviz.PrecisionPolicy({}) to steer precision while recording")
        self.policy.update(rules)

    # ----------------------------------------------------------------- errors stay inside
    def _contained(self, part: str, fn: Callable, traced: bool = False) -> Callable:
        """``fn``, with any exception recorded (once per part) instead of raised; a part that
        failed stops recording, and training goes on."""
        def run(*args: Any, **kwargs: Any) -> Any:
            if not traced and compat.is_compiling():
                return None  # traced into compiled code: nothing (a clock or RNG read would break the graph)
            if part in self._broken:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - mpviz must never break the user's training
                self.record_error(part, e)
                return None
        return run

    def record_error(self, part: str, exc: BaseException, internal: bool = True) -> None:
        """Record ``exc`` (once per ``part``, which then stops) in ``rec.errors`` and
        ``run.meta["recorder_errors"]`` with a warning, instead of raising it into training.
        Integrations (callbacks) report their own errors here."""
        self._broken.add(part)
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f"{Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
        state = getattr(self, "_state", None)
        self._errors.append({"part": part, "step": state.index if state else None,
                             "error": f"{type(exc).__name__}: {exc}", "where": where})
        if internal:
            msg = (f"recording of {part!r} stopped after an internal error ({type(exc).__name__}:"
                   f" {exc}); training goes on unchanged. Details in run.meta['recorder_errors'];"
                   " please report it.")
        else:
            msg = f"{exc}; training goes on unchanged."
        warnings.warn(f"mpviz: {msg}", RuntimeWarning, stacklevel=3)
        if self._writer is not None:
            self._writer.set_meta(recorder_errors=list(self._errors))

    def _take_writer_errors(self) -> None:
        if self._writer is not None and self._writer.errors:
            for e in self._writer.take_errors():
                if isinstance(e, RunStoreError):  # the disk, not mpviz: said as it is
                    self.record_error("store", e, internal=False)
                else:
                    self.record_error("statistics", e)

    # ----------------------------------------------------------------- the step's phases
    def _new_state(self, index: int) -> None:
        self._state = StepState(index=index, stats_step=self.rank in self.stats_ranks
                                and self._schedule.is_stats_step(index))
        self._watch.begin_step(self._state)

    def _entry_hook(self, idx: int) -> Callable:
        """The forward pre-hook of a module the loop calls (the model, or a child the loop calls
        directly, e.g. Lightning's ``self.net(x)``)."""
        traced, device_type = self._traced, self.device.type
        on_forward = self._contained("forward", self._on_forward)

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if compat.is_compiling():
                # Traced into compiled code (the model was compiled after attach): plain
                # stores, which the compiled code repeats on every call, with no graph break.
                traced.inputs = (idx, args, kwargs)
                traced.autocast = compat.autocast_state(device_type)
                return None
            return on_forward(idx, args, kwargs)
        return pre

    def _root_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not compat.is_compiling():
            self._in_root = False

    def _on_forward(self, idx: int, args: tuple, kwargs: dict) -> None:
        """1. A training forward begins (evaluation forwards under no_grad are not recorded)."""
        if self._replaying or not torch.is_grad_enabled():
            return
        if idx:
            if self._in_root:
                return  # a child entry called inside the model's own forward
        else:
            self._in_root = True
        s = self._state
        if s.cpu_start is None:  # what the step costs is measured from here (not data loading)
            s.cpu_start = time.thread_time()
        # kept for rerunning this step's forward (an inf/nan culprit; a compiled model's stats)
        s.inputs = (idx, args, kwargs)
        s.autocast = compat.autocast_state(self.device.type)
        s.rng = compat.get_rng_state(self.device)
        s.compiled = self._compiled
        s.acts = {}
        self._watch.start(s, args if args else kwargs)

    def _take_traced(self, s: StepState) -> None:
        """What a compiled forward's traced pre-hook stored (see :meth:`_entry_hook`)."""
        t = self._traced
        if t.inputs is None:
            return
        if s.inputs is None:  # (an eager pre-hook saw this forward already otherwise)
            s.inputs, s.autocast, s.compiled = t.inputs, t.autocast, True
            if not self._compiled:
                self._compiled_found()
            self._watch.start(s, t.inputs[1] if t.inputs[1] else t.inputs[2])
        t.inputs = t.autocast = None

    def _compiled_found(self) -> None:
        self._compiled = self._watch.compiled = True
        if self._diag_args[1]:
            msg = ("shadow= is not recorded on a compiled model: its layers run inside compiled "
                   "code, where hooks do not run. Record the fp32 shadow on the eager model.")
            warnings.warn(f"mpviz: {msg}", RuntimeWarning, stacklevel=2)
            if self._writer is not None:
                self._writer.set_meta(shadow_unavailable=msg)

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        s = self._state
        if s is not None and not s.backward_queued:
            s.backward_queued = True
            # Re-queue from inside the first final callback so ours runs after every callback
            # queued during backward, e.g. DDP's, which writes the all-reduced gradients.
            ready = self._contained("gradients", self._gradients_ready)
            compat.queue_backward_callback(lambda: compat.queue_backward_callback(ready))

    def _gradients_ready(self) -> None:
        """2. Every ``.grad`` of this backward is accumulated."""
        s = self._state
        if s is None or "gradients" in self._broken:
            return
        self._forward_seen(s)
        self._grads.ready(s, self._watch.take_acts(s) if s.stats_step else {})

    def _forward_seen(self, s: StepState) -> None:
        """The step's forward is over: a compiled one is rerun eagerly if this step is watched."""
        self._take_traced(s)
        if s.compiled and s.watching and s.inputs is not None and not s.rerun:
            s.rerun = True
            s.acts = {}
            self._contained("layers", self._rerun)(check=False)
        self._watch.forward_done()

    def _on_optimizer_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        """3. The optimizer is about to update the weights."""
        if _closure(args, kwargs) is not None:
            return  # the closure computes the gradients: read them after it
        s = self._state
        if s.grads is None and not self._grads.scaling():
            self._contained("gradients", self._gradients_ready)()
        # Without GradScaler nothing stops a non-finite update: find the culprit while the
        # weights are still the ones the bad forward ran with.
        if s.grad_bad is not None and s.grad_bad.item():  # (only set when no GradScaler runs)
            s.precheck = self._contained("overflow", self._replay)()

    def _on_optimizer_stepped(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        s = self._state
        s.optim_steps += 1
        self._optim_seen = True
        if _closure(args, kwargs) is not None and self._state.grads is None:
            # step(closure) (LBFGS, Lightning) whose backward was not seen: the gradients of its
            # last evaluation; the weights are already updated, so a culprit is looked for with
            # the new weights.
            self._contained("gradients", self._gradients_ready)()

    def _find_entries(self) -> None:
        """After a watched step: the modules the loop called directly (not from inside another
        module) get an entry pre-hook, so a loop that never calls the model itself (Lightning's
        ``training_step`` calls ``self.net(x)``) is seen like one that does."""
        fired = self._watch.fired
        if not fired or 0 in fired:
            return
        for i in sorted(fired):
            if i not in self._entries and self._parent[i] not in fired:
                self._entries.add(i)
                self._hook(self._modules[i].register_forward_pre_hook(
                    self._entry_hook(i), with_kwargs=True, prepend=True))

    def _on_policy_change(self, changes: list[tuple[str, str | None, str | None]]) -> None:
        self._watch.watch_next = True
        rows = [(self._state.index, self._name_idx[layer], prec, rule)
                for layer, prec, rule in changes if layer in self._name_idx]
        if self._writer is not None:
            self._writer.put("policy_changes", rows)

    def _replay(self) -> list[tuple[int, int]]:
        """The layers whose outputs went inf/nan first, from a rerun of the step's forward."""
        return self._rerun(check=True) or []

    def _rerun(self, check: bool) -> list[tuple[int, int]] | None:
        """Rerun the step's forward (no grad, state restored after): with ``check``, the inf/nan
        check runs; without, the module hooks record dtypes and activations."""
        s = self._state
        if s.inputs is None:
            return None
        self._replaying, self._watch.paused = True, check
        try:
            with contextlib.nullcontext() if check else self._watch.recording_rerun():
                return overflow.replay_forward(self._modules, s.inputs, s.autocast, s.rng,
                                               self.device, check=check)
        finally:
            self._replaying = self._watch.paused = False

    # ----------------------------------------------------------------- 4. the step ends
    def step(self, loss: Any = None, samples: int | None = None) -> int:
        """Close the current training step (or micro-batch) and record it. Returns its index.

        With an optimizer, a step is one ``optimizer.step()``: a call with no optimizer step
        since the last one (gradient accumulation) adds its loss and samples to the step and
        records nothing yet; a step GradScaler skipped is recorded as skipped.

        On an accelerator, one host copy: loss, loss scale, non-finite flags and this step's
        statistics together. On the CPU these are read where they lie (no copy is needed).
        """
        if not self._attached:
            raise RuntimeError("Recorder.step() called outside the recorder: use `with rec:` "
                               "(or rec.attach()) before training")
        s = self._state
        if "step" in self._broken:
            self._new_state(s.index + 1)
            return s.index
        try:
            return self._close_step(s, loss, samples)
        except Exception as e:  # noqa: BLE001 - never into the training loop
            self.record_error("step", e)
            self._new_state(s.index + 1)
            return s.index

    def _close_step(self, s: StepState, loss: Any, samples: int | None) -> int:
        s.losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if samples:
            s.samples = (s.samples or 0) + int(samples)
        scaling = self._grads.scaling()
        scale_now = compat.scaler_scale(self.scaler)
        if not self._calls_are_steps and s.optim_steps == 0:
            # No optimizer step: GradScaler skipped it if its scale backed off or (a scale that
            # reached 0 backs off to 0 again) its update() ran, which replaces its state.
            backed_off = scaling and s.scale_used is not None and scale_now is not None and (
                float(scale_now) < float(s.scale_used)
                or compat.scaler_updated(self.scaler, s.scaler_token))
            if not backed_off:
                self._micro_batches += 1
                if self._optim_seen or self._micro_batches < _MAX_MICRO_BATCHES:
                    return s.index  # a micro-batch: the step goes on
                self._calls_are_steps = True
                warnings.warn(f"mpviz: {_MAX_MICRO_BATCHES} rec.step() calls and the optimizer's "
                              "step() was never seen; each rec.step() is now recorded as a step. "
                              "Pass the torch optimizer your loop steps (not a wrapper).",
                              RuntimeWarning, stacklevel=3)
        self._micro_batches = 0

        if s.grads is None and s.stats_step and not scaling and any(
                p.grad is not None for p in self._params):
            self._contained("gradients", self._gradients_ready)()  # nobody read them yet
        if s.grads is None:
            self._forward_seen(s)  # a forward without backward, or gradients never seen
        if s.acts and s.stats_step and "gradients" not in self._broken:
            self._grads.take_stats(s, [], self._watch.take_acts(s))  # a forward, no backward

        has_scale = s.scale_used is not None and scale_now is not None
        loss_ts = [l if l.numel() == 1 else l.detach().reshape(-1)[0]
                   for l in s.losses if isinstance(l, torch.Tensor)]
        values, stats = _to_host(self._grads.on_host, self.device,
                                 [s.scale_used if has_scale else None,
                                  scale_now if has_scale else None, s.grad_bad,
                                  self._origin.flag if self._origin else None, *loss_ts],
                                 s.stats)
        scale_used, scale_after, bad, local_bad = values[:4]
        losses = values[4:] + [float(l) for l in s.losses
                               if l is not None and not isinstance(l, torch.Tensor)]
        loss_v = sum(losses) / len(losses) if losses else None
        any_bad = bool(bad)
        # A fused optimizer is stepped even when GradScaler skips (the kernel does nothing):
        # the scale backing off is what says the step was skipped.
        skipped = bool(has_scale and scale_after < scale_used) or (
            not self._calls_are_steps and s.optim_steps == 0)
        # Which parameters went non-finite: worked out on bad steps only (GradScaler skipped the
        # step, or our own check found inf/nan).
        bad_params = self._grads.nonfinite_params(s) if any_bad or (skipped and has_scale) else []
        loss_bad = loss_v is not None and not math.isfinite(loss_v)

        # ---- rows, to the writer thread
        w = self._writer
        assert w is not None
        step_time = time.perf_counter() - s.t_start
        w.put("steps", [(s.index, loss_v, scale_used, scale_after, int(skipped),
                         int(bool(bad_params)), step_time, s.samples,
                         (s.samples / step_time) if s.samples and step_time > 0 else None,
                         time.time())])
        if s.watching and "layers" not in self._broken:
            w.put("dtypes", self._watch.dtype_rows(s.index, self._params, self._param_layer,
                                                   s.grads or []))
        if not self._autocast_known and s.autocast is not None:  # the first forward seen
            self._autocast_known = True
            enabled, dt = s.autocast
            w.set_meta(autocast_dtype=dtype_name(dt) if enabled else None)
        if stats is not None:
            w.put_later(stat_rows, (s.index, stats, s.stats_owners, s.act_rows,
                                    self._watch.last_dtypes),
                        nbytes=getattr(stats, "nbytes", 0))
        if bad_params or loss_bad:
            culprits = s.precheck
            if culprits is None:
                culprits = self._contained("overflow", self._replay)() or []
            rows = overflow.overflow_rows(s.index, culprits, bad_params, s.grads or [],
                                          self._param_layer, self._watch.fwd_order, skipped)
            local = None if self._origin is None else (
                self._contained("overflow origin", self._origin.bad_layers)() or set())
            w.put("overflows", distributed.with_origin(rows, local))
        self._take_writer_errors()

        # ---- the next step
        if any_bad:
            self._grads.found_inf.zero_()
        if self._origin is not None:
            self._origin.end_step(bool(local_bad))
        # (a forward the pre-hooks did not see, compiled in place after attach: from the step's
        # creation, data loading included)
        cpu_start = s.cpu_start if s.cpu_start is not None else s.cpu_begin
        self._schedule.step_ended(time.perf_counter() - s.t_start,
                                  time.thread_time() - cpu_start, s.stats_step,
                                  usual=not (bad_params or loss_bad))
        if s.watching:
            self._contained("forward", self._find_entries)()
        self._new_state(s.index + 1)
        if self._steering is not None:
            self._steer_poll(self._state.index)  # requests from mpviz.steer, applied from here
        return s.index


class _Traced:
    """What a pre-hook traced into compiled code stores on each call: the entry module's index
    with its inputs, and the autocast state."""
    inputs: tuple[int, tuple, dict] | None = None
    autocast: tuple[bool, torch.dtype] | None = None


def _wrap_compiled_call(model: nn.Module, pre: Callable, undo: contextlib.ExitStack) -> None:
    """``model.compile()`` runs the model's hooks inside compiled code: see its calls from
    outside (``pre`` eager), and put the original back on close."""
    original = model._compiled_call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        pre(model, args, kwargs)
        return original(*args, **kwargs)

    model._compiled_call_impl = call
    undo.callback(setattr, model, "_compiled_call_impl", original)


def _backward_markers(root: nn.Module) -> list[nn.Parameter]:
    """One trainable parameter of the model itself and of each of its children: any backward
    through any part of the model accumulates at least one of them."""
    found: dict[int, nn.Parameter] = {}
    for part in [root, *root.children()]:
        p = next((p for p in part.parameters(recurse=part is not root) if p.requires_grad), None)
        if p is not None:
            found.setdefault(id(p), p)
    return list(found.values())


def _to_host(on_host: bool, device: torch.device, values: list[Any],
             stats: Any) -> tuple[list[Any], Any]:
    """Floats of ``values`` (0-d tensors, floats or None), and the statistics on the host
    (numpy rows, or a :class:`HostSample` whose rows the writer thread computes).

    On the CPU reading a tensor is no copy and no sync. On an accelerator everything goes
    into one tensor and comes back in one copy (one sync per step)."""
    if on_host or not any(isinstance(v, torch.Tensor) for v in values):
        vals = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        if isinstance(stats, torch.Tensor):
            stats = stats.double().cpu().numpy()
        return vals, stats
    parts = [v.detach().reshape(1).float().to(device) if isinstance(v, torch.Tensor)
             else torch.tensor([float(v)], device=device) for v in values if v is not None]
    if stats is not None:
        parts.append(stats.reshape(-1))
    host = torch.cat(parts).cpu().numpy()
    vals, pos = [], 0
    for v in values:
        vals.append(None if v is None else float(host[pos]))
        pos += v is not None
    if stats is not None:
        stats = host[pos:].astype(np.float64).reshape(-1, ROW)
    return vals, stats
