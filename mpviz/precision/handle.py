"""Apply a policy to a model with hooks, change it live, take it off: :class:`PolicyHandle`."""
from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from mpviz import tree
from mpviz.compat import autocast_state
from mpviz.precision.numerics import _AUTOCAST_DTYPE, _to_fp32, check_supported, round_fp8
from mpviz.precision.resolve import _explain_frame, resolve_policy
from mpviz.precision.rules import PrecisionPolicy, _as_policy, canonical, validate_rules

if TYPE_CHECKING:  # pandas is imported only by explain_policy
    import pandas as pd

__all__ = ["Change", "PolicyHandle", "apply_policy", "explain_policy"]

Change = tuple[str, "str | None", "str | None"]  # (layer, precision, rule)


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
            enabled, current = autocast_state(self.device_type)
            dtype = _AUTOCAST_DTYPE[precision]
            if enabled and current == dtype:
                # Already in force: a nested autocast would change nothing but the weight-cast
                # cache, and with it the numbers (a weight used twice would be cast twice and
                # its gradient summed in fp32), so a policy equal to the outer autocast computes
                # exactly what the autocast alone does.
                return args, kwargs
            frame.upcast = not enabled
            if frame.upcast:
                _move_hook_last(module, self._upcast)
            # autocast's weight-cast cache is keyed by the weight alone, so inside an outer fp16
            # region a bf16 layer would be handed the cached fp16 copy: the cache is on only
            # where no autocast of ours is open around this one (as a plain autocast would be).
            outermost = not enabled and all(f.autocast is None for f in self._stack()[:-1])
            frame.autocast = torch.autocast(self.device_type, dtype=dtype,
                                            cache_enabled=outermost)
            frame.autocast.__enter__()
            return args, kwargs
        frame.autocast = torch.autocast(self.device_type, enabled=False)
        frame.autocast.__enter__()
        if precision == "fp32":
            return tree.map_floats(_to_fp32, args), tree.map_floats(_to_fp32, kwargs)
        # Emulated fp8: round inputs and this module's own parameters. The rounded weight is
        # put in the module's parameter slot for this forward only; the master Parameter is
        # never written and goes back in the forward hook.
        rnd = functools.partial(round_fp8, precision=precision)
        originals = {k: p for k, p in module._parameters.items() if p is not None and p.is_floating_point()}
        if originals:
            frame.params = originals
            for k, p in originals.items():
                module._parameters[k] = rnd(p)  # type: ignore[assignment]
        return tree.map_floats(rnd, args), tree.map_floats(rnd, kwargs)

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
            return tree.map_floats(_to_fp32, output)
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
