"""Headroom in bits: how far each layer's activations and gradients are from the edges of a format.

    bits to overflow  = log2(format max / (scale * max|x|))
    bits to underflow = log2(scale * p-th percentile of |x| != 0 / format's smallest subnormal)

``scale`` is the loss scale in force at that step for gradients (recorded gradients are
unscaled; the backward computed them multiplied by it) and 1 for activations. A negative value
means that part of the tensor is already past the edge: "the scale can double 3 more times
before the gradients of "fc1" overflow fp16" is ``floor(bits_to_overflow) == 3``.

Nothing extra is recorded for this: ``max|x|`` is the exact one of ``layer_stats``, and the low
percentile is read from the recorded log2 histogram, as the lower edge of the binade that holds
it (so ``bits_to_underflow`` is a whole number, rounded down: at most one bit pessimistic).
Tensors above 4,096 elements have histograms taken from a strided sample (see mpviz.stats).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..formats import FORMATS, NONFINITE_BIN, SUBNORMAL_BIN, bin_of
from ..run import Run, hist_chunks, load_run

HEADROOM_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
COLUMNS = ["step", "layer", "tensor", "format", "scale", "max_abs", "low_abs",
           "bits_to_overflow", "bits_to_underflow"]


def hist_percentiles(counts: np.ndarray, q: float) -> np.ndarray:
    """Per row of ``counts`` (histograms, bins as in mpviz.formats), the lower edge of the bin
    that holds the ``q``-th percentile (0-100) of the nonzero finite values; NaN for a row
    that has none."""
    cum = np.cumsum(counts[:, SUBNORMAL_BIN:NONFINITE_BIN], axis=1)   # int64: exact
    total = cum[:, -1]
    # the first bin whose running count reaches q% of the total (np.searchsorted, side="left")
    k = np.clip((cum < (q / 100.0 * total)[:, None]).sum(axis=1) + SUBNORMAL_BIN,
                SUBNORMAL_BIN, NONFINITE_BIN - 1)
    # the subnormal bin's lower edge is 0: its smallest value instead, so that log2 works
    low = np.where(k == SUBNORMAL_BIN, FORMATS["fp32"].min_subnormal, np.ldexp(1.0, k - bin_of(0)))
    return np.where(total > 0, low, np.nan)


def check_formats(formats: Iterable[str]) -> None:
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}: choose from {', '.join(FORMATS)}")


def bits(fmt: str, max_abs: Any, low_abs: Any, scale: Any = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bits to overflow, bits to underflow) against format ``fmt`` (numbers or arrays).

    Overflow: ``inf`` for an all-zero tensor (max 0), ``-inf`` for one that holds inf, NaN when
    unknown; underflow: NaN without a nonzero value."""
    f = FORMATS[fmt]
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = np.asarray(max_abs, dtype=np.float64) * scale
        lo = np.asarray(low_abs, dtype=np.float64) * scale
        over = np.where(mx > 0, np.log2(f.max / mx), np.where(mx == 0, np.inf, np.nan))
        under = np.where(lo > 0, np.log2(lo / f.min_subnormal), np.nan)
    return over, under


def headroom(run: Any, formats: Iterable[str] = HEADROOM_FORMATS, percentile: float = 1.0,
             tensors: Iterable[str] = ("activation", "grad"), step: int | None = None) -> pd.DataFrame:
    """Headroom in bits per statistics step, layer, tensor and format (a long DataFrame with
    columns :data:`COLUMNS`). ``run``: a :class:`mpviz.Run` or its directory; ``percentile``:
    the low percentile of ``|x| != 0`` used for underflow; ``step``: only that statistics step.

        >>> h = mpviz.headroom(run)                                     # doctest: +SKIP
        >>> h[(h.format == "fp16") & (h.tensor == "grad")].groupby("layer").bits_to_overflow.min()
    """
    formats, tensors = list(formats), list(tensors)
    own = not isinstance(run, Run)
    run = load_run(run) if own else run
    try:
        check_formats(formats)
        df = run.stats_with_histograms(tensors, step)
    finally:
        if own:
            run.close()
    if not len(df):
        return pd.DataFrame(columns=COLUMNS)
    low = np.full(len(df), np.nan)
    have = np.flatnonzero(df["counts"].notna().to_numpy())   # rows with a histogram
    for rows, counts in hist_chunks(df["lo"].to_numpy()[have], df["counts"].to_numpy()[have]):
        low[have[rows]] = hist_percentiles(counts, percentile)
    loss_scale = pd.to_numeric(df["loss_scale"], errors="coerce").fillna(1.0).to_numpy(dtype=float)
    scale = np.where(df["tensor"] == "grad", loss_scale, 1.0)
    base = pd.DataFrame({"step": df["step"], "layer": df["layer"], "tensor": df["tensor"],
                         "scale": scale,
                         "max_abs": pd.to_numeric(df["max_abs"], errors="coerce").astype(float), "low_abs": low})
    out = []
    for f in formats:
        part = base.copy()
        part["format"] = f
        part["bits_to_overflow"], part["bits_to_underflow"] = bits(f, base["max_abs"], low, scale)
        out.append(part)
    return pd.concat(out, ignore_index=True)[COLUMNS]

