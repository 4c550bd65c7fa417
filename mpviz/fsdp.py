"""From an mpviz precision policy to FSDP2: ``fully_shard`` calls whose ``MixedPrecisionPolicy``
keeps the policy's fp32 layers in fp32.

FSDP2 (``torch.distributed.fsdp.fully_shard``) decides precision per *unit*, not per op:
each unit all-gathers its parameters in its ``param_dtype`` and computes in it, with no
autocast. So a layer the policy keeps in fp32 (``mpviz.advise(run)`` names them) becomes a unit
of its own with ``param_dtype=float32``: its inputs are cast to fp32 as it starts and its
outputs back to the precision of the unit around it (``output_dtype``), so the code after it
computes as before. Everything else keeps the job's low precision: each repeated block is a
unit (or the ones you name in ``units``), and the root gets ``fully_shard`` last.

This is how advice reaches a sharded job, at its next (re)start::

    policy = mpviz.advise("runs/exp1", target="bf16")   # {'*': 'bf16', 'blocks.3.ln': 'fp32'}
    mpviz.fsdp.shard(model, policy)                     # instead of your fully_shard calls
    optimizer = torch.optim.AdamW(model.parameters())

Limits (each refused with an error naming the fix): emulated fp8 (FSDP casts parameters to a
torch dtype; use ``mpviz.apply_policy`` or real fp8 training), a rule on a module whose forward
never runs (``ModuleList``, ``ParameterList``: name its children), and tied parameters whose
layers would need different dtypes (FSDP all-gathers a parameter once, in one dtype). A layer
whose parameters its parent reads directly, without calling it, cannot be a unit of its own
(FSDP gathers a unit's parameters when the unit is called); such models fail in their first
forward with FSDP's own error.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .formats import FP8_PRECISIONS, did_you_mean, dtype_name
from .precision.resolve import resolve_policy
from .precision.rules import PrecisionPolicy
from .precision.numerics import torch_dtype

__all__ = ["Unit", "shard_plan", "shard"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


@dataclass
class Unit:
    """One ``fully_shard`` call: the modules it groups (by name; several only for tied
    parameters) and its mixed-precision settings, as plain dtypes."""

    modules: tuple[str, ...]
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype | None
    output_dtype: torch.dtype | None = None
    why: str = ""  # "root", "block", "unit you named", or the policy rule that made it
    rule: str | None = field(default=None, repr=False)

    def mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                                    output_dtype=self.output_dtype)

    def __str__(self) -> str:
        names = ", ".join(n or "(model)" for n in self.modules)
        out = f" -> {dtype_name(self.output_dtype)}" if self.output_dtype is not None else ""
        return (f"{names}: {dtype_name(self.param_dtype)}{out}, reduce "
                f"{dtype_name(self.reduce_dtype)} ({self.why})")


def shard_plan(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str | None = None,
               units: Sequence[str] | None = None, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32,
               cast_outputs: bool = True) -> list[Unit]:
    """The units :func:`shard` would make, in the order it calls ``fully_shard`` (innermost
    first, the root last). Needs no process group; arguments as :func:`shard`.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> for u in shard_plan(model, {"*": "bf16", "1": "fp32"}): print(u)
        0: bfloat16, reduce float32 (block)
        1: float32 -> bfloat16, reduce float32 (policy rule '1')
        2: bfloat16, reduce float32 (block)
        (model): bfloat16, reduce float32 (root)
    """
    resolved = resolve_policy(model, policy)
    default = _default_dtype(PrecisionPolicy(policy) if not isinstance(policy, PrecisionPolicy)
                             else policy, param_dtype)
    mods = resolved.modules
    index = {n: i for i, n in enumerate(resolved.names)}
    dtype = _module_dtypes(resolved, default)
    chosen, rules = _rule_units(resolved, dtype)
    # The other units: those named, or the repeated blocks.
    for n in (_named_units(model, units, mods) if units is not None else _blocks(mods)):
        chosen.setdefault(n, "unit you named" if units is not None else "block")
    chosen.pop("", None)

    plan = []
    for group in _tied_groups(sorted(chosen, key=index.__getitem__), mods, dtype):
        first = group[0]
        dt = dtype[first]
        outer = dtype[_enclosing(first, chosen)]  # its output goes back to that unit's dtype
        by_rule = first in rules
        plan.append(Unit(
            modules=tuple(group), param_dtype=dt,
            reduce_dtype=_reduce(dt, reduce_dtype),
            output_dtype=outer if (by_rule and cast_outputs and outer != dt) else None,
            why=chosen[first], rule=rules.get(first)))
    # fully_shard goes bottom-up: deeper modules first, then in model order.
    plan.sort(key=lambda u: (-max(n.count(".") for n in u.modules), index[u.modules[0]]))
    plan.append(Unit(modules=("",), param_dtype=dtype[""],
                     reduce_dtype=_reduce(dtype[""], reduce_dtype),
                     why="root"))
    return plan


def shard(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str | None = None,
          mesh: Any = None, units: Sequence[str] | None = None,
          param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
          cast_outputs: bool = True, **fully_shard_kwargs: Any) -> list[Unit]:
    """Shard ``model`` with FSDP2, one ``fully_shard`` per unit, so that the layers ``policy``
    keeps in fp32 compute in fp32 and the rest in the job's low precision. Returns the units
    (:func:`shard_plan`); the model is sharded in place, as ``fully_shard`` does.

    - ``policy``: a :class:`mpviz.PrecisionPolicy` (``mpviz.advise(run)`` returns one), a dict
      ``{layer or glob: precision}`` or a precision name. Each layer with a rule of its own in
      another precision than the layers around it becomes a unit of that ``param_dtype``, its
      outputs cast back to the enclosing unit's (``cast_outputs=False``: left as computed, for
      code that takes either, e.g. under ``torch.autocast``).
    - ``units``: names or globs of the modules that are units (``["layers.*"]``); default: the
      model's repeated blocks (the children of a ``ModuleList``/``Sequential`` that share a
      class and hold parameters, outermost only).
    - ``param_dtype``: the dtype of every layer without a rule of its own; default: the policy's
      default rule (``"*"``), else bfloat16. Given, it replaces the policy's default rule.
    - ``reduce_dtype``: the dtype gradients are reduce-scattered in (fp32 units always in fp32).
    - ``mesh`` and ``fully_shard_kwargs`` (``reshard_after_forward``, ``offload_policy``, ...)
      go to every ``fully_shard`` call.

        >>> mpviz.fsdp.shard(model, mpviz.advise(run, target="bf16"))   # doctest: +SKIP
        >>> optimizer = torch.optim.AdamW(model.parameters())          # doctest: +SKIP
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if "mp_policy" in fully_shard_kwargs:
        raise TypeError("shard() makes each unit's mp_policy from the policy: pass param_dtype, "
                        "reduce_dtype and cast_outputs instead of mp_policy")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("this model is sharded already (fully_shard was called on it or on a "
                         "child): shard() makes every fully_shard call itself; start from the "
                         "unsharded model")
    plan = shard_plan(model, policy, units, param_dtype, reduce_dtype, cast_outputs)
    mods = dict(model.named_modules())
    for unit in plan:
        targets = [mods[n] for n in unit.modules]
        fully_shard(targets if len(targets) > 1 else targets[0], mesh=mesh,
                    mp_policy=unit.mp_policy(), **fully_shard_kwargs)
    return plan


