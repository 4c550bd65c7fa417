"""The step's gradients: read once they are all accumulated, checked for inf/nan, measured.

Gradients are read as backward produced them: before the loop clips or unscales them, at the end
of backward, from a callback queued by a post-accumulate-grad hook on one parameter of each part
of the model (so also when the model is compiled, or the loop calls a child module). Fallbacks:
- a backward that reached none of those parameters: in the optimizer's step pre-hook;
- ``optimizer.step(closure)`` (LBFGS): after the step, the closure's last gradients;
- a statistics step whose gradients nobody read yet: in ``rec.step()``.
:meth:`Gradients.ready` is the one place that reads them, whichever way it is reached.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import compat
from ..stats import HostSample, tensor_stats_device
from .step import StepState


class Gradients:
    def __init__(self, params: list[nn.Parameter], param_layer: list[int], scaler: Any,
                 device: torch.device) -> None:
        self.params, self.param_layer, self.scaler = params, param_layer, scaler
        # CPU tensors are read in place and measured with numpy; on an accelerator statistics
        # are kernels there and one host copy per step (tests switch this off on the CPU).
        self.on_host = device.type == "cpu"
        self.views: dict = {}  # the parameters' numpy views (HostSample.take)
        self.found_inf = torch.zeros(1, device=device)

    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def ready(self, state: StepState, acts: dict[int, torch.Tensor]) -> None:
        """All ``.grad`` are accumulated (and still multiplied by the loss scale)."""
        state.backward_queued = False
        state.grads = [p.grad for p in self.params]
        present = [g for g in state.grads if g is not None]
        scale = compat.scaler_scale(self.scaler)
        state.scaler_token = compat.scaler_token(self.scaler)
        if scale is None:
            state.scale_used = None
        else:  # reading a CPU tensor is no sync; elsewhere keep a device copy for step()
            state.scale_used = float(scale) if self.on_host else scale.detach().clone()
        if present and scale is None:
            # No GradScaler watches for inf/nan: check the gradients here (on device, no sync).
            # Which ones are bad is worked out only on a bad step (nonfinite_params).
            state.grad_bad = self.found_inf  # zero but after a bad step (reset in step())
            compat.check_nonfinite(present, state.grad_bad)
        if state.stats_step:
            self.take_stats(state, present, acts)

    def take_stats(self, state: StepState, present: list[torch.Tensor],
                   acts: dict[int, torch.Tensor]) -> None:
        """Activations, (unscaled) gradients and weights of this step: one batched computation."""
        grads_of = [self.param_layer[i] for i, g in enumerate(state.grads or []) if g is not None]
        state.stats_owners = {"activation": list(acts), "grad": grads_of,
                              "weight": self.param_layer if present else []}
        # A container's output is often its last child's very tensor: measure it once.
        unique: dict[int, int] = {}
        state.act_rows = [unique.setdefault(id(t), len(unique)) for t in acts.values()]
        act_tensors = list({id(t): t for t in acts.values()}.values())
        tensors = act_tensors + present + (self.params if present else [])
        if not tensors:
            return
        scaled = None
        if state.scale_used is not None:
            scaled = (len(act_tensors), len(act_tensors) + len(present), state.scale_used)
        if self.on_host:  # the rest is computed on the writer thread
            state.stats = HostSample.take(tensors, scaled, cache=self.views,
                                          stable_from=len(act_tensors) + len(present),
                                          offset=state.index)
        else:
            state.stats = tensor_stats_device(tensors, scaled, offset=state.index)

    def nonfinite_params(self, state: StepState) -> list[int]:
        """Indices of the parameters whose gradient holds inf/nan (run on bad steps only)."""
        grads = state.grads or []
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return []
        # Element-wise, not a norm: the norm of finite fp16 values can itself overflow.
        flags = torch.stack([(~torch.isfinite(grads[i])).any() for i in present])
        return [present[k] for k in flags.nonzero().flatten().tolist()]
