"""Which layer produced the inf/nan? Found by replaying the bad step's forward with checks on.

Clean steps pay nothing for this. When a step's loss or gradients are non-finite, the recorder
replays that step's forward once (same inputs, same autocast state, same RNG state, no grad;
eagerly, also for a compiled model, whose RNG state is not known: dropout may differ) with
a check on every module's output. Forward hooks fire when a module *finishes*, so the first module
reported is the innermost one whose output went non-finite.

The replay leaves no trace: every buffer (BatchNorm's running statistics and
``num_batches_tracked``), the CPU and CUDA RNG states and every module's train/eval flag are put
back as they were. What it cannot undo: side effects of the user's own code in the forward
(Python attributes it sets, other forward hooks it registered, generators other than the default
ones) and in-place changes to the inputs made after the forward. With gradient accumulation the
last micro-batch's forward is the one replayed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import compat, tree


def _nonfinite(obj: Any) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tree.tensors(obj) if t.is_floating_point())


def replay_forward(modules: list[nn.Module], inputs: tuple[int, tuple, dict],
                   autocast: tuple[bool, torch.dtype] | None, rng: Any, device: torch.device,
                   check: bool = True) -> list[tuple[int, int]]:
    """Re-run one forward of ``modules[inputs[0]]`` (the module the loop called) eagerly, also
    when it is compiled; with ``check``, return ``(module index, non-finite count)`` in the
    order modules finished (without, the caller's own hooks watch it).

    Buffers, RNG states and train/eval flags are restored afterwards, so training continues
    exactly as it would have.
    """
    found: list[tuple[int, int]] = []
    seen: set[int] = set()

    def make(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            n = _nonfinite(output)
            if n and i not in seen:
                seen.add(i)
                found.append((i, n))
        return hook

    model = modules[0]
    saved_rng = compat.get_rng_state(device)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    enabled, dtype = autocast if autocast is not None else (False, torch.float32)
    entry, args, kwargs = inputs
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
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        compat.set_rng_state(saved_rng, device)
    return found


def overflow_rows(step: int, culprits: list[tuple[int, int]], bad_params: list[int],
                  grads: list[torch.Tensor | None], param_layer: list[int],
                  fwd_order: list[int] | None, skipped: bool) -> list[tuple]:
    """``overflows`` rows: forward culprits in the order they finished, then the layers whose
    gradients went non-finite, the first in backward order marked ``first``."""
    rows = [(step, layer, "activation", "forward", int(k == 0), count, int(skipped))
            for k, (layer, count) in enumerate(culprits)]
    counts: dict[int, int] = {}
    for i in bad_params:
        g = grads[i]
        n = int((~torch.isfinite(g)).sum()) if g is not None else 0
        counts[param_layer[i]] = counts.get(param_layer[i], 0) + n
    # Backward runs in reverse forward order: the first layer to receive a non-finite
    # gradient is the one that ran last in the forward pass.
    order = {l: k for k, l in enumerate(fwd_order or [])}
    for k, layer in enumerate(sorted(counts, key=lambda l: -order.get(l, -1))):
        rows.append((step, layer, "grad", "backward", int(k == 0), counts[layer], int(skipped)))
    return rows
