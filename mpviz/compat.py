"""Every torch-version and device quirk in one place, found by feature detection."""
from __future__ import annotations

import contextlib
import copy
import functools
import types
from typing import Any, Callable, Iterator

import torch


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of autocast for ``device_type`` on this thread."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4 takes a device type
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def queue_backward_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the current backward pass has finished; call from inside backward."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def scaler_scale(scaler: Any) -> torch.Tensor | None:
    """The GradScaler's current scale as a device tensor (no host sync), or None if not scaling."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


def scaler_settings(scaler: Any) -> dict[str, Any] | None:
    """A GradScaler's settings; a disabled one's getters raise, so they are read only when enabled."""
    if scaler is None:
        return None
    out: dict[str, Any] = {"enabled": bool(scaler.is_enabled())}
    if not out["enabled"]:
        return out
    for name in ("init_scale", "growth_factor", "backoff_factor", "growth_interval"):
        getter = getattr(scaler, f"get_{name}", None)
        if getter is not None:
            out[name] = getter()
        elif isinstance(getattr(scaler, f"_{name}", None), (int, float)):
            out[name] = getattr(scaler, f"_{name}")  # torch has no get_init_scale()
    return out


def scaler_token(scaler: Any) -> Any:
    """Something a GradScaler's ``update()`` replaces (its per-optimizer state), or None."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_per_optimizer_states", None)


def scaler_updated(scaler: Any, token: Any) -> bool:
    """Whether ``scaler.update()`` ran since ``token`` was taken (:func:`scaler_token`). Holding
    the token keeps it alive, so a new state cannot reuse its identity."""
    return token is not None and getattr(scaler, "_per_optimizer_states", None) is not token


def get_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, dev


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def preserved(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Afterwards each module's train/eval flag, the buffers' values and the RNG state as they
    were: for work on the user's model that must leave no trace (a rerun, a count)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]
    rng = get_rng_state(device)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        set_rng_state(rng, device)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_nonfinite(tensors: list[torch.Tensor], found: torch.Tensor) -> None:
    """Make ``found`` (a 1-element float32 tensor) nonzero if any of ``tensors`` holds inf/nan;
    never clears it, no host sync."""
    # GradScaler's own fused check, with a multiplier of 1 (values unchanged): one kernel for all
    # tensors. Tensors it does not take (several devices, sparse) are checked one by one.
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, _one(found.device))
    except (RuntimeError, AttributeError):
        for t in tensors:
            found += (~torch.isfinite(t.detach().float().sum())).to(found.device)


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones(1, device=device)


_DROPPED = object()   # stands for a forward wrapper in deepcopy's memo: deleted from the copy


def bare_copy(module: torch.nn.Module, meta: bool = False) -> torch.nn.Module:
    """``copy.deepcopy(module)`` without module hooks, nor ``forward`` wrappers bound to another
    object (a recorder's, a precision policy's); a ``forward`` bound to the module itself stays.
    ``meta=True``: parameters and buffers are empty tensors on the meta device (no data copied).

        >>> m = torch.nn.Linear(2, 2)
        >>> _ = m.register_forward_hook(lambda *a: None)
        >>> len(bare_copy(m)._forward_hooks), len(m._forward_hooks)
        (0, 1)
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for name, value in vars(m).items():
            # Which dicts hold hooks varies across torch versions: found by name.
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
        forward = m.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__self__ is not m:
            memo[id(forward)] = _DROPPED
        if meta:
            _meta_tensors(m, memo)
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        if m.__dict__.get("forward") is _DROPPED:
            del m.__dict__["forward"]   # the class's own forward again
    return out


def _meta_tensors(m: torch.nn.Module, memo: dict[int, Any]) -> None:
    for p in m._parameters.values():
        if p is not None and id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                             requires_grad=p.requires_grad)
    for b in m._buffers.values():
        if b is not None and id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")


# ---------------------------------------------------------------- torch.compile
# `torch.compile(model)` returns an OptimizedModule whose named_modules() are prefixed
# "_orig_mod."; `model.compile()` compiles in place. mpviz names layers by the user's own names.
_COMPILED_SEGMENT = "_orig_mod"


def is_compiled_wrapper(module: Any) -> bool:
    """An ``OptimizedModule`` made by ``torch.compile(module)`` (the user's module is ``._orig_mod``)."""
    return isinstance(getattr(module, _COMPILED_SEGMENT, None), torch.nn.Module) and \
        type(module).__name__ == "OptimizedModule"


def user_module(module: torch.nn.Module) -> torch.nn.Module:
    """The user's own module behind ``torch.compile`` wrappers."""
    while is_compiled_wrapper(module):
        module = getattr(module, _COMPILED_SEGMENT)
    return module


def user_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments that ``torch.compile`` wrappers add."""
    if _COMPILED_SEGMENT not in name:
        return name
    return ".".join(p for p in name.split(".") if p != _COMPILED_SEGMENT)


def named_modules(model: torch.nn.Module, remove_duplicate: bool = True
                  ) -> list[tuple[str, torch.nn.Module]]:
    """``model.named_modules()`` by the user's names: compile wrappers (at the top or around a
    child) are looked through, so ``torch.compile(model)`` and ``model`` list the same layers."""
    out = []
    for name, mod in user_module(model).named_modules(remove_duplicate=remove_duplicate):
        if not is_compiled_wrapper(mod):
            out.append((user_name(name), mod))
    return out


def is_compiling() -> bool:
    """True while dynamo traces (hooks then record nothing and read no clock or RNG)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def force_eager() -> Any:
    """A context in which compiled functions and modules run eagerly (with their hooks)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")
