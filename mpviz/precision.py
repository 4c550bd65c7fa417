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
  fp32 code around it keeps working; under autocast they are left as computed.
- ``fp8_e4m3`` / ``fp8_e5m2``: *emulated*. Autocast is disabled; floating inputs and the
  layer's own parameters are saturated to the format's largest finite value (448 for e4m3,
  57344 for e5m2), rounded through ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` and computed
  in fp32. Gradients pass straight through the rounding. This shows fp8 *numerics*, not fp8
  speed: it is slower than fp32.

Master weights stay fp32 and are never written: the fp8 weight is a rounded copy used for that
forward only.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import nn

from mpviz.compat import autocast_state

if TYPE_CHECKING:  # pandas is imported only by explain_policy
    import pandas as pd

__all__ = [
    "PRECISIONS",
    "canonical",
    "supported_precisions",
    "PrecisionPolicy",
    "Decision",
    "PolicyHandle",
    "apply_policy",
    "explain_policy",
    "resolve_policy",
]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")

_ALIASES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "mixed_float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "mixed_bfloat16": "bf16",
    "fp8_e4m3": "fp8_e4m3", "float8_e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
}

# Low-precision dtype autocast uses for fp16/bf16; fp8 formats are emulated.
_AUTOCAST_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FP8_DTYPE_NAME = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}

Change = tuple[str, "str | None", "str | None"]  # (layer, precision, rule)


def canonical(name: str | torch.dtype) -> str:
    """The canonical precision name for ``name`` (Keras policy names and torch dtypes work too).

    >>> canonical("mixed_bfloat16"), canonical(torch.float16)
    ('bf16', 'fp16')
    """
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if isinstance(name, str):
        key = name.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
    raise ValueError(
        f"Unknown precision {name!r}. Use one of {', '.join(PRECISIONS)} "
        f"(aliases: {', '.join(k for k in _ALIASES if k not in PRECISIONS)})."
    )


@functools.lru_cache(maxsize=None)
def supported_precisions(device_type: str = "cpu") -> tuple[str, ...]:
    """Precisions this torch build can run on ``device_type``, found by trying them.

    >>> supported_precisions("cpu")[:3]
    ('fp32', 'fp16', 'bf16')
    """
    out = ["fp32"]
    for name, dtype in _AUTOCAST_DTYPE.items():
        if _autocast_works(device_type, dtype):
            out.append(name)
    for name, attr in _FP8_DTYPE_NAME.items():
        if _fp8_works(device_type, attr):
            out.append(name)
    return tuple(out)


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    if device_type == "cuda" and dtype == torch.bfloat16:
        # Autocast would accept bf16 on pre-Ampere GPUs only to emulate it slowly or fail later.
        if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            return False
    try:
        with warnings.catch_warnings():
            # An unsupported dtype/device only warns and disables autocast; detect that instead.
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                enabled, current = autocast_state(device_type)
                return bool(enabled) and current == dtype
    except (RuntimeError, ValueError, AssertionError):
        return False


def _fp8_works(device_type: str, attr: str) -> bool:
    f8 = getattr(torch, attr, None)
    if f8 is None:
        return False
    try:
        torch.ones(2, device=device_type).to(f8).to(torch.float32)
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False


def check_supported(precision: str, device_type: str) -> None:
    """Raise ValueError if ``precision`` cannot run on ``device_type``, naming those that can."""
    ok = supported_precisions(device_type)
    if precision not in ok:
        raise ValueError(
            f"Precision {precision!r} cannot run on device {device_type!r} with torch "
            f"{torch.__version__}. This device can run: {', '.join(ok)}."
        )


# ----------------------------------------------------------------------------- rules


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


def _as_policy(policy: PrecisionPolicy | Mapping[str, str] | str | None) -> PrecisionPolicy:
    return policy if isinstance(policy, PrecisionPolicy) else PrecisionPolicy(policy)


def _no_match_error(pattern: str, all_names: list[str], model: nn.Module) -> ValueError:
    shown = [n for n in all_names if n]  # the root "" is no help as a suggestion
    close = difflib.get_close_matches(pattern, shown, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(repr(c) for c in close)}." if close else ""
    what = "matches no layer" if _is_glob(pattern) else "is not a layer name"
    few = ", ".join(repr(n) for n in shown[:8]) + (", ..." if len(shown) > 8 else "")
    return ValueError(
        f"Policy rule {pattern!r} {what} of {type(model).__name__}.{hint} "
        f"Names are those of model.named_modules() (e.g. {few}); globs like 'blocks.*.attn' "
        "match several, '*' sets the default."
    )


def validate_rules(model: nn.Module, rules: Iterable[str], device_type: str | None = None,
                   precisions: Iterable[str] = ()) -> None:
    """Raise ValueError for a rule that matches no layer, or a precision the device cannot run."""
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    for pattern in rules:
        if _is_catch_all(pattern):
            continue
        if not any(_matches(pattern, n) for n in all_names):
            raise _no_match_error(pattern, all_names, model)
    if device_type is not None:
        for precision in precisions:
            check_supported(precision, device_type)


def resolve_policy(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str | None) -> _Resolved:
    """Resolve ``policy`` on ``model``: the Decision for every layer, and which layers need hooks.

    Raises ValueError (with close matches) for a rule that matches no layer.
    """
    policy = _as_policy(policy)
    rules = policy.rules
    validate_rules(model, rules)
    order = {p: i for i, p in enumerate(rules)}

    names_of: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
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
    for name, mod in model.named_modules():  # pre-order: a parent comes before its children
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
            or (precision in _FP8_DTYPE_NAME
                and (next(iter(mod.children()), None) is None
                     or any(p is not None for p in mod._parameters.values())))
        )
        if needs and precision is not None and _is_callable(mod):
            hooked.append(name)
    return _Resolved(names, modules, decisions, hooked)


def _is_callable(mod: nn.Module) -> bool:
    return type(mod).forward is not nn.Module.forward  # ModuleList & co. keep the stub


# ----------------------------------------------------------------------------- numerics


class _RoundSTE(torch.autograd.Function):
    """Round through an fp8 format in the forward; pass the gradient straight through."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, f8: torch.dtype, limit: float) -> torch.Tensor:
        # Saturate first: float8_e4m3fn has no inf, and a plain cast of an out-of-range
        # value gives NaN; saturating is what fp8 training recipes do.
        return x.clamp(-limit, limit).to(f8).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def round_fp8(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` saturated and rounded through the fp8 format (same dtype as ``x``, fp32 for lower).

    >>> round_fp8(torch.tensor([0.3, 1000.0]), "fp8_e4m3").tolist()
    [0.3125, 448.0]
    """
    f8 = getattr(torch, _FP8_DTYPE_NAME[precision])
    if x.dtype.itemsize < 4:
        x = x.float()
    return _RoundSTE.apply(x, f8, float(torch.finfo(f8).max))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every floating tensor in nested tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    # Only widen: fp64 inputs of an fp64 model stay fp64.
    return t.float() if t.dtype.itemsize < 4 else t


class _Frame:
    """What one hooked call entered, so the matching forward hook can undo exactly that."""

    __slots__ = ("module", "autocast", "params", "upcast")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.autocast: Any = None
        self.params: dict[str, torch.Tensor] | None = None
        self.upcast = False


def _move_hook_last(module: nn.Module, hook: Callable[..., Any]) -> None:
    """Put ``hook`` (already registered) after forward hooks registered since, e.g. a recorder's."""
    hooks = module._forward_hooks
    if next(reversed(hooks.values()), None) == hook:
        return
    for key, fn in hooks.items():
        if fn == hook:
            hooks.move_to_end(key)
            return


