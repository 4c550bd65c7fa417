"""``Recorder``: turns an AMP training loop into per-step, per-layer records on disk.

    rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir="runs/exp1")
    with rec:
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update(); opt.zero_grad()
            rec.step(loss=loss, samples=len(x))

The facade: it wires hooks to its parts and runs each step's phases (:mod:`.step`). mpviz only
observes: training stays bit-identical to a run without it (``tests/test_twin.py``), and an
error inside it is recorded in ``run.meta["recorder_errors"]`` with one warning, stops that part
of the recording, and is never raised into the training loop.

What it costs, and where the host syncs are:
- every step: the entry pre-hook (inputs, autocast and RNG state kept for a replay), a read of
  the gradients at the end of backward, and :meth:`Recorder.step`. Without a GradScaler, one fused
  inf/nan check of all gradients and one sync in the optimizer's step pre-hook. On an
  accelerator, one host copy per step; with a GradScaler, a ``rec.step()`` that saw no optimizer
  step reads the scale (a sync) to tell a skipped step from a micro-batch;
- watched steps (statistics steps, and steps where dtypes may change): a forward hook per module;
- statistics steps (:mod:`.schedule`): activation, gradient and weight statistics;
- steps with inf/nan: the step's forward is replayed once with checks on.
Rows go to a background writer thread (:mod:`mpviz.store`); nothing is written on this thread.

FSDP2 (``fully_shard``; FSDP1 is refused): gradient and weight statistics are the whole
tensors', from each rank's shards (:mod:`.sharded`: two all-reduces per statistics step, which
every rank joins, so ``every`` is fixed); the dtypes are each layer's compute dtype and
``run.meta["fsdp_units"]`` has each unit's policy; each rank's local gradients are checked
before the reduce-scatter (:mod:`mpviz.distributed`); forwards are never replayed (a replay
would all-gather on one rank alone). Every rank must attach a Recorder.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import compat, distributed, tree
from ..formats import dtype_name
from ..run import Run
from ..schema import PolicyChangeRow, values
from ..store import RunStoreError, RunWriter, db_path
from .activations import ForwardWatch
from .diagnostics import attach_diagnostics
from .entries import Entries
from .errors import ErrorLog
from .gradients import Gradients
from .layers import Layers
from .overflow import Replay
from .rows import stat_rows
from .schedule import DEFAULT_BUDGET, DEFAULT_EVERY, StatsSchedule, StepPlan
from .sharded import Sharding, ShardedStats
from .step import MicroBatches, Parts, StepEnd, StepRecord, StepState, finish_step, to_host


@dataclass(frozen=True)
class Settings:
    """A Recorder's arguments, checked."""

    run_dir: Path
    name: str
    every: int
    resume: bool
    start_step: int
    flush_every_s: float
    meta: dict[str, Any]
    policy: Any  # a PrecisionPolicy or its rules, applied at attach
    steerable: bool
    rank: int
    world_size: int
    stats_ranks: list[int]
    lost_updates: bool | None
    shadow: Any
    shadow_every: int


