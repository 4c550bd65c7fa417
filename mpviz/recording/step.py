"""One training step as the recorder sees it, and how it ends.

A :class:`StepState` is created when the step starts and dropped when it ends, so nothing of one
step leaks into the next. Only the Recorder writes it; its parts hand values back. Its phases:
1. forward seen: inputs, autocast and RNG state of the last training forward (for a rerun);
2. gradients ready: ``grads`` (:class:`.gradients.GradRead`) and, on statistics steps, ``stats``;
3. optimizer stepped: ``optim_steps``; ``precheck``, the culprits of a replay before the update;
4. ``rec.step()``: ``losses`` and ``samples`` of each micro-batch; when the step ends, what is
   left is read (:class:`StepEnd`) and :func:`finish_step` turns it all into rows.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import compat
from ..schema import DtypeRow, OverflowRow, StepRow
from ..stats import ROW
from .layers import Layers
from .overflow import overflow_rows
from .rows import Measured

# After this many rec.step() calls without seeing the optimizer's step (a wrapper that bypasses
# torch's step hooks), each rec.step() is recorded as a step, with a warning.
MAX_MICRO_BATCHES = 64


@dataclass
class StepState:
    index: int
    stats_step: bool  # per-layer statistics on this step
    watching: bool  # module hooks on (statistics, or dtypes that may change)
    joins: bool = False  # FSDP: joins the statistics collectives (every rank, statistics steps)
    t_start: float = field(default_factory=time.perf_counter)
    cpu_start: float | None = None  # this thread's CPU time at the step's first forward
    cpu_begin: float = field(default_factory=time.thread_time)  # ... where no forward is seen
    # 1. forward
    inputs: tuple[int, tuple, dict] | None = None  # (entry module index, args, kwargs)
    autocast: tuple[bool, torch.dtype] | None = None
    rng: Any = None
    compiled: bool = False  # the forward ran compiled code: watched steps rerun it eagerly
    rerun: bool = False
    # 2. gradients
    backward_queued: bool = False
    grads: Any = None  # GradRead
    stats: Measured | None = None
    # 3. optimizer
    optim_steps: int = 0
    precheck: list[tuple[int, int]] | None = None
    # 4. rec.step()
    losses: list[Any] = field(default_factory=list)
    samples: int | None = None

    def add_micro_batch(self, loss: Any, samples: int | None) -> None:
        self.losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if samples:
            self.samples = (self.samples or 0) + int(samples)

    @property
    def scale_used(self) -> Any:
        return self.grads.scale if self.grads is not None else None

    @property
    def grad_bad(self) -> torch.Tensor | None:
        return self.grads.bad if self.grads is not None else None


@dataclass(frozen=True)
class Parts:
    """What the recorder's parts (diagnostics, the DDP hook, the FSDP local check) may use of
    it."""

    layers: Layers
    state: Callable[[], StepState | None]  # the step under way
    replaying: Callable[[], bool]  # a forward is being replayed (not the user's)
    write: Callable[[Sequence[Any]], None]  # rows (mpviz.schema) to the store, off this thread
    contained: Callable[..., Callable]  # ``contained(part, fn)``: errors recorded, not raised


class MicroBatches:
    """Whether a ``rec.step()`` ends the step: with an optimizer, a step is one
    ``optimizer.step()``, and calls in between are micro-batches of gradient accumulation."""

    def __init__(self, optimizer: bool) -> None:
        self.calls_are_steps = not optimizer
        self.optimizer_seen = False
        self.count = 0  # rec.step() calls since the last optimizer step

    def step_ends(self, s: StepState, scaling: bool, scale_now: Any, scaler: Any) -> bool:
        if not self.calls_are_steps and s.optim_steps == 0:
            # No optimizer step: GradScaler skipped it if its scale backed off or (a scale that
            # reached 0 backs off to 0 again) its update() ran, which replaces its state.
            backed_off = scaling and s.scale_used is not None and scale_now is not None and (
                float(scale_now) < float(s.scale_used)
                or compat.scaler_updated(scaler, s.grads.scaler_token))
            if not backed_off:
                self.count += 1
                if self.optimizer_seen or self.count < MAX_MICRO_BATCHES:
                    return False
                self.calls_are_steps = True
                warnings.warn(f"mpviz: {MAX_MICRO_BATCHES} rec.step() calls and the optimizer's "
                              "step() was never seen; each rec.step() is now recorded as a step. "
                              "Pass the torch optimizer your loop steps (not a wrapper).",
                              RuntimeWarning, stacklevel=4)
        self.count = 0
        return True

    def optimizer_stepped(self) -> None:
        self.optimizer_seen = True

    def unstepped(self, s: StepState) -> bool:
        """The step ended without an optimizer step: GradScaler skipped it."""
        return not self.calls_are_steps and s.optim_steps == 0


@dataclass(slots=True)
class HostValues:
    """A step's values after its one host copy."""

    scale_used: float | None  # None without GradScaler (or where its scale is not known)
    scale_after: float | None
    grads_bad: bool  # our own inf/nan check (no GradScaler) found one
    rank_bad: bool  # DDP: this rank's own gradients went inf/nan before the all-reduce
    loss: float | None  # the mean of the micro-batches' losses
    stats: Any  # numpy rows, a HostSample (whose rows the writer thread computes), or None

    @property
    def loss_bad(self) -> bool:
        return self.loss is not None and not math.isfinite(self.loss)

    @property
    def backed_off(self) -> bool:
        """GradScaler lowered its scale: the step was skipped (also when a fused optimizer
        stepped anyway, its kernel doing nothing)."""
        return self.scale_used is not None and self.scale_after < self.scale_used


