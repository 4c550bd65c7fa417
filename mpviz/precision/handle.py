"""Apply a policy to a model with hooks, change it live, take it off: :class:`PolicyHandle`."""
from __future__ import annotations

import contextlib
import functools
import threading
import types
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from mpviz import tree
from mpviz.compat import autocast_state, is_compiling, user_module
from mpviz.formats import AUTOCAST_PRECISIONS, FP8_PRECISIONS
from mpviz.precision.numerics import _to_fp32, check_supported, round_fp8, torch_dtype
from mpviz.precision.resolve import _explain_frame, resolve_policy
from mpviz.precision.rules import PrecisionPolicy, _as_policy, canonical, validate_rules

if TYPE_CHECKING:  # pandas is imported only by explain_policy
    import pandas as pd

__all__ = ["Change", "PolicyHandle", "apply_policy", "explain_policy"]

Change = tuple[str, "str | None", "str | None"]  # (layer, precision, rule)


_MISSING = object()


def _move_hook_last(module: nn.Module, hook: Callable[..., Any]) -> None:
    """Put ``hook`` (already registered) after forward hooks registered since, e.g. a recorder's."""
    hooks = module._forward_hooks
    if next(reversed(hooks.values()), None) == hook:
        return
    for key, fn in hooks.items():
        if fn == hook:
            hooks.move_to_end(key)
            return


