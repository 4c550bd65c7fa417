"""The one table of precisions, without torch (the dashboards read it): names in one order
(:data:`PRECISIONS`), each one's :class:`FloatFormat`, aliases (:func:`canonical`), dtype names
back to precisions (:data:`DTYPE_PRECISION`); the log2 histogram bins; :func:`did_you_mean`.
Torch dtypes: :func:`mpviz.precision.numerics.torch_dtype`.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["FloatFormat", "FORMATS", "PRECISIONS", "AUTOCAST_PRECISIONS", "FP8_PRECISIONS",
           "ALIASES", "DTYPE_PRECISION", "canonical", "dtype_name", "did_you_mean",
           "N_BINS", "ZERO_BIN", "SUBNORMAL_BIN", "NONFINITE_BIN", "bin_of", "bin_edges"]


@dataclass(frozen=True)
class FloatFormat:
    """A binary float format: its range and the name of its torch dtype.

    >>> FORMATS["fp16"].max, FORMATS["fp16"].dtype
    (65504.0, 'float16')
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    min_normal: float
    min_subnormal: float
    dtype: str

    def log2_range(self) -> tuple[int, int]:
        """Exponents (log2) of the smallest subnormal and of the largest finite value."""
        return math.floor(math.log2(self.min_subnormal)), math.floor(math.log2(self.max))


FORMATS: dict[str, FloatFormat] = {f.name: f for f in (
    FloatFormat("fp32", 8, 23, 3.4028234663852886e38, 2.0**-126, 2.0**-149, "float32"),
    FloatFormat("fp16", 5, 10, 65504.0, 2.0**-14, 2.0**-24, "float16"),
    FloatFormat("bf16", 8, 7, 3.3895313892515355e38, 2.0**-126, 2.0**-133, "bfloat16"),
    FloatFormat("fp8_e4m3", 4, 3, 448.0, 2.0**-6, 2.0**-9, "float8_e4m3fn"),
    FloatFormat("fp8_e5m2", 5, 2, 57344.0, 2.0**-14, 2.0**-16, "float8_e5m2"),
)}
PRECISIONS: tuple[str, ...] = tuple(FORMATS)
# How a precision policy runs them: fp16/bf16 under torch.autocast, fp8 emulated (rounded
# through the fp8 dtype, computed in fp32); fp32 is autocast turned off.
AUTOCAST_PRECISIONS: tuple[str, ...] = ("fp16", "bf16")
FP8_PRECISIONS: tuple[str, ...] = ("fp8_e4m3", "fp8_e5m2")

# Other spellings of each precision: its torch dtype name and the Keras policy names.
_OTHER_NAMES = {"fp32": ("float",), "fp16": ("half", "mixed_float16"),
                "bf16": ("mixed_bfloat16",), "fp8_e4m3": ("float8_e4m3",)}
ALIASES: dict[str, str] = {
    alias: name
    for name, f in FORMATS.items()
    for alias in (name, f.dtype, *_OTHER_NAMES.get(name, ()))
}
DTYPE_PRECISION: dict[str, str] = {f.dtype: name for name, f in FORMATS.items()}


def dtype_name(dtype: Any) -> Any:
    """A torch dtype's name without ``torch.`` (``"bfloat16"``), as runs store it; None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def canonical(name: Any) -> str:
    """The precision called ``name``: one of :data:`PRECISIONS`, an alias, or a torch dtype.

    >>> canonical("mixed_bfloat16"), canonical("half")
    ('bf16', 'fp16')
    """
    if type(name).__module__ == "torch":  # a torch.dtype, read without importing torch
        name = dtype_name(name)
    if isinstance(name, str):
        key = name.strip().lower()
        if key in ALIASES:
            return ALIASES[key]
    raise ValueError(
        f"Unknown precision {name!r}. Use one of {', '.join(PRECISIONS)} "
        f"(aliases: {', '.join(k for k in ALIASES if k not in PRECISIONS)})."
    )


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6,
                 ask: bool = False) -> str:
    """The ``choices`` closest to ``name`` as an error message's hint; ``""`` if none is close.

    >>> did_you_mean("hed", ["", "head", "body"]), did_you_mean("mlpp", ["mlp"], ask=True)
    ("close matches: 'head'", 'did you mean mlp?')
    """
    close = difflib.get_close_matches(name, [c for c in choices if c], n=n, cutoff=cutoff)
    if not close:
        return ""
    if ask:
        return f"did you mean {' or '.join(close)}?"
    return f"close matches: {', '.join(map(repr, close))}"


# The log2 magnitude histogram recorded per layer and statistics step (mpviz.stats counts it
# from the float32 exponent bits):
#     bin 0: exact zeros
#     bin 1: fp32 subnormals, 0 < |x| < 2**-126
#     bin k (2..255): 2**(k-128) <= |x| < 2**(k-127)
#     bin 256: inf or nan
N_BINS = 257
ZERO_BIN, SUBNORMAL_BIN, NONFINITE_BIN = 0, 1, 256
_BIAS = 128  # bin k starts at 2**(k - _BIAS): the float32 exponent bias + 1


def bin_of(exponent: int) -> int:
    """The bin of the values in ``[2**exponent, 2**(exponent+1))`` (``exponent`` from -126 to 127).

    >>> bin_of(0), bin_edges(bin_of(0))
    (128, (1.0, 2.0))
    """
    return exponent + _BIAS


def bin_edges(k: int) -> tuple[float, float]:
    """The magnitude range ``[lo, hi)`` of histogram bin ``k`` (bins 0 and 256 are special)."""
    if k == ZERO_BIN:
        return 0.0, 0.0
    if k == SUBNORMAL_BIN:
        return 0.0, FORMATS["fp32"].min_normal
    if k == NONFINITE_BIN:
        return float("inf"), float("inf")
    return 2.0 ** (k - _BIAS), 2.0 ** (k - _BIAS + 1)