def to_host(s: StepState, scale_now: Any, rank_flag: torch.Tensor | None, on_host: bool,
            device: torch.device) -> HostValues:
    """On the CPU reading a tensor is no copy and no sync. On an accelerator everything goes
    into one tensor and comes back in one copy (the step's one sync)."""
    has_scale = s.scale_used is not None and scale_now is not None
    losses = [l if l.numel() == 1 else l.detach().reshape(-1)[0]
              for l in s.losses if isinstance(l, torch.Tensor)]
    values = [s.scale_used if has_scale else None, scale_now if has_scale else None,
              s.grad_bad, rank_flag, *losses]
    stats = s.stats.values if s.stats is not None else None
    if on_host or not any(isinstance(v, torch.Tensor) for v in values):
        vals = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        if isinstance(stats, torch.Tensor):
            stats = stats.double().cpu().numpy()
    else:
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
    (scale_used, scale_after, bad, rank_bad), losses = vals[:4], vals[4:]
    losses += [float(l) for l in s.losses if l is not None and not isinstance(l, torch.Tensor)]
    return HostValues(scale_used, scale_after, bool(bad), bool(rank_bad),
                      sum(losses) / len(losses) if losses else None, stats)


@dataclass(slots=True)
class StepEnd:
    """What ``rec.step()`` read when the step ended."""

    host: HostValues
    skipped: bool
    bad_grads: dict[int, int]  # layer -> inf/nan gradient elements (bad steps only)
    culprits: list[tuple[int, int]]  # the replay's (layer, inf/nan outputs), in finishing order
    rank_layers: set[int] | None  # DDP: layers whose gradients on this rank were inf/nan
    fwd_order: list[int] | None  # modules in the order they finished
    dtypes: list[DtypeRow]  # dtypes that changed
    dtypes_now: dict[tuple[int, str], str]  # every (layer, role)'s dtype, for the statistics
    t_end: float  # perf_counter() once the step's values were read (before any replay)
    wall_time: float
    bad: bool  # inf/nan in the gradients or the loss


@dataclass(slots=True)
class StepRecord:
    step: StepRow
    dtypes: list[DtypeRow]
    overflows: list[OverflowRow]
    stats: Measured | None  # made into rows on the writer thread


def finish_step(s: StepState, end: StepEnd) -> StepRecord:
    """The step's rows, from its state and what its end read (no side effects)."""
    h = end.host
    seconds = end.t_end - s.t_start
    step = StepRow(s.index, h.loss, h.scale_used, h.scale_after, int(end.skipped),
                   int(bool(end.bad_grads)), seconds, s.samples,
                   (s.samples / seconds) if s.samples and seconds > 0 else None, end.wall_time)
    overflows = overflow_rows(s.index, end.culprits, end.bad_grads, end.fwd_order, end.skipped,
                              end.rank_layers) if end.bad else []
    stats = None if h.stats is None else replace(s.stats, values=h.stats, dtypes=end.dtypes_now)
    return StepRecord(step, end.dtypes, overflows, stats)