def _setting(name: str) -> Any:
    return property(lambda self: getattr(self.settings, name))


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
            most every 10 steps, stretched so that what statistics cost stays within
            ``stats_budget`` of the training time (:mod:`.schedule`; in a distributed job exactly
            every 10, so that ranks take the same steps). Loss, scale, skips, overflow events
            with their layers, dtypes and timing are recorded every step either way.
        stats_budget: the share of training time statistics may cost (default 0.03 when
            ``every`` is None in a single process; otherwise no budget unless given; refused
            under FSDP, where ranks must take statistics on the same steps).
            ``run.meta["stats_cost"]`` says what they cost.
        policy: an :class:`mpviz.PrecisionPolicy` (or its rules dict) to apply while recording;
            its changes are recorded in ``run.policy_changes``.
        meta: extra JSON-able facts stored in ``run.meta``.
        steerable: accept precision changes from other processes (:func:`mpviz.steer`), applied
            at step boundaries (:mod:`mpviz.mailbox`); without ``policy``, an empty one is applied.
        resume: continue the run already in ``run_dir`` (a job restarted from a checkpoint):
            its rows for steps >= ``start_step`` are dropped (``run.meta["resumed"]``). Without
            ``resume``, a ``run_dir`` that holds a run is refused.
        start_step: the index of the first step recorded (the checkpoint's step when resuming).
        stats_ranks: in a distributed job, the ranks that take per-layer statistics: a list
            (``[0, 7]``), ``"sample:K"`` (K ranks spread evenly), or None (every rank). Under
            FSDP every rank still joins the statistics collectives; only these store rows.
        lost_updates: on statistics steps, the fraction of each bf16/fp16 weight's elements
            whose update was rounded away (``run.lost_updates()``); None (default): on when the
            model holds bf16/fp16 parameters. See :mod:`.diagnostics`.
        shadow, shadow_every: layer names or globs (``["fc1", "blocks.*.mlp"]``) rerun in fp32
            on the very inputs they saw every ``shadow_every`` steps (``run.shadow()``).

    ``attach()`` (or ``with rec:``) is all-or-nothing: if anything in it fails, what was attached
    is removed and the run (if its store was created) is marked ``failed``.
    """

    # its parts, made at attach
    _layers: Layers
    _grads: Gradients
    _watch: ForwardWatch
    _replay: Replay
    _entries: Entries
    _boundary: MicroBatches
    _plan: StepPlan

    run_dir = _setting("run_dir")
    name = _setting("name")
    every = _setting("every")
    resume = _setting("resume")
    start_step = _setting("start_step")
    flush_every_s = _setting("flush_every_s")
    steerable = _setting("steerable")
    rank = _setting("rank")
    world_size = _setting("world_size")
    stats_ranks = _setting("stats_ranks")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scaler: Any = None, run_dir: str | os.PathLike | None = None, every: int | None = None,
                 policy: Any = None, name: str | None = None, flush_every_s: float = 2.0,
                 meta: dict[str, Any] | None = None, resume: bool = False,
                 start_step: int = 0, steerable: bool = False, stats_ranks: Any = None,
                 lost_updates: bool | None = None, shadow: Any = None,
                 shadow_every: int = 50, stats_budget: float | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Recorder needs an nn.Module, got {type(model).__name__}")
        rank, world_size = compat.dist_rank_world()
        if every is None:
            every = DEFAULT_EVERY
            # in a distributed job each rank would measure and decide on its own, and ranks
            # would take statistics on different steps: there the default is exactly every 10
            if stats_budget is None and world_size == 1:
                stats_budget = DEFAULT_BUDGET
        self._schedule = StatsSchedule(every, stats_budget)  # checks both
        if scaler is not None and not callable(getattr(scaler, "is_enabled", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (or None), got "
                            f"{type(scaler).__name__}")
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.model, self.scaler = model, scaler
        self.optimizer = _unwrap_optimizer(optimizer)
        self.settings = Settings(
            run_dir=Path(run_dir if run_dir is not None
                         else Path("runs") / time.strftime("%Y%m%d-%H%M%S")),
            name=name or type(model).__name__, every=int(every), resume=bool(resume),
            start_step=int(start_step), flush_every_s=flush_every_s, meta=dict(meta or {}),
            policy={} if steerable and policy is None else policy, steerable=bool(steerable),
            rank=rank, world_size=world_size,
            stats_ranks=distributed.stats_ranks(stats_ranks, world_size),
            lost_updates=lost_updates, shadow=shadow, shadow_every=int(shadow_every))
        self.policy: Any = None  # the PolicyHandle while attached
        self._errors = ErrorLog(lambda: self._state.index if self._state else None,
                                self._publish_errors)
        self._undo: contextlib.ExitStack | None = None  # everything attach did, while attached
        self._closed = False
        self._writer: RunWriter | None = None
        self._run: Run | None = None
        self._state: StepState | None = None
        self._origin: distributed.OriginWatch | distributed.ShardOrigin | None = None
        self._sharding: Sharding | None = None  # FSDP2 models, from attach on
        self._steering: Any = None  # recording.steering.Steering while attached
        self._autocast_known = False  # autocast_dtype written to run.meta

    @property
    def device(self) -> torch.device:
        return self._layers.device

    # ----------------------------------------------------------------- attach / close
    def __enter__(self) -> "Recorder":
        self.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(error=exc)

    def attach(self) -> "Recorder":
        """Hook into the model (and optimizer), apply the policy, open the run. All or nothing."""
        if self._undo is not None:
            return self
        if self._closed:
            raise RuntimeError("this Recorder was closed; create a new one (with a new run_dir)")
        with contextlib.ExitStack() as undo:
            self._attach(undo)
            self._undo = undo.pop_all()
        return self

    def _attach(self, undo: contextlib.ExitStack) -> None:
        distributed.check_supported(self.model)  # FSDP1: refused before anything is attached
        self._layers = Layers.of(self.model)
        layers, st = self._layers, self.settings
        self._sharding = Sharding.of(self.model, layers.modules, layers.params)  # FSDP2
        self._plan = StepPlan(self._schedule, st.rank in st.stats_ranks,
                              sharded=self._sharding is not None, world_size=st.world_size)
        policy = self._checked_policy()  # a bad rule fails before anything is on the model or disk
        self._open_store(undo)
        self._make_parts(undo)
        self._hook_model(undo)
        # last, so that the policy's hooks run before the recorder's
        self._apply_policy(policy, undo)
        self._start_steering(undo)

    def _checked_policy(self) -> Any:
        policy = self.settings.policy
        if policy is None:
            return None
        if self._sharding is not None:
            raise ValueError("policy= (or steerable=True, which applies one) under FSDP: each "
                             "FSDP unit computes in its own "
                             "MixedPrecisionPolicy's param_dtype, which a per-layer autocast "
                             "cannot change. Shard the model with mpviz.fsdp.shard(model, policy) "
                             "instead, and record it without policy=")
        from ..precision import PrecisionPolicy, validate_rules

        if not isinstance(policy, PrecisionPolicy):
            policy = PrecisionPolicy(policy)
        validate_rules(self.model, policy.rules, self.device.type, policy.precisions())
        return policy

    def _open_store(self, undo: contextlib.ExitStack) -> None:
        st = self.settings
        meta = {
            "model": st.name, "device": str(self.device), "torch_version": torch.__version__,
            "autocast_dtype": None, "scaler": compat.scaler_settings(self.scaler),
            "optimizer": type(self.optimizer).__name__ if self.optimizer else None,
            "every": st.every, "stats_budget": self._schedule.budget,
            "start_time": time.time(), "end_time": None, "status": "running",
            "host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "rank": st.rank, "world_size": st.world_size, "steerable": st.steerable,
            "stats_ranks": st.stats_ranks,
            **self._sharded_meta(),
            **st.meta,
        }
        self._writer = RunWriter(db_path(st.run_dir, st.rank), meta,
                                 [values(r) for r in self._layers.rows()],
                                 flush_every_s=st.flush_every_s,
                                 resume_from=st.start_step if st.resume else None)
        undo.push(self._end_run)
        self._schedule.writer = self._writer

    def _sharded_meta(self) -> dict[str, Any]:
        if self._sharding is None:
            return {}
        return {"fsdp_units": self._sharding.meta(), "fsdp": {
            "statistics": "gradients and weights measured as whole tensors from each rank's "
                          "shards (two all-reduces per statistics step, joined by every rank); "
                          "activations per rank",
            "replay": "off: a rerun of the forward would all-gather on one rank alone; the "
                      "local gradients are checked before the reduce-scatter instead (origin)",
            "lost_updates": "off: measuring them on sharded weights would add a collective in "
                            "the optimizer step; FSDP keeps the weights in their storage dtype "
                            "(fp32 with a usual MixedPrecisionPolicy), where updates are not "
                            "rounded to bf16/fp16"}}

    def _make_parts(self, undo: contextlib.ExitStack) -> None:
        layers, st, contained = self._layers, self.settings, self._errors.contained
        sharding = self._sharding
        self._grads = Gradients(layers, self.scaler,
                                ShardedStats(sharding.group) if sharding is not None else None)
        undo.callback(self._grads.views.clear)
        # A compiled model's module hooks do not run as Python: its per-layer dtypes and
        # activations come from an eager rerun of the same batch.
        compiled = compat.is_compiled_wrapper(self.model) or \
            getattr(self.model, "_compiled_call_impl", None) is not None
        self._watch = ForwardWatch(layers.modules, lambda fn: contained("layers", fn), compiled,
                                   first=sharding.fsdp_modules if sharding is not None else None)
        undo.callback(self._watch.remove)
        undo.callback(setattr, self, "_state", None)
        self._replay = Replay(layers.modules, layers.device, self._watch,
                              enabled=sharding is None)
        self._entries = Entries(layers, self._on_forward, lambda: self._replay.active, contained)
        self._boundary = MicroBatches(self.optimizer is not None)
        self._new_state(st.start_step)

    def _hook_model(self, undo: contextlib.ExitStack) -> None:
        contained = self._errors.contained

        def keep(handle: Any) -> None:
            undo.callback(handle.remove)

        self._entries.attach(self.model, keep, undo)
        # Gradients are read when backward has accumulated them, before the loop clips or
        # unscales them: a hook on one parameter of each top-level part of the model queues the
        # read at the end of backward (whichever part the loop calls, compiled or not).
        # (under FSDP not stopped by a failure in "gradients": every rank must go on joining the
        # statistics collectives, which it does from the end of backward)
        part = "gradients" if self._sharding is None else "backward"
        for p in _backward_markers(self._layers.modules[0]):
            keep(p.register_post_accumulate_grad_hook(contained(part, self._on_grad_accumulated)))
        if self.optimizer is not None:
            keep(self.optimizer.register_step_pre_hook(
                contained("optimizer", self._on_optimizer_step)))
            keep(self.optimizer.register_step_post_hook(
                contained("optimizer", self._on_optimizer_stepped)))
        parts = Parts(self._layers, lambda: self._state, lambda: self._replay.active,
                      self._writer.write, contained)
        st = self.settings
        if self._sharding is not None and st.lost_updates:
            warnings.warn(f"mpviz: lost_updates is {self._sharded_meta()['fsdp']['lost_updates']}",
                          RuntimeWarning, stacklevel=4)
        attach_diagnostics(parts, self.optimizer, keep,
                           st.lost_updates if self._sharding is None else False, st.shadow,
                           st.shadow_every)
        if self._watch.compiled:
            self._compiled_found()
        # DDP, FSDP2: each rank's own inf/nan
        self._origin = distributed.watch(self.model, parts)
        if self._origin is not None:
            undo.callback(self._origin.remove)

    def _apply_policy(self, policy: Any, undo: contextlib.ExitStack) -> None:
        if policy is None:
            return
        from ..precision import apply_policy

        self.policy = apply_policy(self.model, policy, device_type=self.device.type)
        undo.callback(self._drop_policy)
        # (policy changes may be applied while dynamo traces a compiled model: run anyway)
        self.policy.add_listener(self._errors.contained("policy", self._on_policy_change,
                                                        traced=True))

    def _start_steering(self, undo: contextlib.ExitStack) -> None:
        if not self.settings.steerable:
            return
        from .steering import Steering

        if self.settings.world_size > 1:
            raise ValueError("steerable=True is for single-process jobs: in a distributed "
                             "job each rank would pick a request up at a different step. "
                             "Use Recorder(..., steerable=False) with torch.distributed.")
        self._steering = Steering(self.settings.run_dir, self.policy)
        undo.callback(lambda: self._errors.contained("steering", self._steering.close)(
            self._state.index))

    def _drop_policy(self) -> None:
        if self.policy is not None:
            self.policy.remove()
            self.policy = None

    def close(self, error: BaseException | None = None) -> None:
        """Detach every hook, restore the model, and finish the run on disk. Idempotent."""
        if self._closed:
            return
        self._closed = True
        undo, self._undo = self._undo, None
        if undo is None:
            return
        # what attach did, undone in reverse order; the run's status (_end_run) last
        if error is None:
            undo.close()
        else:
            undo.__exit__(type(error), error, error.__traceback__)

    def _end_run(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """The run's status, then the store closes: at close, or when attach failed."""
        w = self._writer
        if not self._closed:  # attach failed
            w.set_meta(status="failed", end_time=time.time(),
                       error=f"attach failed: {type(exc).__name__}: {exc}")
            w.close()
            self._writer = None
            return
        w.flush()  # rows made on the writer thread may fail: recorded here
        self._take_writer_errors()
        extra = {} if exc is None else {"error": f"{type(exc).__name__}: {exc}"}
        if self._schedule.budget is not None:
            extra["stats_cost"] = self._schedule.summary()
        w.set_meta(status="finished" if exc is None else "failed", end_time=time.time(),
                   **extra)
        w.close()

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
        return list(self._errors.errors)

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
    def record_error(self, part: str, exc: BaseException, internal: bool = True) -> None:
        """Record ``exc`` (once per ``part``, which then stops) in ``rec.errors`` and
        ``run.meta["recorder_errors"]`` with a warning, instead of raising it into training.
        Integrations (callbacks) report their own errors here."""
        self._errors.record(part, exc, internal, stacklevel=4)

    def _publish_errors(self, errors: list[dict[str, Any]]) -> None:
        if self._writer is not None:
            self._writer.set_meta(recorder_errors=errors)

    def _take_writer_errors(self) -> None:
        if self._writer is not None and self._writer.errors:
            for e in self._writer.take_errors():
                if isinstance(e, RunStoreError):  # the disk, not mpviz: said as it is
                    self._errors.record("store", e, internal=False)
                else:
                    self._errors.record("statistics", e)

    # ----------------------------------------------------------------- the step's phases
    def _new_state(self, index: int) -> None:
        stats_step, watching, joins = self._plan.begin(index)
        self._state = StepState(index, stats_step, watching, joins)
        self._watch.begin_step(self._state)

    def _on_forward(self, idx: int, args: tuple, kwargs: dict) -> None:
        """1. A training forward begins (``idx``: the module the loop called)."""
        s, device = self._state, self.device
        if s.cpu_start is None:  # what the step costs is measured from here (not data loading)
            s.cpu_start = time.thread_time()
        # kept for rerunning this step's forward (an inf/nan culprit; a compiled model's stats)
        s.inputs = (idx, args, kwargs)
        s.autocast = compat.autocast_state(device.type)
        s.rng = compat.get_rng_state(device)
        s.compiled = self._watch.compiled
        self._watch.clear_acts()
        self._forward_starts(s, args if args else kwargs)

    def _forward_starts(self, s: StepState, args: Any) -> None:
        first = tree.first_float(args)
        s.watching = self._plan.forward(s.watching, s.autocast,
                                        first.dtype if first is not None else None)
        self._watch.start(s)

    def _forward_seen(self, s: StepState) -> None:
        """The step's forward is over: a compiled one is rerun eagerly if the step is watched."""
        traced = self._entries.take_traced()
        if traced is not None and s.inputs is None:  # (else an eager pre-hook saw it too)
            (s.inputs, s.autocast), s.compiled = traced, True
            if not self._watch.compiled:
                self._compiled_found()
            self._forward_starts(s, s.inputs[1] if s.inputs[1] else s.inputs[2])
        if self._plan.rerun(s):
            s.rerun = True
            self._watch.clear_acts()
            self._errors.contained("layers", self._replay.run)(s, check=False)
        self._watch.forward_done()

    def _compiled_found(self) -> None:
        self._watch.compiled_found()
        if self.settings.shadow:
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
            # queued during backward, e.g. DDP's, which writes the all-reduced gradients, or
            # FSDP's, which reduce-scatters the root unit's.
            done = self._backward_done
            compat.queue_backward_callback(lambda: compat.queue_backward_callback(done))

    def _backward_done(self) -> None:
        s = self._state
        if s is not None:
            s.backward_queued = False
        self._errors.contained("gradients", self._gradients_ready)()
        if s is not None and s.joins:
            self._join(s)

    def _join(self, s: StepState) -> None:
        """FSDP: the statistics collectives, joined by every rank whatever failed on it (they
        stop on every rank at once if they fail on one: ShardedStats)."""
        sharded = self._grads.sharded
        if sharded.stopped:
            return
        on_error = functools.partial(self._errors.record, "sharded statistics")
        try:
            s.stats = self._grads.join(s.stats if s.stats_step else None, s.index, s.stats_step,
                                       on_error)
        except Exception as e:  # noqa: BLE001 - the collective itself: stop here
            sharded.stopped = True
            on_error(e)
            return
        if sharded.stopped and "sharded statistics" not in self._errors.broken:
            self._errors.record("sharded statistics", RuntimeError(
                f"statistics of gradients and weights failed on {sharded.failed_ranks} other "
                "rank(s) (their run.meta['recorder_errors'] say why): stopped on every rank"),
                internal=False)

    def _gradients_ready(self) -> None:
        """2. Every ``.grad`` of this backward is accumulated."""
        s = self._state
        if s is None or "gradients" in self._errors.broken:
            return
        self._forward_seen(s)
        s.backward_queued = False
        s.grads = self._grads.read()
        if s.stats_step:
            s.stats = self._grads.measure(s.index, self._watch.take_acts(), s.grads)

    def _on_optimizer_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        """3. The optimizer is about to update the weights."""
        if _closure(args, kwargs) is not None:
            return  # the closure computes the gradients: read them after it
        s = self._state
        if s.grads is None and not self._grads.scaling():
            self._errors.contained("gradients", self._gradients_ready)()
        # Without GradScaler nothing stops a non-finite update: find the culprit while the
        # weights are still the ones the bad forward ran with.
        if s.grad_bad is not None and s.grad_bad.item():  # (only set when no GradScaler runs)
            s.precheck = self._errors.contained("overflow", self._culprits)()

    def _on_optimizer_stepped(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        s = self._state
        s.optim_steps += 1
        self._boundary.optimizer_stepped()
        if _closure(args, kwargs) is not None and s.grads is None:
            # step(closure) (LBFGS, Lightning) whose backward was not seen: the gradients of its
            # last evaluation; a culprit is looked for with the weights already updated.
            self._errors.contained("gradients", self._gradients_ready)()

    def _culprits(self) -> list[tuple[int, int]]:
        """The layers whose outputs went inf/nan first, from a rerun of the step's forward."""
        return self._replay.run(self._state, check=True) or []

    def _on_policy_change(self, changes: list[tuple[str, str | None, str | None]]) -> None:
        self._plan.policy_changed()
        index = self._layers.index
        if self._writer is not None:
            self._writer.write([PolicyChangeRow(self._state.index, index[layer], prec, rule)
                                for layer, prec, rule in changes if layer in index])

    # ----------------------------------------------------------------- 4. the step ends
    def step(self, loss: Any = None, samples: int | None = None) -> int:
        """Close the current training step (or micro-batch) and record it; returns its index.
        A call with no optimizer step since the last one adds its loss and samples to the step
        (gradient accumulation), unless GradScaler skipped the step. On an accelerator, one
        host copy (loss, scale, flags, statistics)."""
        if self._undo is None:
            raise RuntimeError("Recorder.step() called outside the recorder: use `with rec:` "
                               "(or rec.attach()) before training")
        s = self._state
        if "step" in self._errors.broken:
            self._new_state(s.index + 1)
            return s.index
        try:
            return self._close_step(s, loss, samples)
        except Exception as e:  # noqa: BLE001 - never into the training loop
            self._errors.record("step", e)
            self._new_state(s.index + 1)
            return s.index

    def _close_step(self, s: StepState, loss: Any, samples: int | None) -> int:
        s.add_micro_batch(loss, samples)
        scaling, scale_now = self._grads.scaling(), compat.scaler_scale(self.scaler)
        if not self._boundary.step_ends(s, scaling, scale_now, self.scaler):
            return s.index  # a micro-batch: the step goes on
        self._read_late(s, scaling)
        end = self._read_end(s, scale_now)
        record = finish_step(s, end)
        self._write(s, record)
        self._next_step(s, end)
        return s.index

    def _read_late(self, s: StepState, scaling: bool) -> None:
        """What no hook read: gradients of a statistics step, a forward without backward."""
        if s.grads is None and s.stats_step and not scaling and self._grads.any_present():
            self._errors.contained("gradients", self._gradients_ready)()  # nobody read them yet
        if s.grads is None:
            self._forward_seen(s)  # a forward without backward, or gradients never seen
        if (self._watch.acts and s.stats_step and s.stats is None
                and "gradients" not in self._errors.broken):
            # a forward without backward: its activations (after a backward, a later forward's
            # are not the step's)
            s.stats = self._grads.measure(s.index, self._watch.take_acts(), s.grads)

    def _read_end(self, s: StepState, scale_now: Any) -> StepEnd:
        """The step's values (one host copy) and, on a bad step, where the inf/nan came from."""
        origin = self._origin
        host = to_host(s, scale_now, origin.flag if origin else None, self._grads.on_host,
                       self.device)
        t_end, wall_time = time.perf_counter(), time.time()
        skipped = host.backed_off or self._boundary.unstepped(s)
        # Which gradients went inf/nan: worked out on bad steps only (GradScaler skipped the
        # step, or our own check found inf/nan).
        bad_grads = self._grads.nonfinite_layers(s.grads) if host.grads_bad or (
            skipped and host.scale_used is not None) else {}
        dtypes = []
        if s.watching and "layers" not in self._errors.broken:
            layers = self._layers
            weights = ([p.dtype for p in layers.params] if self._sharding is None
                       else self._sharding.compute_dtypes)
            dtypes = self._watch.dtype_rows(s.index, weights, layers.param_layer,
                                            s.grads.grads if s.grads is not None else [])
        culprits, rank_layers = [], None
        # (under DDP a rank's own inf/nan always reaches its all-reduced gradients; under FSDP
        # its shard of the reduced ones may hold none of it)
        bad = bool(bad_grads) or host.loss_bad or host.rank_bad
        if bad:
            culprits = s.precheck
            if culprits is None:
                culprits = self._errors.contained("overflow", self._culprits)() or []
            if origin is not None:
                rank_layers = self._errors.contained("overflow origin", origin.bad_layers)() or set()
        return StepEnd(host, skipped, bad_grads, culprits, rank_layers, self._watch.fwd_order,
                       dtypes, self._watch.last_dtypes, t_end, wall_time, bad)

    def _write(self, s: StepState, record: StepRecord) -> None:
        w = self._writer
        w.write([record.step])
        w.write(record.dtypes)
        if not self._autocast_known and s.autocast is not None:  # the first forward seen
            self._autocast_known = True
            enabled, dt = s.autocast
            w.set_meta(autocast_dtype=dtype_name(dt) if enabled else None)
        if record.stats is not None:
            w.put_later(stat_rows, record.stats, nbytes=getattr(record.stats.values, "nbytes", 0))
        w.write(record.overflows)
        self._take_writer_errors()

    def _next_step(self, s: StepState, end: StepEnd) -> None:
        if end.host.grads_bad:
            self._grads.clear_flag()
        if self._origin is not None:
            self._origin.end_step(end.host.rank_bad)
        # (a forward the pre-hooks did not see, compiled in place after attach: from the step's
        # creation, data loading included)
        cpu_start = s.cpu_start if s.cpu_start is not None else s.cpu_begin
        self._schedule.step_ended(time.perf_counter() - s.t_start,
                                  time.thread_time() - cpu_start, s.stats_step,
                                  usual=not end.bad)
        if s.watching:
            self._errors.contained("forward", self._entries.add)(self._watch.fired, self._keep)
        self._new_state(s.index + 1)
        if self._steering is not None:  # requests from mpviz.steer, applied from here
            self._errors.contained("steering", self._steering.poll)(self._state.index)

    def _keep(self, handle: Any) -> None:
        """A hook added after attach: removed at close."""
        self._undo.callback(handle.remove)


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


def _backward_markers(root: nn.Module) -> list[nn.Parameter]:
    """One trainable parameter of the model itself and of each of its children: any backward
    through any part of the model accumulates at least one of them."""
    found: dict[int, nn.Parameter] = {}
    for part in [root, *root.children()]:
        p = next((p for p in part.parameters(recurse=part is not root) if p.requires_grad), None)
        if p is not None:
            found.setdefault(id(p), p)
    return list(found.values())
