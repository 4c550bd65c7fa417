"""Per-module forward hooks: the dtypes each layer really ran in, and its output activations.

Per-module hooks cost microseconds per module per call, so they are attached only on "watched"
steps: statistics steps, and any step where the dtypes may have changed (the first, after a
policy change, or when autocast's state or the model's input dtype changed). Outside those
steps the model carries only the recorder's entry hooks.

They are on from the step's start, not from the model's own forward, so a loop that calls a
child module is seen too. In compiled code they do not run: the recorder reruns a compiled
model's forward eagerly on watched steps (``rerunning``) and they record that.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import tree
from ..formats import dtype_name
from .step import StepState


class ForwardWatch:
    """Module hooks, attached on watched steps; what they saw goes into the step's state."""

    def __init__(self, modules: list[nn.Module], wrap: Callable[[Callable], Callable]) -> None:
        self.modules, self.wrap = modules, wrap
        self.handles: list[Any] = []
        self.watch_next = True  # the first step, and after a policy change
        self.watch_key: Any = None
        self.fwd_dtypes: dict[int, tuple[torch.dtype | None, torch.dtype | None]] = {}
        self.fwd_order: list[int] | None = None  # modules in the order they finished, once
        self.order_acc: list[int] | None = []
        # Modules whose output is changed in place later in the forward (ReLU(inplace=True)
        # after a conv): their outputs are copied when they are made.
        self.clone_acts: set[int] = set()
        self.last_dtypes: dict[tuple[int, str], str] = {}
        self.dtypes_seen: Any = None
        self.state: StepState | None = None
        self.paused = False  # set while the recorder replays a forward to find inf/nan
        self.rerunning = False  # set while it reruns a compiled forward eagerly (no grad)
        self.fired: set[int] = set()  # modules seen this step
        # The model runs compiled: hooks are on during reruns only (dynamo guards on a module's
        # hooks, so hooks that come and go would make it compile the model once more).
        self.compiled = False

    def begin_step(self, state: StepState) -> None:
        """A step begins: statistics steps and the step after a policy change are watched."""
        self.state, self.fired = state, set()
        state.watching, self.watch_next = state.stats_step or self.watch_next, False
        self._hook(state.watching)

    def start(self, state: StepState, args: Any) -> None:
        """A training forward begins: a change of autocast state or input dtype watches it."""
        first = tree.first_float(args)
        key = (state.autocast, first.dtype if first is not None else None)
        if self.watch_next or key != self.watch_key:
            state.watching = True
        if state.watching:
            self.watch_key, self.watch_next = key, False
            self._hook(True)

    @contextlib.contextmanager
    def recording_rerun(self) -> Iterator[None]:
        """The hooks record an eager rerun of the step's forward (no grad), then, on a compiled
        model, come off again."""
        self.rerunning = True
        self._hook(True)
        try:
            yield
        finally:
            self.rerunning = False
            if self.compiled:
                self.remove()

    def _hook(self, on: bool) -> None:
        on = on and (not self.compiled or self.rerunning)
        if on and not self.handles:
            self.handles = [m.register_forward_hook(self.wrap(self._make_hook(i)), prepend=i == 0)
                            for i, m in enumerate(self.modules)]
        elif not on and self.handles:
            self.remove()

    def forward_done(self) -> None:
        if self.order_acc:
            self.fwd_order, self.order_acc = self.order_acc, None

    def _make_hook(self, idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            state = self.state
            if state is None or not state.watching or self.paused or not (
                    torch.is_grad_enabled() or self.rerunning):
                return  # evaluation forwards under no_grad are not the training step's
            self.fired.add(idx)
            out, inp = tree.first_float(output), tree.first_float(args)
            self.fwd_dtypes[idx] = (inp.dtype if inp is not None else None,
                                    out.dtype if out is not None else None)
            if self.order_acc is not None:
                self.order_acc.append(idx)
            if out is not None and state.stats_step:
                if idx in self.clone_acts:
                    out = out.detach().clone()
                state.acts[idx] = (out, out._version)  # a module called twice: its last output
        return hook

    def take_acts(self, state: StepState) -> dict[int, torch.Tensor]:
        """The step's activations as the modules returned them (in-place-changed ones dropped,
        and copied from the next statistics step on)."""
        acts = {}
        for idx, (t, version) in state.acts.items():
            if t._version == version:
                acts[idx] = t
            else:
                self.clone_acts.add(idx)
        state.acts = {}
        if 0 in acts and any(t is acts[0] for i, t in acts.items() if i):
            del acts[0]  # the model's output is a child's: its row would only repeat that one
        return acts

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def dtype_rows(self, step: int, params: list[nn.Parameter], param_layer: list[int],
                   grads: list[torch.Tensor | None]) -> list[tuple]:
        """Rows for the dtypes that changed since they were last recorded."""
        seen = (self.fwd_dtypes, [p.dtype for p in params],
                [None if g is None else g.dtype for g in grads])
        if seen == self.dtypes_seen:  # the common case: nothing changed
            return []
        self.dtypes_seen = (dict(self.fwd_dtypes), seen[1], seen[2])
        current: dict[tuple[int, str], str | None] = {}
        for idx, (i_dt, o_dt) in self.fwd_dtypes.items():
            if i_dt is not None:
                current[(idx, "input")] = dtype_name(i_dt)
            if o_dt is not None:
                current[(idx, "output")] = dtype_name(o_dt)
        for i, p in enumerate(params):
            layer = param_layer[i]
            current.setdefault((layer, "weight"), dtype_name(p.dtype))
            g = grads[i] if i < len(grads) else None
            if g is not None:
                current.setdefault((layer, "grad"), dtype_name(g.dtype))
        rows = [(step, key[0], key[1], dt) for key, dt in current.items()
                if self.last_dtypes.get(key) != dt]
        if rows:  # a new dict: the writer thread may still be reading the old one
            self.last_dtypes = {**self.last_dtypes, **{(r[1], r[2]): r[3] for r in rows}}
        return rows