class PolicyHandle:
    """A policy applied to a model: change it live with :meth:`update`, undo it with :meth:`remove`
    (no hooks or attributes left; outputs bit-identical to before).

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
        self._root = user_module(model)  # hooks go on the user's modules, behind compile wrappers
        self._root_precision = self._resolved.decisions[""].precision  # read by the root's hooks
        self._lock = threading.Lock()
        self._pending: PrecisionPolicy | None = None  # the next policy, set by update()
        # The policy in force, or "pending": compiled code guards on it (see _apply_pending_now).
        self._updates = repr(policy.rules)
        self._listeners: list[Callable[[list[Change]], None]] = []
        self._tls = threading.local()  # per thread: how many autocasts of ours are open
        self._removed = False
        # What remove() undoes: the root's hooks and forward wrapper, which apply pending updates
        # at the start of every forward and set the root's precision; and (_layers) the hooked
        # layers', redone at each update. prepend=True: our cast happens before other pre-hooks
        # look at the inputs.
        self._attached = contextlib.ExitStack()
        self._layers = contextlib.ExitStack()
        root = self._root
        self._attached.callback(root.register_forward_pre_hook(
            self._root_pre, with_kwargs=True, prepend=True).remove)
        self._attached.callback(root.register_forward_hook(self._upcast).remove)
        self._wrap_forward(root, None, self._attached)
        self._attached.callback(self._layers.close)
        self._install()

    # -- public API ---------------------------------------------------------------------

    @property
    def policy(self) -> PrecisionPolicy:
        """The policy in force now (pending updates not included)."""
        return self._policy

    def update(self, changes: Mapping[str, str | None]) -> None:
        """Queue rule changes (a precision sets a rule, ``None`` removes one); thread-safe.

        Checked now (ValueError), applied at the start of the model's next forward. A new rule
        goes after the existing ones (it wins ties); a changed rule keeps its place.
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
            self._updates = "pending"

    def apply_pending(self) -> list[Change]:
        """Apply queued updates now, on the training thread between forwards."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return []
            old = self._resolved
            self._policy = pending
            self._resolved = resolve_policy(self.model, self._policy)
            self._root_precision = self._resolved.decisions[""].precision
            self._updates = repr(self._policy.rules)
            self._layers.close()
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
        """Call ``fn(changes)`` whenever rules take effect, and once now with the initial state.

        ``changes``: ``(layer, precision, rule)`` tuples; precision None: back to the caller's
        autocast. ``fn`` runs in the model's forward pre-hook on the training thread (while
        dynamo traces, on a compiled model), so it must be quick.
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

    def __deepcopy__(self, memo: dict) -> "PolicyHandle":
        # A copy of a model under a policy (an EMA copy, a shadow) refers to this same handle:
        # it holds a lock and the original modules, neither of which can be copied.
        return self

    def remove(self) -> None:
        """Take every hook off the model; idempotent. Queued updates are dropped."""
        if self._removed:
            return
        self._removed = True
        self._attached.close()
        self._pending = None

    def __enter__(self) -> "PolicyHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._resolved.hooked)} hooked layers"
        return f"<PolicyHandle {self._policy!r} on {type(self._root).__name__} ({state})>"

    # -- hooks --------------------------------------------------------------------------

    def _install(self) -> None:
        for name in self._resolved.hooked:
            mod = self._resolved.modules[name]
            precision = self._resolved.decisions[name].precision
            pre = functools.partial(self._pre, precision=precision)
            self._layers.callback(mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True).remove)
            if precision in AUTOCAST_PRECISIONS:
                self._layers.callback(mod.register_forward_hook(self._upcast).remove)
            self._wrap_forward(mod, precision, self._layers)

    def _wrap_forward(self, module: nn.Module, precision: str | None, undo: contextlib.ExitStack) -> None:
        # The layer's own forward runs inside our autocast, a `with` block in one function,
        # which torch.compile traces (an autocast entered in a pre-hook and left in a forward
        # hook breaks the graph). An instance attribute, so compiled code guards on it: a new
        # wrapper recompiles. A bound method: compiled code guards on its function (one for
        # all), not on the object, so blocks of one class share compiled code (per-block
        # compile). precision None: the root's, read at each call.
        forward = types.MethodType(_run_forward, (self, module.forward, module, precision))
        undo.callback(_unwrap_forward, module, forward, module.__dict__.get("forward", _MISSING))
        module.__dict__["forward"] = forward

    def _forward(self, forward: Callable[..., Any], module: nn.Module, precision: str | None,
                 *args: Any, **kwargs: Any) -> Any:
        if precision is None:
            precision = self._root_precision
            if precision is None:
                return forward(*args, **kwargs)
        compiling = is_compiling()
        ctx = self._autocast(precision, compiling)
        if ctx is None:
            return forward(*args, **kwargs)
        if not compiling:
            self._tls.open = getattr(self._tls, "open", 0) + 1
        originals: dict[str, torch.Tensor] = {}
        try:
            if precision in FP8_PRECISIONS:
                # Emulated fp8: the rounded weight is put in the module's parameter slot for
                # this forward only; the master Parameter is never written and goes back below.
                originals = {k: p for k, p in module._parameters.items()
                             if p is not None and p.is_floating_point()}
                for k, p in originals.items():
                    module._parameters[k] = round_fp8(p, precision)  # type: ignore[assignment]
            with ctx:
                return forward(*args, **kwargs)
        finally:
            module._parameters.update(originals)
            if not compiling:
                self._tls.open -= 1

    def _autocast(self, precision: str, compiling: bool) -> Any:
        """The autocast a layer in ``precision`` runs in; None if the one in force already is."""
        if precision not in AUTOCAST_PRECISIONS:
            return torch.autocast(self.device_type, enabled=False)
        enabled, current = autocast_state(self.device_type)
        dtype = torch_dtype(precision)
        if enabled and current == dtype:
            # A nested autocast would change nothing but the weight-cast cache, and with it the
            # numbers (a weight used twice would be cast twice and its gradient summed in fp32).
            return None
        # autocast's weight-cast cache is keyed by the weight alone, so inside an outer fp16
        # region a bf16 layer would be handed the cached fp16 copy: the cache is on only where
        # no autocast of ours is open around this one. Compiled code has no such cache.
        outermost = not enabled and (compiling or not getattr(self._tls, "open", 0))
        return torch.autocast(self.device_type, dtype=dtype, cache_enabled=outermost)

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        _apply_pending_now(self)
        _in_force(self, self._updates)
        if self._root_precision is None:
            return None
        return self._pre(module, args, kwargs, precision=self._root_precision)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict, *, precision: str
             ) -> tuple[tuple, dict] | None:
        if precision in AUTOCAST_PRECISIONS:
            # Outside any autocast, the code around this layer is plain fp32 and would fail on
            # (or silently compute in) fp16/bf16 tensors: its outputs are cast back to fp32 as
            # they leave it, by _upcast, which runs after every other forward hook so that
            # observers still see the dtype the layer computed in (compiled: hooks run in the
            # order they had when traced).
            if not is_compiling() and not autocast_state(self.device_type)[0]:
                _move_hook_last(module, self._upcast)
            return None
        if precision == "fp32":
            return tree.map_floats(_to_fp32, args), tree.map_floats(_to_fp32, kwargs)
        # Emulated fp8: inputs are rounded here, the module's own parameters in _forward.
        rnd = functools.partial(round_fp8, precision=precision)
        return tree.map_floats(rnd, args), tree.map_floats(rnd, kwargs)

    def _upcast(self, module: nn.Module, args: Any, output: Any) -> Any:
        # On the layers in fp16/bf16 (and the root): outside any autocast, outputs leave in fp32.
        if module is self._root and self._root_precision not in AUTOCAST_PRECISIONS:
            return None
        if autocast_state(self.device_type)[0]:
            return None
        return tree.map_floats(_to_fp32, output)


