"""A policy resolved against one model: the precision each layer runs in, and where hooks go."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from torch import nn

from mpviz.compat import named_modules
from mpviz.formats import FP8_PRECISIONS
from mpviz.precision.rules import (
    PrecisionPolicy, _as_policy, _is_catch_all, _is_glob, _literal_chars, _matches, validate_rules,
)

if TYPE_CHECKING:  # pandas is imported only by explain_policy
    import pandas as pd

__all__ = ["Decision", "resolve_policy"]


@dataclass(frozen=True)
class Decision:
    """The precision in force for one layer and the rule that decided it."""

    precision: str | None  # None: no rule reaches this layer; it runs as the caller's autocast says
    rule: str | None
    inherited: bool  # True when the rule matched an enclosing module, not this one


@dataclass
class _Resolved:
    """A policy resolved against one model: one Decision per layer and where hooks go."""

    names: list[str]  # named_modules() order, shared modules once (first name)
    modules: dict[str, nn.Module]
    decisions: dict[str, Decision]
    hooked: list[str]  # non-root layers that need a hook pair


def resolve_policy(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str | None) -> _Resolved:
    """The Decision for every layer of ``model``, and which layers need hooks.

    Raises ValueError (with close matches) for a rule that matches no layer.
    """
    rules = _as_policy(policy).rules
    validate_rules(model, rules)
    names_of: dict[int, list[str]] = {}
    for name, mod in named_modules(model, remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)
    out = _Resolved([], {}, {}, [])
    # The precision in force while a module's children run. A container that is iterated, not
    # called (ModuleList, ModuleDict), never runs its hooks: its children run in the context
    # of whoever iterates it.
    context: dict[str, str | None] = {}
    for name, mod in named_modules(model):  # pre-order: a parent comes before its children
        parent = name.rpartition(".")[0]
        rule = _own_rule(rules, names_of[id(mod)], is_root=not name)
        decision = _decide(rules, rule, out.decisions[parent] if name else None)
        out.names.append(name)
        out.modules[name] = mod
        out.decisions[name] = decision
        outer = context[parent] if name else None
        context[name] = decision.precision if _is_callable(mod) else outer
        shared_rule = rule is not None and len(names_of[id(mod)]) > 1
        if name and _needs_hooks(mod, decision.precision, outer, shared_rule):  # the root: the handle's own
            out.hooked.append(name)
    return out


def _own_rule(rules: Mapping[str, str], names: list[str], is_root: bool) -> str | None:
    """The most specific rule matching one of a module's names (see PrecisionPolicy)."""
    best, best_key = None, None
    for i, pattern in enumerate(rules):
        if _is_catch_all(pattern):
            # The default: root only, and below every other rule matching the root.
            hit, key = is_root, (-1, -1, i)
        else:
            hit = any(_matches(pattern, n) for n in names)
            key = (0 if _is_glob(pattern) else 1, _literal_chars(pattern), i)
        if hit and (best_key is None or key > best_key):
            best, best_key = pattern, key
    return best


def _decide(rules: Mapping[str, str], rule: str | None, parent: Decision | None) -> Decision:
    if rule is not None:
        return Decision(rules[rule], rule, inherited=False)
    if parent is not None and parent.precision is not None:
        return Decision(parent.precision, parent.rule, inherited=True)
    return Decision(None, None, inherited=False)


def _needs_hooks(mod: nn.Module, precision: str | None, outer: str | None, shared_rule: bool) -> bool:
    """Hooks only where something changes: a child running in its parent's precision gets it
    from the parent's autocast. A shared module with its own rule may also be called from a
    parent in another precision. Emulated fp8 rounds each layer's own inputs and weights, so
    every leaf and every module owning parameters in fp8 scope is hooked."""
    if precision is None or not _is_callable(mod):
        return False
    return (precision != outer or shared_rule
            or (precision in FP8_PRECISIONS
                and (next(iter(mod.children()), None) is None
                     or any(p is not None for p in mod._parameters.values()))))


def _is_callable(mod: nn.Module) -> bool:
    return type(mod).forward is not nn.Module.forward  # ModuleList & co. keep the stub


def _explain_frame(resolved: _Resolved) -> "pd.DataFrame":
    import pandas as pd

    rows = [
        {
            "layer": name,
            "type": type(resolved.modules[name]).__name__,
            "precision": d.precision,
            "rule": d.rule,
            "inherited": d.inherited,
        }
        for name, d in resolved.decisions.items()
    ]
    return pd.DataFrame(rows, columns=["layer", "type", "precision", "rule", "inherited"])