def _own_dtype(resolved: Any, name: str) -> torch.dtype | None:
    """The dtype a rule of this module's own sets (the default rule '*' excepted)."""
    d = resolved.decisions[name]
    if d.inherited or d.rule is None or _catch_all(d.rule):
        return None
    if d.precision in FP8_PRECISIONS:
        raise ValueError(
            f"policy rule {d.rule!r} asks for {d.precision} on {name or '(model)'!r}: FSDP's "
            "MixedPrecisionPolicy casts parameters to a torch dtype and mpviz's fp8 is "
            "emulated per op. Use fp32, bf16 or fp16 here (mpviz.apply_policy emulates fp8 "
            "without FSDP).")
    return torch_dtype(d.precision)


def _module_dtypes(resolved: Any, default: torch.dtype) -> dict[str, torch.dtype]:
    """Each module's dtype: its own rule's, else its parent's (the root: the default)."""
    dtype: dict[str, torch.dtype] = {}
    for name in resolved.names:
        parent = name.rpartition(".")[0] if name else None
        dtype[name] = _own_dtype(resolved, name) or (
            dtype[parent] if parent is not None else default)
    return dtype


def _rule_units(resolved: Any, dtype: dict[str, torch.dtype]
                ) -> tuple[dict[str, str], dict[str, str]]:
    """The units a rule makes, each module whose own rule differs from the dtype around it:
    ({name: why}, {name: its rule})."""
    chosen: dict[str, str] = {}
    rules: dict[str, str] = {}
    for name in resolved.names:
        if not name or _own_dtype(resolved, name) is None:
            continue
        parent = name.rpartition(".")[0]
        if dtype[name] == dtype[parent]:
            continue  # runs in the precision around it anyway
        rule = resolved.decisions[name].rule
        for n in _callable_under(name, resolved.modules, f"policy rule {rule!r}"):
            chosen.setdefault(n, f"policy rule {rule!r}")
            rules[n] = rule
    return chosen, rules


def _enclosing(name: str, chosen: Mapping[str, str]) -> str:
    """The unit around this one ("" for the root)."""
    while name:
        name = name.rpartition(".")[0]
        if name in chosen or not name:
            return name
    return ""


def _catch_all(pattern: str) -> bool:
    return pattern != "" and set(pattern) == {"*"}