# ----------------------------------------------------------------------------- handle


class PolicyHandle:
    """A policy applied to a model. Change it live with :meth:`update`; undo it with :meth:`remove`.

    Hooks are kept here, not on the modules: after ``remove()`` the model has no hooks and no
    extra attributes left, and computes bit-identical outputs.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> handle = apply_policy(model, {"*": "bf16"}, device_type="cpu")
        >>> handle.update({"1": "fp32"})      # from any thread; applies at the next forward
        >>> model(torch.randn(2, 4)).dtype
        torch.float32
        >>> handle.effective()["0"]
        ('bf16', '*')
        >>> handle.remove()
    """

    def __init__(self, model: nn.Module, policy: PrecisionPolicy, device_type: str) -> None:
        self.model = model
        self.device_type = device_type
        for precision in policy.precisions():
            check_supported(precision, device_type)
        self._policy = policy
        self._resolved = resolve_policy(model, policy)
        self._lock = threading.Lock()
        self._pending: PrecisionPolicy | None = None  # the next policy, set by update()
        self._listeners: list[Callable[[list[Change]], None]] = []
        self._tls = threading.local()  # per-thread stack of _Frame
        self._hooks: list[Any] = []
        self._removed = False
        # The root always carries one hook pair: it applies pending updates at the start of
        # every forward and sets the root's precision. prepend=True: our cast happens before
        # other pre-hooks look at the inputs, and our autocast state is left before other
        # forward hooks (e.g. a recorder's statistics) run.
        self._root_hooks = [
            model.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._post, always_call=True, prepend=True),
            model.register_forward_hook(self._upcast),
        ]
        self._install()

    # -- public API ---------------------------------------------------------------------

    @property
    def policy(self) -> PrecisionPolicy:
        """The policy in force now (pending updates not included)."""
        return self._policy

    def update(self, changes: Mapping[str, str | None]) -> None:
        """Queue rule changes (a precision sets a rule, ``None`` removes one); thread-safe.

        A new rule goes after the existing ones (so it wins ties, see PrecisionPolicy); a
        changed rule keeps its place.

        Checked here, in the caller's thread (unknown layer, pattern matching nothing,
        precision the device cannot run, removing a rule that does not exist: ValueError),
        and applied at the start of the model's next forward, on the training thread.
        """
        if self._removed:
            raise RuntimeError("This policy was removed; call apply_policy(model, policy) again.")
        changes = {k: (None if v is None else canonical(v)) for k, v in changes.items()}
        set_ = {k: v for k, v in changes.items() if v is not None}
        validate_rules(self.model, set_, self.device_type, set_.values())
        with self._lock:
            # Queued as the whole next policy, so several updates between two forwards
            # compose in order (set then remove, remove then set) and none is lost.
            base = self._pending if self._pending is not None else self._policy
            self._pending = base.merged(changes)  # raises for removing a rule that is not there

    def apply_pending(self) -> list[Change]:
        """Apply queued updates now (call on the training thread, between forwards)."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return []
            old = self._resolved
            self._policy = pending
            self._resolved = resolve_policy(self.model, self._policy)
            self._uninstall()
            self._install()
            listeners = list(self._listeners)
        changes = [
            (name, d.precision, d.rule)
            for name, d in self._resolved.decisions.items()
            if (d.precision, d.rule) != (old.decisions[name].precision, old.decisions[name].rule)
        ]
        if changes:
            for fn in listeners:
                fn(changes)
        return changes

    def effective(self) -> dict[str, tuple[str | None, str | None]]:
        """``{layer: (precision or None, rule or None)}`` in force now, for every layer."""
        with self._lock:
            return {n: (d.precision, d.rule) for n, d in self._resolved.decisions.items()}

    def explain(self) -> "pd.DataFrame":
        """The table of :func:`explain_policy` for the policy in force now."""
        with self._lock:
            resolved = self._resolved
        return _explain_frame(resolved)

    def add_listener(self, fn: Callable[[list[Change]], None]) -> None:
        """Call ``fn(changes)`` whenever rules take effect; called once now with the initial state.

        ``changes`` is a list of ``(layer, precision, rule)``; ``precision`` None means the layer
        went back to the caller's autocast. Listeners run on the training thread, inside the
        model's forward pre-hook, so they must be quick.
        """
        with self._lock:
            self._listeners.append(fn)
            initial = [(n, d.precision, d.rule) for n, d in self._resolved.decisions.items()
                       if d.precision is not None]
        fn(initial)

    def remove_listener(self, fn: Callable[[list[Change]], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def remove(self) -> None:
        """Take every hook off the model; idempotent. Queued updates are dropped."""
        if self._removed:
            return
        self._removed = True
        self._uninstall()
        for h in self._root_hooks:
            h.remove()
        self._root_hooks = []
        self._pending = None

    def __enter__(self) -> "PolicyHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._hooks) // 2} hooked layers"
        return f"<PolicyHandle {self._policy!r} on {type(self.model).__name__} ({state})>"

    # -- hooks --------------------------------------------------------------------------

    def _install(self) -> None:
        for name in self._resolved.hooked:
            mod = self._resolved.modules[name]
            precision = self._resolved.decisions[name].precision
            pre = functools.partial(self._pre, precision=precision)
            self._hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            self._hooks.append(mod.register_forward_hook(self._post, always_call=True, prepend=True))
            if precision in _AUTOCAST_DTYPE:
                self._hooks.append(mod.register_forward_hook(self._upcast))

    def _uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _stack(self) -> list[_Frame]:
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        return stack

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._pending is not None:  # cheap unlocked peek; apply_pending takes the lock
            self.apply_pending()
        precision = self._resolved.decisions[""].precision
        if precision is None:
            self._stack().append(_Frame(module))  # keeps push/pop paired with _post
            return None
        return self._pre(module, args, kwargs, precision=precision)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict, *, precision: str) -> tuple[tuple, dict]:
        # Push before anything that can raise: on an exception the always_call forward hook
        # pops this frame and undoes whatever was entered so far.
        frame = _Frame(module)
        self._stack().append(frame)
        if precision in _AUTOCAST_DTYPE:
            # Outside any autocast, the code around this layer is plain fp32 and would fail on
            # (or silently compute in) fp16/bf16 tensors: its outputs are cast back to fp32 as
            # they leave it, by _upcast, which runs after every other forward hook so that
            # observers still see the dtype the layer computed in.
            frame.upcast = not autocast_state(self.device_type)[0]
            if frame.upcast:
                _move_hook_last(module, self._upcast)
            # cache_enabled=False: autocast's weight-cast cache is keyed by the weight alone, so
            # inside an outer fp16 region a bf16 layer would be handed the cached fp16 copy.
            frame.autocast = torch.autocast(self.device_type, dtype=_AUTOCAST_DTYPE[precision],
                                            cache_enabled=False)
            frame.autocast.__enter__()
            return args, kwargs
        frame.autocast = torch.autocast(self.device_type, enabled=False)
        frame.autocast.__enter__()
        if precision == "fp32":
            return _map_tensors(args, _to_fp32), _map_tensors(kwargs, _to_fp32)
        # Emulated fp8: round inputs and this module's own parameters. The rounded weight is
        # put in the module's parameter slot for this forward only; the master Parameter is
        # never written and goes back in the forward hook.
        rnd = functools.partial(round_fp8, precision=precision)
        originals = {k: p for k, p in module._parameters.items() if p is not None and p.is_floating_point()}
        if originals:
            frame.params = originals
            for k, p in originals.items():
                module._parameters[k] = rnd(p)  # type: ignore[assignment]
        return _map_tensors(args, rnd), _map_tensors(kwargs, rnd)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack()
        if not stack or stack[-1].module is not module:
            return  # our pre-hook never ran for this call (an earlier hook raised)
        frame = stack.pop()
        if frame.params:
            module._parameters.update(frame.params)
        if frame.autocast is not None:
            frame.autocast.__exit__(None, None, None)
        self._upcasts()[id(module)] = frame.upcast

    def _upcasts(self) -> dict[int, bool]:
        pending = getattr(self._tls, "upcasts", None)
        if pending is None:
            pending = self._tls.upcasts = {}
        return pending

    def _upcast(self, module: nn.Module, args: Any, output: Any) -> Any:
        # Set by _post of this very call (nothing runs in between but other forward hooks).
        if self._upcasts().pop(id(module), False):
            return _map_tensors(output, _to_fp32)
        return None


def _infer_device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    for b in model.buffers():
        return b.device.type
    return "cpu"


def apply_policy(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str,
                 device_type: str | None = None) -> PolicyHandle:
    """Run ``model``'s layers in the precisions ``policy`` says; returns a :class:`PolicyHandle`.

    ``device_type`` defaults to the device of the model's parameters. Works with or without an
    outer ``torch.autocast``; layers no rule reaches run as the outer autocast says.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> with apply_policy(model, {"0": "fp16"}, device_type="cpu"):
        ...     with torch.autocast("cpu", dtype=torch.bfloat16):
        ...         model(torch.randn(2, 4)).dtype
        torch.bfloat16

    Raises ValueError for a rule matching no layer (with close matches) or a precision the
    device cannot run (naming those it can).
    """
    return PolicyHandle(model, _as_policy(policy), device_type or _infer_device_type(model))


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


def explain_policy(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str) -> "pd.DataFrame":
    """Table of every layer: ``layer, type, precision, rule, inherited``.

    ``precision`` is the one in force (None: not set by the policy, the caller's autocast
    decides); ``rule`` is the pattern that decided it; ``inherited`` is True when that rule
    matched an enclosing module rather than this one.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
        >>> explain_policy(model, {"*": "fp16", "1": "bf16"})[["layer", "precision", "rule"]].values.tolist()
        [['', 'fp16', '*'], ['0', 'fp16', '*'], ['1', 'bf16', '1'], ['1.0', 'bf16', '1'], ['1.1', 'bf16', '1']]
    """
    return _explain_frame(resolve_policy(model, policy))