def _unwrap_forward(module: nn.Module, ours: Any, previous: Any) -> None:
    if module.__dict__.get("forward") is not ours:
        return  # replaced since by someone else: leave theirs
    if previous is _MISSING:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = previous


def _run_forward(bound: tuple, *args: Any, **kwargs: Any) -> Any:
    handle, forward, module, precision = bound
    return handle._forward(forward, module, precision, *args, **kwargs)


# Under torch.compile the root's pre-hook is traced too (inside the compiled forward, or as a
# frame of its own when torch.compile(model) runs the root's hooks outside it): updates are
# applied while dynamo traces, so the graph never breaks. These two functions are marked as
# having a constant result: dynamo calls them while it traces and keeps them out of the graph.

def _apply_pending_now(handle: PolicyHandle) -> bool:
    if handle._pending is not None:  # cheap unlocked peek; apply_pending takes the lock
        handle.apply_pending()
    return True


def _in_force(handle: PolicyHandle, updates: str) -> bool:
    # Compiled code guards on `updates` ("pending" until an update is applied, then the rules
    # in force): code compiled for a policy is reused while it is in force, and an update
    # recompiles once. An update arriving from another thread between the two calls is applied
    # here too, so no code is compiled for one policy and guarded as another.
    return _apply_pending_now(handle)


# What torch.compiler.assume_constant_result does, without importing dynamo here (seconds).
# Should torch drop the mark, these calls are traced: still correct, and a graph break.
_apply_pending_now._dynamo_marked_constant = True  # type: ignore[attr-defined]
_in_force._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _infer_device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    for b in model.buffers():
        return b.device.type
    return "cpu"


def apply_policy(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str,
                 device_type: str | None = None) -> PolicyHandle:
    """Run ``model``'s layers in the precisions ``policy`` says, inside or outside an outer
    ``torch.autocast`` (layers no rule reaches run as it says). ``device_type``: the parameters'.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> with apply_policy(model, {"0": "fp16"}, device_type="cpu"):
        ...     with torch.autocast("cpu", dtype=torch.bfloat16):
        ...         model(torch.randn(2, 4)).dtype
        torch.bfloat16

    ValueError for a rule matching no layer, or a precision the device cannot run.
    """
    return PolicyHandle(model, _as_policy(policy), device_type or _infer_device_type(model))


def explain_policy(model: nn.Module, policy: PrecisionPolicy | Mapping[str, str] | str) -> "pd.DataFrame":
    """Every layer's ``layer, type, precision, rule, inherited``: the precision in force (None:
    the caller's autocast decides), the rule that decided it, and whether that rule matched an
    enclosing module.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
        >>> explain_policy(model, {"*": "fp16", "1": "bf16"})[["layer", "precision", "rule"]].values.tolist()
        [['', 'fp16', '*'], ['0', 'fp16', '*'], ['1', 'bf16', '1'], ['1.0', 'bf16', '1'], ['1.1', 'bf16', '1']]
    """
    return _explain_frame(resolve_policy(model, policy))
