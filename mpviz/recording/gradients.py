"""The one place gradients are read: once backward has accumulated them, checked for inf/nan,
measured on statistics steps.

They are read as backward produced them, before the loop clips or unscales them: at the end of
backward, from a callback queued by a post-accumulate-grad hook on one parameter of each part of
the model (so also when the model is compiled, or the loop calls a child module). Where no
backward was seen: in the optimizer's step pre-hook; after ``optimizer.step(closure)`` (LBFGS);
on a statistics step whose gradients nobody read, in ``rec.step()``.

FSDP2: ``.grad`` is a sharded DTensor, written by the reduce-scatter (FSDP calls the
parameters' post-accumulate-grad hooks after it, so the end-of-backward read sees every one).
The inf/nan checks read each rank's own shards; statistics of the whole gradients and weights
come from :meth:`Gradients.join` (collectives every rank joins), activations stay local.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import compat
from ..stats import HostSample, tensor_stats_device
from .layers import Layers
from .rows import Joined, Measured


@dataclass(slots=True)
class GradRead:
    grads: list[torch.Tensor | None]  # each parameter's .grad, still multiplied by the scale
    scale: Any  # the loss scale: a float (CPU), a device tensor, or None without GradScaler
    scaler_token: Any  # GradScaler state that its update() replaces
    bad: torch.Tensor | None  # our own inf/nan flag (only without GradScaler)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's own part of a tensor (a DTensor's shard), read without a collective."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class Gradients:
    def __init__(self, layers: Layers, scaler: Any, sharded: Any = None) -> None:
        self.params, self.param_layer, self.scaler = layers.params, layers.param_layer, scaler
        self.sharded = sharded  # recording.sharded.ShardedStats under FSDP2
        # CPU tensors are read in place and measured with numpy; on an accelerator statistics
        # are kernels there and one host copy per step (tests switch this off on the CPU).
        self.on_host = layers.device.type == "cpu"
        self.views: dict = {}  # the parameters' numpy views (HostSample.take)
        self.found_inf = torch.zeros(1, device=layers.device)

    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def any_present(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def read(self) -> GradRead:
        grads = [p.grad for p in self.params]
        present = [g for g in grads if g is not None]
        scale = compat.scaler_scale(self.scaler)
        token = compat.scaler_token(self.scaler)
        if scale is not None:  # reading a CPU tensor is no sync; elsewhere keep a device copy
            scale = float(scale) if self.on_host else scale.detach().clone()
        bad = None
        if present and scale is None:
            # No GradScaler watches for inf/nan: check here (on device, no sync). Which
            # gradients are bad is worked out on a bad step only (nonfinite_layers).
            bad = self.found_inf  # zero but after a bad step (clear_flag)
            compat.check_nonfinite([_local(g) for g in present], bad)
        return GradRead(grads, scale, token, bad)

    def clear_flag(self) -> None:
        self.found_inf.zero_()

    def measure(self, step: int, acts: dict[int, torch.Tensor],
                read: GradRead | None) -> Measured | None:
        """Activations, (unscaled) gradients and weights of a statistics step, in one batched
        computation (under FSDP activations only: :meth:`join` adds the others)."""
        grads = read.grads if read is not None and self.sharded is None else []
        present = [g for g in grads if g is not None]
        owners = {"activation": list(acts),
                  "grad": [self.param_layer[i] for i, g in enumerate(grads) if g is not None],
                  "weight": self.param_layer if present else []}
        # A container's output is often its last child's very tensor: measure it once.
        unique: dict[int, int] = {}
        act_rows = [unique.setdefault(id(t), len(unique)) for t in acts.values()]
        act_tensors = list({id(t): t for t in acts.values()}.values())
        tensors = act_tensors + present + (self.params if present else [])
        if not tensors:
            return None
        scale = read.scale if read is not None else None
        scaled = None if scale is None else (
            len(act_tensors), len(act_tensors) + len(present), scale)
        values = self._stats(tensors, scaled, len(act_tensors) + len(present), step)
        return Measured(step, values, owners, act_rows)

    def _stats(self, tensors: list[torch.Tensor], scaled: tuple[int, int, Any] | None,
               params_from: int, step: int) -> Any:
        """``[n, ROW]`` statistics rows of ``tensors`` (mpviz.stats), or on the CPU a
        HostSample that makes them on the writer thread."""
        if self.on_host:
            return HostSample.take(tensors, scaled, cache=self.views, stable_from=params_from,
                                   offset=step)
        return tensor_stats_device(tensors, scaled, offset=step)

    def join(self, m: Measured | None, step: int, keep: bool,
             on_error: Any) -> Measured | None:
        """FSDP2: the statistics collectives of a statistics step, which every rank joins (also
        where ``m`` is None or ``keep`` is False: a rank that stores no statistics). Returns
        ``m`` with the whole gradients' (unscaled) and weights' rows after its activations'."""
        params, n = self.params, len(self.params)
        grads = [p.grad for p in params]

        def tensors() -> tuple[list[Any], Any]:
            scale = compat.scaler_scale(self.scaler)  # None without an enabled GradScaler
            return grads + params, (0, n, scale) if scale is not None else None

        rows = self.sharded.rows(tensors, 2 * n, self.found_inf.device, step, on_error)
        if rows is None or not keep:
            return m
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return m
        rows = rows[present + list(range(n, 2 * n))]
        if m is None:
            m = Measured(step, None, {"activation": []}, [])
        m.owners["grad"] = [self.param_layer[i] for i in present]
        m.owners["weight"] = list(self.param_layer)
        acts = m.values
        if acts is None:
            m.values = rows.cpu().numpy() if self.on_host else rows
        elif isinstance(acts, HostSample):
            m.values = Joined(acts, rows.cpu().numpy())
        else:
            m.values = torch.cat([acts.double(), rows])
        return m

    def nonfinite_layers(self, read: GradRead | None) -> dict[int, int]:
        """Layer -> inf/nan elements of its gradients, in parameter order (bad steps only;
        under FSDP, in this rank's shards)."""
        grads = read.grads if read is not None else []
        grads = [None if g is None else _local(g) for g in grads]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return {}
        # Element-wise, not a norm: the norm of finite fp16 values can itself overflow.
        flags = torch.stack([(~torch.isfinite(grads[i])).any() for i in present])
        counts: dict[int, int] = {}
        for k in flags.nonzero().flatten().tolist():
            g, layer = grads[present[k]], self.param_layer[present[k]]
            counts[layer] = counts.get(layer, 0) + int((~torch.isfinite(g)).sum())
        return counts
