"""The rule language: ``{layer name or glob: precision}`` policies (:class:`PrecisionPolicy`),
checked against a model's names (behind any ``torch.compile`` wrapper)."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping

from torch import nn

from mpviz.compat import named_modules, user_module
# The precision names and their aliases (torch dtype names, Keras policy names) are in formats.
from mpviz.formats import PRECISIONS, canonical, did_you_mean
from mpviz.precision.numerics import check_supported

__all__ = ["PRECISIONS", "canonical", "PrecisionPolicy", "validate_rules"]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _is_catch_all(pattern: str) -> bool:
    return pattern != "" and set(pattern) == {"*"}


def _literal_chars(pattern: str) -> int:
    """Characters of a glob that are not wildcards (a ``[...]`` class counts as none)."""
    n, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            end = pattern.find("]", i + 2)
            if end != -1:
                i = end + 1
                continue
        if c not in "*?":
            n += 1
        i += 1
    return n


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) if _is_glob(pattern) else name == pattern


class PrecisionPolicy:
    """Rules ``{layer name or glob: precision}`` saying which layer runs in which precision.

    Matching (globs are ``fnmatch`` patterns on ``model.named_modules()`` names; the root is ``""``):

    - A rule applies to the module it matches and everything inside it, unless something inside
      is matched by a rule itself.
    - When several rules match one module, the most specific wins: an exact name beats any
      glob; among globs, the one with more literal (non-wildcard) characters wins; on a tie,
      the rule written later in the dict wins.
    - A pattern made only of ``*`` (e.g. ``"*"``) is the *default*: it sets the whole model's
      precision (the root), so ``{"*": "fp16", "encoder.layers.0": "fp32"}`` runs all of layer 0,
      children included, in fp32. Every other glob applies to each module it matches.
    - "Inside" is where a module runs: a module shared by several parents (registered under
      several names, listed once under its first) matches a rule through any of its names;
      without a rule of its own it runs in the precision of whichever parent calls it.
      Children of a ``ModuleList`` / ``ModuleDict`` follow the list's rule.

    A plain string is the same as ``{"*": string}`` (Keras style):

    >>> PrecisionPolicy("mixed_float16").rules
    {'*': 'fp16'}
    >>> PrecisionPolicy({"*": "float16", "head": "bfloat16"}).rules
    {'*': 'fp16', 'head': 'bf16'}
    """

    def __init__(self, rules: Mapping[str, str] | str | None = None) -> None:
        if rules is None:
            rules = {}
        elif isinstance(rules, str):
            rules = {"*": rules}
        elif isinstance(rules, PrecisionPolicy):
            rules = rules.rules
        if not isinstance(rules, Mapping):
            raise TypeError(
                f"PrecisionPolicy takes a dict {{layer name or glob: precision}}, got {type(rules).__name__}."
            )
        self._rules: dict[str, str] = {}
        for pattern, precision in rules.items():
            if not isinstance(pattern, str):
                raise TypeError(f"Layer patterns must be strings, got {pattern!r}.")
            if precision is None:
                raise ValueError(
                    f"Rule {pattern!r} has precision None; leave the rule out instead "
                    "(PolicyHandle.update({pattern: None}) removes a rule from a live policy)."
                )
            self._rules[pattern] = canonical(precision)

    @property
    def rules(self) -> dict[str, str]:
        """A copy of the rules, precisions in canonical names, in the order given."""
        return dict(self._rules)

    def merged(self, changes: Mapping[str, str | None]) -> "PrecisionPolicy":
        """A new policy with ``changes`` applied: a precision sets a rule, ``None`` removes it.

        >>> PrecisionPolicy({"*": "fp16"}).merged({"head": "fp32", "*": None}).rules
        {'head': 'fp32'}
        """
        rules = dict(self._rules)
        for pattern, precision in changes.items():
            if precision is None:
                if pattern not in rules:
                    raise ValueError(
                        f"Cannot remove rule {pattern!r}: the policy has no such rule. "
                        f"Its rules are: {list(rules) or 'none'}."
                    )
                del rules[pattern]
            else:
                rules[pattern] = canonical(precision)  # an existing rule keeps its place
        return PrecisionPolicy(rules)

    def precisions(self) -> set[str]:
        return set(self._rules.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrecisionPolicy) and list(self._rules.items()) == list(other._rules.items())

    def __repr__(self) -> str:
        return f"PrecisionPolicy({self._rules!r})"


def _as_policy(policy: PrecisionPolicy | Mapping[str, str] | str | None) -> PrecisionPolicy:
    return policy if isinstance(policy, PrecisionPolicy) else PrecisionPolicy(policy)


def _no_match_error(pattern: str, all_names: list[str], model: nn.Module) -> ValueError:
    shown = [n for n in all_names if n]  # the root "" is no help as a suggestion
    close = did_you_mean(pattern, shown, n=5, cutoff=0.5)
    hint = f" {close[0].upper()}{close[1:]}." if close else ""  # "close matches: ..." starts a sentence
    what = "matches no layer" if _is_glob(pattern) else "is not a layer name"
    few = ", ".join(repr(n) for n in shown[:8]) + (", ..." if len(shown) > 8 else "")
    return ValueError(
        f"Policy rule {pattern!r} {what} of {type(user_module(model)).__name__}.{hint} "
        f"Names are those of model.named_modules(), behind any torch.compile wrapper (e.g. {few}); "
        "globs like 'blocks.*.attn' match several, '*' sets the default."
    )


def validate_rules(model: nn.Module, rules: Iterable[str], device_type: str | None = None,
                   precisions: Iterable[str] = ()) -> None:
    """Raise ValueError for a rule that matches no layer, or a precision the device cannot run."""
    all_names = [n for n, _ in named_modules(model, remove_duplicate=False)]
    for pattern in rules:
        if _is_catch_all(pattern):
            continue
        if not any(_matches(pattern, n) for n in all_names):
            raise _no_match_error(pattern, all_names, model)
    if device_type is not None:
        for precision in precisions:
            check_supported(precision, device_type)