def _default_dtype(policy: PrecisionPolicy, param_dtype: torch.dtype | None) -> torch.dtype:
    if param_dtype is not None:
        return param_dtype
    for pattern, precision in policy.rules.items():
        if _catch_all(pattern):
            if precision in FP8_PRECISIONS:
                raise ValueError(f"the policy's default rule {pattern!r} is {precision}: FSDP "
                                 "computes in a torch dtype; pass param_dtype=torch.bfloat16 "
                                 "(or fp16/fp32)")
            return torch_dtype(precision)
    return torch.bfloat16


def _reduce(dt: torch.dtype, reduce_dtype: torch.dtype | None) -> torch.dtype | None:
    """fp32 units reduce in fp32: the policy keeps their gradients' precision too."""
    return torch.float32 if dt == torch.float32 else reduce_dtype


def _is_callable(mod: nn.Module) -> bool:
    return type(mod).forward is not nn.Module.forward  # ModuleList & co. keep the stub


def _callable_under(name: str, mods: dict[str, nn.Module], what: str) -> list[str]:
    """``name`` if its forward runs, else its callable children (a ModuleList's blocks)."""
    mod = mods[name]
    if _is_callable(mod):
        return [name]
    if any(True for _ in mod.parameters(recurse=False)):
        raise ValueError(
            f"{what} names {name!r}, a {type(mod).__name__} that holds parameters but whose "
            "forward never runs: FSDP casts a unit's parameters when the unit is called. Put "
            "the rule on the module that uses them.")
    out = []
    for child, _ in mod.named_children():
        out += _callable_under(f"{name}.{child}" if name else child, mods, what)
    return out


def _named_units(model: nn.Module, units: Sequence[str], mods: dict[str, nn.Module]) -> list[str]:
    if isinstance(units, str):
        units = [units]
    out: list[str] = []
    for pattern in units:
        hits = [n for n in mods if n and (fnmatch.fnmatchcase(n, pattern) if any(
            c in pattern for c in "*?[") else n == pattern)]
        if not hits:
            close = did_you_mean(pattern, list(mods), n=5, cutoff=0.5)
            raise ValueError(f"units: {pattern!r} is no module of {type(model).__name__}"
                             f"{'; ' + close if close else ''} (names of model.named_modules(); "
                             "globs like 'layers.*' name several)")
        for n in hits:
            if not _is_callable(mods[n]):
                raise ValueError(f"units: {n!r} is a {type(mods[n]).__name__}, whose forward "
                                 f"never runs, so FSDP's hooks would not either: name its "
                                 f"children ('{n}.*')")
            out.append(n)
    return out


def _blocks(mods: dict[str, nn.Module]) -> list[str]:
    """The repeated blocks: children of a container that share a class and hold parameters
    (outermost containers only)."""
    out: list[str] = []
    for name, mod in mods.items():
        if not isinstance(mod, _CONTAINERS) or any(name.startswith(b + ".") for b in out):
            continue
        by_class: dict[type, list[str]] = {}
        for child, m in mod.named_children():
            if _is_callable(m) and any(True for _ in m.parameters()):
                by_class.setdefault(type(m), []).append(f"{name}.{child}" if name else child)
        for group in by_class.values():
            if len(group) >= 2:
                out += group
    return out


def _tied_groups(chosen: list[str], mods: dict[str, nn.Module],
                 dtype: dict[str, torch.dtype]) -> list[list[str]]:
    """The units, with those sharing a parameter (tied weights) grouped into one; a parameter
    shared between a unit and modules outside every unit, or between units of different
    dtypes, is refused with the fix."""
    parent = {n: n for n in chosen}  # union-find over the units

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    owner: dict[int, tuple[str, str]] = {}  # parameter -> (its innermost unit, a module)
    for name, mod in mods.items():
        unit = _innermost(name, chosen)
        for p in mod.parameters(recurse=False):
            prev, other = owner.setdefault(id(p), (unit, name))
            if prev == unit or (prev and unit and find(prev) == find(unit)):
                continue
            a, b = sorted((prev, unit))
            if not a or b.startswith(a + "."):
                raise ValueError(
                    f"{other!r} and {name!r} share a parameter (tied weights) but are not in the "
                    "same unit (nor both units of their own): FSDP all-gathers a parameter in "
                    f"one unit only. Make each a unit (units=[..., {other!r}, {name!r}], or the "
                    "same policy rule on both), or untie them.")
            if dtype[a] != dtype[b]:
                raise ValueError(
                    f"{a!r} ({dtype_name(dtype[a])}) and {b!r} ({dtype_name(dtype[b])}) share a "
                    "parameter (tied weights), and FSDP all-gathers a parameter once, in one "
                    f"dtype: give both the same precision (e.g. {{{a!r}: 'fp32', {b!r}: "
                    "'fp32'}) or untie them.")
            parent[find(b)] = find(a)
    groups: dict[str, list[str]] = {}
    for n in chosen:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


def _innermost(name: str, chosen: list[str]) -> str:
    best = ""
    for u in chosen:
        if (name == u or name.startswith(u + ".")) and len(u) > len(best):
            best = u
    return best
