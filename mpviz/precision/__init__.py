"""Per-layer precision: run chosen layers in fp32, fp16, bf16 or emulated fp8, and change it live.

PyTorch's autocast is all-or-nothing per region. A :class:`PrecisionPolicy` maps layer names
(``fnmatch`` globs on ``model.named_modules()`` names) to precisions; :func:`apply_policy`
puts forward pre-hooks and forward hooks on the few modules that need them and returns a
:class:`PolicyHandle` to change rules between steps (``update``) or take everything off
(``remove``).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> with apply_policy(model, {"*": "bf16", "1": "fp32"}, device_type="cpu") as handle:
    ...     with torch.autocast("cpu", dtype=torch.float16):  # works without it too
    ...         out = model(torch.randn(3, 4))
    >>> out.dtype  # the last Linear ran in bf16 (the policy), not fp16 (the outer autocast)
    torch.bfloat16

What each precision means for a layer (and everything inside it):

- ``fp32``: autocast disabled and floating inputs below 32 bits cast to fp32, also inside an
  outer ``torch.autocast``.
- ``fp16`` / ``bf16``: the layer runs under ``torch.autocast(device_type, dtype=...)``, so
  autocast's own op lists decide which ops go low-precision (matmuls and convolutions do).
  Outside any autocast (no outer ``torch.autocast``, or inside an fp32 layer) its floating
  outputs are cast back to fp32 as they leave it, after all other forward hooks ran, so the
  fp32 code around it keeps working; under autocast they are left as computed. The cast walks
  outputs with :mod:`mpviz.tree`: tuples, namedtuples, dicts, dataclasses and Hugging Face
  ``ModelOutput`` s keep their type (``out.logits`` still works).
- ``fp8_e4m3`` / ``fp8_e5m2``: *emulated*. Autocast is disabled; floating inputs and the
  layer's own parameters are saturated to the format's largest finite value (448 for e4m3,
  57344 for e5m2), rounded through ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` and computed
  in fp32. Gradients pass straight through the rounding. This shows fp8 *numerics*, not fp8
  speed: it is slower than fp32.

Master weights stay fp32 and are never written: the fp8 weight is a rounded copy used for that
forward only.

Under ``torch.compile`` (``torch.compile(model)``, ``model.compile()``, blocks compiled one by
one, a compiled function that calls the model; the policy applied before or after compiling):

- Names are the user's own: compile wrappers and their ``_orig_mod.`` are looked through
  (:func:`mpviz.compat.named_modules`), in rules, errors and :func:`explain_policy`.
- A hooked layer's ``forward`` is wrapped (an instance attribute) so that its autocast is one
  ``with`` block, which dynamo traces into the graph: no graph break, emulated fp8 included;
  the model compiles into as many graphs as without the policy.
- ``update()`` is applied at the start of the next forward, as in eager mode; compiled, while
  dynamo traces that forward (the compiled code guards on the policy in force and on the
  wrappers): at most one recompile per update, one graph with its backward (a policy in force
  before is reused when the update was applied eagerly, e.g. by the recorder's steering, or
  when the root's hooks run outside the compiled forward); ``remove()`` one more. Blocks
  compiled one by one keep sharing their compiled code.
- Costs: ``torch.compile(model)`` runs the root's own hooks outside the model's compiled
  forward, as small functions of their own: a root in fp8, or in fp16/bf16 without an outer
  autocast, adds one small graph (its input or output cast). Dynamo keeps at most
  ``torch._dynamo.config.recompile_limit`` (8) compiled versions of one function and then runs
  it eagerly (torch warns): a policy changed more often than that on one compiled model needs a
  higher limit. An ``nn.Sequential`` (a model whose own forward is torch's) handed to
  ``torch.compile`` while a policy is on runs eagerly after ``remove()``: torch.compile chose how
  to run it when it was made; compile it again.

Where things are: ``rules.py`` (:class:`PrecisionPolicy`, checking rules against a model),
``resolve.py`` (the precision each layer gets and where hooks go), ``numerics.py`` (each
precision's torch dtype, what the device can run, fp8 rounding), ``handle.py`` (the hooks:
:class:`PolicyHandle`, :func:`apply_policy`, :func:`explain_policy`). The precision names and
their aliases are :mod:`mpviz.formats`'s (no torch there: the dashboards read it).
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
