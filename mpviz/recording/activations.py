"""Per-module forward hooks: the dtypes each layer really ran in, and its output activations.

Per-module hooks cost microseconds per module per call, so they are attached only on "watched"
steps: statistics steps, and any step where the dtypes may have changed (the first, after a
policy change, or when autocast's state or the model's input dtype changed). Outside those
steps the model carries only the recorder's entry hooks.

They are on from the step's start, not from the model's own forward, so a loop that calls a
child module is seen too. In compiled code they do not run: the recorder reruns a compiled
model's forward eagerly on watched steps (:meth:`ForwardWatch.rerun`) and they record that.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import tree
from ..formats import dtype_name
from ..schema import DtypeRow
from .step import StepState


class ForwardWatch:
    """Module hooks, on during watched steps (which ones: :class:`.schedule.StepPlan`)."""

    def __init__(self, modules: list[nn.Module], wrap: Callable[[Callable], Callable],
                 compiled: bool, first: set[int] | None = None) -> None:
        self.modules, self.wrap = modules, wrap
        # modules whose hook goes before their other forward hooks: the model's, and FSDP2
        # units' (whose own hook casts outputs to output_dtype: the layer computed before that)
        self.first = {0} | (first or set())
        self.handles: list[Any] = []
        self.fwd_dtypes: dict[int, tuple[torch.dtype | None, torch.dtype | None]] = {}
        self.fwd_order: list[int] | None = None  # modules in the order they finished, once
        self.order_acc: list[int] | None = []
        self.acts: dict[int, tuple[torch.Tensor, int]] = {}  # this step's outputs, versions
        # Modules whose output is changed in place later in the forward (ReLU(inplace=True)
        # after a conv): their outputs are copied when they are made.
        self.clone_acts: set[int] = set()
        self.last_dtypes: dict[tuple[int, str], str] = {}
        self.dtypes_seen: Any = None
        self.state: StepState | None = None
        self.paused = False  # while the recorder replays a forward to find inf/nan
        self.rerunning = False  # while it reruns a compiled forward eagerly (no grad)
        self.fired: set[int] = set()  # modules seen this step
        # The model runs compiled: hooks are on during reruns only (dynamo guards on a module's
        # hooks, so hooks that come and go would make it compile the model once more).
        self.compiled = compiled

    def begin_step(self, state: StepState) -> None:
        self.state, self.fired, self.acts = state, set(), {}
        self._hook(state.watching)

    def start(self, state: StepState) -> None:
        """A training forward begins."""
        if state.watching:
            self._hook(True)

    def clear_acts(self) -> None:
        self.acts = {}

    def compiled_found(self) -> None:
        self.compiled = True

    @contextlib.contextmanager
    def rerun(self, record: bool) -> Iterator[None]:
        """A rerun of the step's forward: recorded by the hooks (then, on a compiled model, they
        come off again), or unseen (the inf/nan replay)."""
        self.paused, self.rerunning = not record, record
        if record:
            self._hook(True)
        try:
            yield
        finally:
            self.paused = self.rerunning = False
            if record and self.compiled:
                self.remove()

    def _hook(self, on: bool) -> None:
        on = on and (not self.compiled or self.rerunning)
        if on and not self.handles:
            self.handles = [m.register_forward_hook(self.wrap(self._make_hook(i)),
                                                    prepend=i in self.first)
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
                self.acts[idx] = (out, out._version)  # a module called twice: its last output
        return hook

    def take_acts(self) -> dict[int, torch.Tensor]:
        """The step's activations as the modules returned them (in-place-changed ones dropped,
        and copied from the next statistics step on)."""
        acts = {}
        for idx, (t, version) in self.acts.items():
            if t._version == version:
                acts[idx] = t
            else:
                self.clone_acts.add(idx)
        self.acts = {}
        if 0 in acts and any(t is acts[0] for i, t in acts.items() if i):
            del acts[0]  # the model's output is a child's: its row would only repeat that one
        return acts

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def dtype_rows(self, step: int, weights: list[Any], param_layer: list[int],
                   grads: list[torch.Tensor | None]) -> list[DtypeRow]:
        """Rows for the dtypes that changed since they were last recorded. ``weights``: each
        parameter's dtype as its layer computes with it (its own, or under FSDP its unit's
        ``param_dtype``)."""
        seen = (self.fwd_dtypes, list(weights), [None if g is None else g.dtype for g in grads])
        if seen == self.dtypes_seen:  # the common case: nothing changed
            return []
        self.dtypes_seen = (dict(self.fwd_dtypes), seen[1], seen[2])
        current: dict[tuple[int, str], str | None] = {}
        for idx, (i_dt, o_dt) in self.fwd_dtypes.items():
            if i_dt is not None:
                current[(idx, "input")] = dtype_name(i_dt)
            if o_dt is not None:
                current[(idx, "output")] = dtype_name(o_dt)
        for i, w in enumerate(weights):
            layer = param_layer[i]
            current.setdefault((layer, "weight"), w if isinstance(w, str) else dtype_name(w))
            g = grads[i] if i < len(grads) else None
            if g is not None:
                current.setdefault((layer, "grad"), dtype_name(g.dtype))
        rows = [DtypeRow(step, key[0], key[1], dt) for key, dt in current.items()
                if self.last_dtypes.get(key) != dt]
        if rows:  # a new dict: the writer thread may still be reading the old one
            self.last_dtypes = {**self.last_dtypes,
                                **{(r.layer_idx, r.tensor): r.dtype for r in rows}}
        return rows
