"""Which layer produced the inf/nan? Found by replaying the bad step's forward with checks on.

Clean steps pay nothing for this. When a step's loss or gradients are non-finite, the recorder
replays that step's forward once (same inputs, same autocast state, same RNG state, no grad) with
a check on every module's output. Forward hooks fire when a module *finishes*, so the first module
reported is the innermost one whose output went non-finite.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import compat


def _nonfinite(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return int((~torch.isfinite(obj)).sum()) if obj.is_floating_point() else 0
    if isinstance(obj, (tuple, list)):
        return sum(_nonfinite(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nonfinite(o) for o in obj.values())
    return 0


def replay_forward(model: nn.Module, modules: list[nn.Module], inputs: tuple[tuple, dict],
                   autocast: tuple[bool, torch.dtype] | None, rng: Any,
                   device: torch.device) -> list[tuple[int, int]]:
    """Re-run one forward; return ``(module index, non-finite count)`` in the order modules finished.

    The caller's RNG state is restored afterwards, so training continues exactly as it would have.
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

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
    saved_rng = compat.get_rng_state(device)
    enabled, dtype = autocast if autocast is not None else (False, torch.float32)
    try:
        if rng is not None:
            compat.set_rng_state(rng, device)
        args, kwargs = inputs
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        compat.set_rng_state(saved_rng, device)
    return found
