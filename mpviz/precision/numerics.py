"""Numerics of the precisions: their torch dtypes (the one place that maps a precision name to a
torch dtype), which ones this torch build can run, and emulated fp8 rounding."""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from mpviz.compat import autocast_state
from mpviz.formats import AUTOCAST_PRECISIONS, FORMATS, FP8_PRECISIONS, canonical

__all__ = ["torch_dtype", "supported_precisions", "check_supported", "round_fp8"]


def torch_dtype(precision: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype of a precision (any name :func:`mpviz.formats.canonical` takes); None for
    an fp8 format this torch build lacks.

    >>> torch_dtype("bf16"), torch_dtype("half")
    (torch.bfloat16, torch.float16)
    """
    if precision not in FORMATS:  # canonical names (what policies hold) skip the alias lookup
        precision = canonical(precision)
    return getattr(torch, FORMATS[precision].dtype, None)


@functools.lru_cache(maxsize=None)
def supported_precisions(device_type: str = "cpu") -> tuple[str, ...]:
    """Precisions this torch build can run on ``device_type``, found by trying them.

    >>> supported_precisions("cpu")[:3]
    ('fp32', 'fp16', 'bf16')
    """
    out = ["fp32"]
    out += [name for name in AUTOCAST_PRECISIONS if _autocast_works(device_type, torch_dtype(name))]
    out += [name for name in FP8_PRECISIONS if _fp8_works(device_type, torch_dtype(name))]
    return tuple(out)


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    if device_type == "cuda" and dtype == torch_dtype("bf16"):
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


def _fp8_works(device_type: str, f8: torch.dtype | None) -> bool:
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
    f8 = torch_dtype(precision)
    if x.dtype.itemsize < 4:
        x = x.float()
    return _RoundSTE.apply(x, f8, float(torch.finfo(f8).max))


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    # Only widen: fp64 inputs of an fp64 model stay fp64.
    return t.float() if t.dtype.itemsize < 4 else t
