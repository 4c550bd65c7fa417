"""``mpviz.estimate``: what a precision policy would cost per training step on a named GPU."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from mpviz import compat
from mpviz.cost.counting import Forward, count
from mpviz.cost.gpus import Device, get_device
from mpviz.cost.pricing import Estimate, _check_optimizer, cost_precision, predict
from mpviz.precision import PrecisionPolicy, resolve_policy

__all__ = ["estimate", "layer_precisions"]


def layer_precisions(model: nn.Module, policy: str | Mapping[str, str] | PrecisionPolicy | None
                     ) -> str | dict[str, str]:
    """The cost precision of each layer of ``model`` under ``policy``, decided the way
    :func:`mpviz.apply_policy` decides it (``resolve_policy``); a plain name is one for all.

    Besides mpviz's precisions, a policy may say ``"tf32"`` (fp32 with tensor-core matmuls) and
    ``"fp8"``. A layer no rule reaches runs in fp32.
    """
    if policy is None or isinstance(policy, str):
        return cost_precision(policy or "fp32")
    rules = policy.rules if isinstance(policy, PrecisionPolicy) else dict(policy)
    wanted = {pattern: cost_precision(p) for pattern, p in rules.items()}
    # tf32 is no name of mpviz's policies (nor is a bare "fp8"): resolve with stand-ins, then
    # read each layer's precision back from the rule that decided it.
    stand_in = {pattern: {"tf32": "fp32", "fp8": "fp8_e4m3"}.get(p, p) for pattern, p in wanted.items()}
    resolved = resolve_policy(model, PrecisionPolicy(stand_in))
    return {name: wanted[d.rule] if d.rule is not None else "fp32" for name, d in resolved.decisions.items()}


def estimate(model: nn.Module, batch: Any, policy: str | Mapping[str, str] | PrecisionPolicy | None = None,
             device: str | Device = "h100", optimizer: str | None = "adamw",
             forward: Forward | None = None) -> Estimate:
    """Predict the time and memory of one training step of ``model`` on ``batch`` on a GPU.

    The step's FLOPs and bytes are counted on a real forward and backward of the batch, per
    module (:mod:`mpviz.cost.counting`; the meta device works: no weights needed), and priced for
    ``policy`` on ``device`` (:mod:`mpviz.cost.pricing`): each kernel takes the longest of its
    FLOPs at the datasheet peak, its bytes at the memory bandwidth and a floor per kernel,
    with autocast's and fp8's casts, plus the optimizer step.

    ``policy``: None (fp32), a precision for the whole model (``"bf16"``, ``"fp16"``, ``"fp8"``,
    ``"tf32"``), or per-layer rules as :class:`mpviz.PrecisionPolicy` takes them. ``device``: a
    name from :func:`mpviz.devices`. ``optimizer``: ``"adamw"`` (torch's default, foreach),
    ``"adamw_fused"``, ``"adam"``, ``"sgd"``, ``"sgd_momentum"`` or None. Batches are taken as by
    :func:`mpviz.memory_report`: ``(x, y)``, a dict of keyword arguments, the one input, or
    anything ``forward(model, batch)`` handles.

    It is an estimate from datasheet figures, not a measurement: see ``est.layers`` for where the
    time goes and what bounds it. The model is left as it was (no ``.grad``, buffers, RNG).

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 4096))
        >>> batch = (torch.randn(8192, 4096, device="meta"), torch.randn(8192, 4096, device="meta"))
        >>> fp32 = estimate(model.to("meta"), batch, device="h100")
        >>> bf16 = estimate(model, batch, policy="bf16", device="h100")
        >>> fp32.step_time_s > 5 * bf16.step_time_s, bf16.fits
        (True, True)
        >>> bf16.layers[["layer", "precision", "bound"]].values.tolist()[1:3]
        [['0', 'bf16', 'compute'], ['1', 'bf16', 'memory']]
    """
    dev = get_device(device)  # a bad device, optimizer or rule fails before any work is done
    _check_optimizer(optimizer)
    model = compat.user_module(model)
    precisions = layer_precisions(model, policy)
    return predict(count(model, batch, forward), precisions, dev, optimizer)
