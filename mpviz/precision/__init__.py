"""Per-layer precision: run chosen layers in fp32, fp16, bf16 or emulated fp8, and change it live.

A :class:`PrecisionPolicy` maps layer names (``fnmatch`` globs on ``model.named_modules()``
names) to precisions; :func:`apply_policy` hooks the few modules that need it and returns a
:class:`PolicyHandle` (``update`` between steps, ``remove``).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> with apply_policy(model, {"*": "bf16", "1": "fp32"}, device_type="cpu") as handle:
    ...     with torch.autocast("cpu", dtype=torch.float16):  # works without it too
    ...         out = model(torch.randn(3, 4))
    >>> out.dtype  # the last Linear ran in bf16 (the policy), not fp16 (the outer autocast)
    torch.bfloat16

What a precision means for a layer and everything inside it:

- ``fp32``: autocast off, floating inputs below 32 bits cast to fp32.
- ``fp16`` / ``bf16``: ``torch.autocast(device_type, dtype=...)``; outside any autocast its
  floating outputs go back to fp32 as they leave it (containers keep their type).
- ``fp8_e4m3`` / ``fp8_e5m2``: emulated, to show fp8 numerics (it is slower than fp32):
  inputs and the layer's own weights saturated and rounded through the fp8 dtype, computed in
  fp32, gradients passed straight through. Master weights stay fp32 and are never written.

Under ``torch.compile`` names are the user's own (``_orig_mod.`` looked through), the policy
is traced into the graph without breaks, and each ``update()`` recompiles at most once
(dynamo keeps ``torch._dynamo.config.recompile_limit`` versions, then runs eagerly). An
``nn.Sequential`` compiled while a policy is on runs eagerly after ``remove()``: compile it again.
"""
from __future__ import annotations
from mpviz.precision.handle import Change, PolicyHandle, apply_policy, explain_policy
from mpviz.precision.numerics import check_supported, round_fp8, supported_precisions, torch_dtype
from mpviz.precision.resolve import Decision, resolve_policy
from mpviz.precision.rules import PRECISIONS, PrecisionPolicy, canonical, validate_rules

__all__ = [
    "PRECISIONS",
    "canonical",
    "torch_dtype",
    "supported_precisions",
    "check_supported",
    "round_fp8",
    "PrecisionPolicy",
    "validate_rules",
    "Decision",
    "resolve_policy",
    "PolicyHandle",
    "apply_policy",
    "explain_policy",
]
