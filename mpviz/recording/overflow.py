"""Which layer produced the inf/nan? Found by replaying the bad step's forward with checks on.

Clean steps pay nothing. A step whose loss or gradients are non-finite has its forward replayed
once (same inputs, autocast and RNG state, no grad, eagerly even when compiled, where dropout may
differ) with a check on every module's output; forward hooks fire when a module finishes, so the
first module reported is the innermost one that went non-finite. Buffers (BatchNorm's running
statistics), RNG states and train/eval flags are put back. Not undone: side effects of the user's
own forward code, and in-place changes to the inputs after the forward. With gradient
accumulation the last micro-batch's forward is replayed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import compat, tree
from ..schema import OverflowRow


def _nonfinite(obj: Any) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tree.tensors(obj) if t.is_floating_point())


def replay_forward(modules: list[nn.Module], inputs: tuple[int, tuple, dict],
                   autocast: tuple[bool, torch.dtype] | None, rng: Any, device: torch.device,
                   check: bool = True) -> list[tuple[int, int]]:
    """Rerun one forward of ``modules[inputs[0]]`` (the module the loop called) eagerly; with
    ``check``, return ``(module index, non-finite count)`` in the order modules finished
    (without, the caller's own hooks watch it)."""
    found: list[tuple[int, int]] = []
    seen: set[int] = set()

    def make(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            n = _nonfinite(output)
            if n and i not in seen:
                seen.add(i)
                found.append((i, n))
        return hook

    handles = []
    enabled, dtype = autocast if autocast is not None else (False, torch.float32)
    entry, args, kwargs = inputs
    with compat.preserved(modules[0], device):
        try:
            if check:
                handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
            if rng is not None:
                compat.set_rng_state(rng, device)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled), \
                    compat.force_eager():
                modules[entry](*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
    return found


class Replay:
    """Reruns of the step's forward, for the module hooks (a compiled model's dtypes and
    activations) or with checks on (the inf/nan culprit).

    ``enabled=False`` (FSDP): no rerun. An FSDP forward all-gathers each unit's parameters, a
    collective that a rerun on one rank alone would wait on forever; there each rank's local
    gradients are checked before the reduce-scatter instead (``overflows.origin``)."""

    def __init__(self, modules: list[nn.Module], device: torch.device, watch: Any,
                 enabled: bool = True) -> None:
        self.modules, self.device, self.watch = modules, device, watch
        self.enabled = enabled
        self.active = False  # a rerun is under way: not the user's forward

    def run(self, s: Any, check: bool) -> list[tuple[int, int]] | None:
        if s.inputs is None or not self.enabled:
            return None
        self.active = True
        try:
            with self.watch.rerun(record=not check):
                return replay_forward(self.modules, s.inputs, s.autocast, s.rng, self.device,
                                      check=check)
        finally:
            self.active = False


def overflow_rows(step: int, culprits: list[tuple[int, int]], bad_grads: dict[int, int],
                  fwd_order: list[int] | None, skipped: bool,
                  rank_layers: set[int] | None) -> list[OverflowRow]:
    """Forward culprits in the order they finished, then the layers whose gradients went
    non-finite, the first in backward order marked ``first``.

    ``origin``: forward rows are always this rank's own; a gradient row is when its layer's
    gradients on this rank were (``rank_layers``; None: no all-reduce, every gradient is).
    Under FSDP a rank keeps a shard of each reduced gradient, which may hold none of the inf/nan
    its own local gradient had: such a layer gets a row with ``nonfinite`` 0 and ``origin``."""
    rows = [OverflowRow(step, layer, "activation", "forward", int(k == 0), count, int(skipped), 1)
            for k, (layer, count) in enumerate(culprits)]
    # Backward runs in reverse forward order: the first layer to receive a non-finite
    # gradient is the one that ran last in the forward pass.
    order = {l: k for k, l in enumerate(fwd_order or [])}
    layers = [*bad_grads, *sorted(set(rank_layers or ()) - set(bad_grads))]
    for k, layer in enumerate(sorted(layers, key=lambda l: -order.get(l, -1))):
        rows.append(OverflowRow(step, layer, "grad", "backward", int(k == 0),
                                bad_grads.get(layer, 0), int(skipped),
                                int(rank_layers is None or layer in rank_layers)))
    return rows
