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
    """Resolve ``policy`` on ``model``: the Decision for every layer, and which layers need hooks.

    Raises ValueError (with close matches) for a rule that matches no layer.
    """
    policy = _as_policy(policy)
    rules = policy.rules
    validate_rules(model, rules)
    order = {p: i for i, p in enumerate(rules)}

    names_of: dict[int, list[str]] = {}
    for name, mod in named_modules(model, remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)

    def own_rule(mod_names: list[str], is_root: bool) -> str | None:
        best, best_key = None, None
        for pattern in rules:
            if _is_catch_all(pattern):
                # The default: root only, and below every other rule matching the root.
                hit, key = is_root, (-1, -1, order[pattern])
            else:
                hit = any(_matches(pattern, n) for n in mod_names)
                key = (0 if _is_glob(pattern) else 1, _literal_chars(pattern), order[pattern])
            if hit and (best_key is None or key > best_key):
                best, best_key = pattern, key
        return best

    names: list[str] = []
    modules: dict[str, nn.Module] = {}
    decisions: dict[str, Decision] = {}
    hooked: list[str] = []
    # The precision in force while a module's children run. A container that is iterated, not
    # called (ModuleList, ModuleDict), never runs its hooks: its children run in the context
    # of whoever iterates it, so they are compared with that instead.
    context: dict[str, str | None] = {}
    for name, mod in named_modules(model):  # pre-order: a parent comes before its children
        names.append(name)
        modules[name] = mod
        all_names = names_of[id(mod)]
        rule = own_rule(all_names, is_root=(name == ""))
        parent = decisions.get(name.rpartition(".")[0]) if name else None
        if rule is not None:
            decisions[name] = Decision(rules[rule], rule, inherited=False)
        elif parent is not None and parent.precision is not None:
            decisions[name] = Decision(parent.precision, parent.rule, inherited=True)
        else:
            decisions[name] = Decision(None, None, inherited=False)
        precision = decisions[name].precision
        parent_precision = context[name.rpartition(".")[0]] if name else None
        context[name] = precision if _is_callable(mod) else parent_precision
        if not name:
            continue  # the root always carries the handle's own hooks
        # Hooks only where something changes: a child running in its parent's precision gets
        # it from the parent's autocast state. A shared module with its own rule is hooked
        # because it may also be called from a parent with another precision. Emulated fp8
        # rounds each layer's own inputs and weights, so every leaf and every module owning
        # parameters in fp8 scope is hooked.
        needs = (
            precision != parent_precision
            or (rule is not None and len(all_names) > 1)
            or (precision in FP8_PRECISIONS
                and (next(iter(mod.children()), None) is None
                     or any(p is not None for p in mod._parameters.values())))
        )
        if needs and precision is not None and _is_callable(mod):
            hooked.append(name)
    return _Resolved(names, modules, decisions, hooked)


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
