"""Where FSDP2 lets an observer see gradients, twice per backward:

- :class:`LocalGradCheck`: each rank's *local* gradients, before the reduce-scatter mixes the
  ranks' values, checked for inf/nan (which rank produced an inf/nan: the DDP comm hook's
  ``origin``). FSDP2 computes a unit's gradients into its *unsharded* parameters, plain
  ``nn.Parameter`` s it keeps from the first all-gather on and swaps into the modules while the
  unit runs. A forward pre-hook on each FSDP module (registered after ``fully_shard``, so it runs
  after FSDP's own, which gathers) finds them on the module and puts a post-accumulate-grad hook
  on each, once. That hook runs as autograd accumulates the local gradient, before the unit's
  post-backward reduce-scatters and frees it, in the compute dtype (``param_dtype``).
- :class:`ReducedGrads`: the gradients the optimizer sees. FSDP2 calls the post-accumulate-grad
  hooks of the *sharded* parameters (``model.parameters()``, DTensors) itself, right after the
  reduce-scatter writes each ``.grad`` (a sharded DTensor in the parameters' storage dtype,
  reduced in ``reduce_dtype``). The root unit's are called from FSDP's end-of-backward callback,
  so a callback queued from such a hook (:func:`mpviz.compat.queue_backward_callback`) runs after
  every ``.grad`` is final: before clipping and before ``GradScaler.unscale_``.

Both only read: training with and without them is bit-identical (tests/test_fsdp.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .. import compat

__all__ = ["LocalGradCheck", "ReducedGrads", "fsdp_modules"]


def fsdp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``fully_shard`` was called on (names as ``model.named_modules()``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]


class LocalGradCheck:
    """This rank's local (unsharded, not yet reduce-scattered) gradients, checked for inf/nan.

    On the CPU each gradient is checked in its hook (GradScaler's fused check; reading it is no
    sync); on an accelerator each hook keeps the gradient's max |g| on the device (inf and nan
    propagate), read once by :meth:`bad_params`. Use ``attach()`` / ``remove()`` or ``with``.

        >>> with LocalGradCheck(fsdp_model) as check:          # doctest: +SKIP
        ...     loss = fsdp_model(x).sum(); loss.backward()
        ...     check.bad_params()     # ['layers.3.mlp.weight'] if this rank made an inf
    """

    def __init__(self, model: nn.Module, on_host: bool | None = None,
                 wrap: Callable[[Callable], Callable] = lambda fn: fn) -> None:
        self.model = model
        self.units = fsdp_modules(model)
        if not self.units:
            raise ValueError("LocalGradCheck needs an FSDP2 model (fully_shard on its blocks and "
                             "root)")
        self.on_host = on_host
        self.wrap = wrap  # each hook goes through it (the Recorder: errors contained)
        self._pre: list[Any] = []
        self._grad_hooks: dict[int, Any] = {}  # id(unsharded parameter) -> its hook's handle
        self._found: list[str] = []  # names found non-finite (CPU)
        self._maxes: list[tuple[str, torch.Tensor]] = []  # (name, max |g|) (accelerator)

    def attach(self) -> "LocalGradCheck":
        for name, mod in self.units:
            self._pre.append(mod.register_forward_pre_hook(self.wrap(self._finder(name))))
        return self

    def _finder(self, unit: str) -> Callable:
        prefix = unit + "." if unit else ""

        def find_unsharded(module: nn.Module, args: Any) -> None:
            # FSDP's pre-hook (prepended) has gathered this unit: its own parameters are plain
            # tensors now, its nested units' still DTensors until they run.
            from torch.distributed.tensor import DTensor

            for pname, p in module.named_parameters():
                if id(p) in self._grad_hooks or isinstance(p, DTensor) or not p.requires_grad:
                    continue
                self._grad_hooks[id(p)] = p.register_post_accumulate_grad_hook(
                    self.wrap(self._checker(prefix + pname)))
        return find_unsharded

    def _checker(self, name: str) -> Callable:
        def check(p: torch.Tensor) -> None:
            g = p.grad
            if g is None:
                return
            on_host = self.on_host if self.on_host is not None else g.device.type == "cpu"
            if on_host:
                found = torch.zeros(1)
                compat.check_nonfinite([g.detach()], found)
                if found.item():
                    self._found.append(name)
            else:  # one small device tensor; no reference to the gradient is kept
                self._maxes.append((name, torch.linalg.vector_norm(g.detach(), math.inf)))
        return check

    def bad_params(self) -> list[str]:
        """Parameters (``model.named_parameters()`` names) whose local gradient held inf/nan
        since the last :meth:`end_step`. On an accelerator: one host copy."""
        out = list(self._found)
        if self._maxes:
            vals = torch.stack([m.float() for _, m in self._maxes])
            for k in (~torch.isfinite(vals)).nonzero().flatten().tolist():
                out.append(self._maxes[k][0])
        return sorted(set(out))

    def flag(self) -> float | torch.Tensor:
        """Nonzero if a local gradient held inf/nan since the last :meth:`end_step`: a float
        once checked on the host, else a device tensor (no sync)."""
        if self._found or not self._maxes:
            return float(bool(self._found))
        vals = torch.stack([m.float() for _, m in self._maxes])
        return (~torch.isfinite(vals)).any().float()

    def end_step(self) -> None:
        self._found.clear()
        self._maxes.clear()

    def remove(self) -> None:
        for h in self._pre:
            h.remove()
        for h in self._grad_hooks.values():
            h.remove()
        self._pre.clear()
        self._grad_hooks.clear()
        self.end_step()

    def __enter__(self) -> "LocalGradCheck":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class ReducedGrads:
    """Calls ``fn()`` once per backward, after FSDP2 has reduce-scattered every unit's
    gradients: each sharded parameter's ``.grad`` is then what the optimizer will see.

        >>> with ReducedGrads(fsdp_model, lambda: print("all .grad final")):   # doctest: +SKIP
        ...     fsdp_model(x).sum().backward()
    """

    def __init__(self, model: nn.Module, fn: Callable[[], None]) -> None:
        self.model, self.fn = model, fn
        self._hooks: list[Any] = []
        self._queued = False

    def attach(self) -> "ReducedGrads":
        for p in self.model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_reduced))
        return self

    def _on_reduced(self, p: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            compat.queue_backward_callback(self._run)

    def _run(self) -> None:
        self._queued = False
        self.fn()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> "ReducedGrads":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()
