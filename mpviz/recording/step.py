"""One training step as the recorder sees it: created when the step starts, dropped when it ends.

Everything that belongs to one step lives here, so nothing from one step can leak into the next:
:meth:`mpviz.Recorder.step` ends the step by replacing this object with a fresh one. A step is one
``optimizer.step()`` (with an optimizer): ``rec.step()`` calls without an optimizer step in between
are micro-batches of gradient accumulation, whose loss and samples join the step.

Its phases, in the order they happen:
1. forward seen (``inputs``, ``autocast``, ``rng`` of the last training forward, kept for a replay;
   ``acts`` and ``fwd_dtypes`` on watched steps; a compiled forward is rerun eagerly for them);
2. gradients ready (``grads``, ``scale_used``, ``grad_bad``, ``stats``);
3. optimizer stepped (``optim_steps``; ``precheck`` if the forward was replayed before the update);
4. closed by ``rec.step()`` (``losses``, ``samples`` of every micro-batch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class StepState:
    index: int
    stats_step: bool  # per-layer statistics on this step
    t_start: float = field(default_factory=time.perf_counter)
    cpu_start: float | None = None  # this thread's CPU time at the step's first forward
    cpu_begin: float = field(default_factory=time.thread_time)  # ... where no forward is seen
    # 1. forward
    inputs: tuple[int, tuple, dict] | None = None  # (entry module index, args, kwargs)
    compiled: bool = False  # the forward ran compiled code: watched steps rerun it eagerly
    rerun: bool = False
    autocast: tuple[bool, torch.dtype] | None = None
    rng: Any = None
    watching: bool = False  # per-module hooks on (statistics or possible dtype change)
    acts: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # output, version
    # 2. gradients
    backward_queued: bool = False
    grads: list[torch.Tensor | None] | None = None
    grad_bad: torch.Tensor | None = None  # our own inf/nan flag (no GradScaler)
    scale_used: Any = None  # the loss scale of this backward: a float (CPU) or a device tensor
    scaler_token: Any = None  # GradScaler state that its update() replaces
    stats: Any = None  # HostSample (CPU) or device tensor, see mpviz.stats
    stats_owners: dict[str, list[int]] = field(default_factory=dict)
    act_rows: list[int] = field(default_factory=list)
    # 3. optimizer
    optim_steps: int = 0
    precheck: list[tuple[int, int]] | None = None  # forward culprits found before the update
    # 4. micro-batches closed by rec.step() so far
    losses: list[Any] = field(default_factory=list)
    samples: int | None = None


@dataclass(frozen=True)
class Parts:
    """What the recorder's parts (diagnostics, the DDP hook) may use of it: its layers and
    parameters, the step under way, a way to write rows and to contain their errors."""

    names: list[str]
    modules: list[nn.Module]
    params: list[nn.Parameter]
    param_layer: list[int]  # the layer each parameter belongs to
    device: torch.device
    state: Callable[[], StepState | None]  # the step under way
    replaying: Callable[[], bool]  # a forward is being replayed (not the user's)
    put: Callable[[str, list[tuple]], None]  # rows to a store table, written off this thread
    contained: Callable[..., Callable]  # ``contained(part, fn)``: errors recorded, not raised
