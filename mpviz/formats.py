"""Floating-point formats as plain numbers (no torch import), for range and headroom plots."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FloatFormat:
    """A binary float format: the largest finite value and the smallest normal/subnormal magnitudes.

    >>> FORMATS["fp16"].max
    65504.0
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    min_normal: float
    min_subnormal: float

    def log2_range(self) -> tuple[int, int]:
        """Exponents (log2) of the smallest subnormal and of the largest finite value."""
        import math

        return math.floor(math.log2(self.min_subnormal)), math.floor(math.log2(self.max))


FORMATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat("fp32", 8, 23, 3.4028234663852886e38, 2.0**-126, 2.0**-149),
    "fp16": FloatFormat("fp16", 5, 10, 65504.0, 2.0**-14, 2.0**-24),
    "bf16": FloatFormat("bf16", 8, 7, 3.3895313892515355e38, 2.0**-126, 2.0**-133),
    "fp8_e4m3": FloatFormat("fp8_e4m3", 4, 3, 448.0, 2.0**-6, 2.0**-9),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 5, 2, 57344.0, 2.0**-14, 2.0**-16),
}


# The log2 magnitude histogram recorded per layer (bins documented in mpviz.stats).
N_BINS = 257


def bin_edges(k: int) -> tuple[float, float]:
    """The magnitude range ``[lo, hi)`` of histogram bin ``k`` (bins 0 and 256 are special)."""
    if k == 0:
        return 0.0, 0.0
    if k == 1:
        return 0.0, 2.0 ** -126
    if k == 256:
        return float("inf"), float("inf")
    return 2.0 ** (k - 128), 2.0 ** (k - 127)
