"""Every torch-version and device quirk in one place, found by feature detection."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of autocast for ``device_type`` on this thread."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4 takes a device type
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def queue_backward_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the current backward pass has finished (all ``.grad`` accumulated).

    Must be called from inside backward (e.g. a tensor hook). DDP and FSDP use the same engine call.
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def scaler_scale(scaler: Any) -> torch.Tensor | None:
    """The GradScaler's current scale as a device tensor (no host sync), or None if not scaling."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


def scaler_settings(scaler: Any) -> dict[str, Any] | None:
    """A GradScaler's settings. A disabled one (``GradScaler(enabled=False)``, PyTorch's recipe
    for AMP off) has none: its getters raise AttributeError, so they are read only when enabled."""
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


def get_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, dev


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_nonfinite(tensors: list[torch.Tensor], found: torch.Tensor) -> None:
    """Make ``found`` (a 1-element float32 tensor) nonzero if any of ``tensors`` holds inf/nan.
    Never clears it; no host sync.

    GradScaler's own check: one fused kernel for all tensors, here with a multiplier of 1, which
    leaves every value as it was (on the CPU it is 4-7x cheaper than one sum over the
    concatenation). Tensors it does not take (several devices, sparse) are checked one by one.
    """
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, _one(found.device))
    except (RuntimeError, AttributeError):
        for t in tensors:
            found += (~torch.isfinite(t.detach().float().sum())).to(found.device)


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones(1, device=device)
