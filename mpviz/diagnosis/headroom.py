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

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..formats import FORMATS, N_BINS
from ..store import unpack_hist

HEADROOM_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
COLUMNS = ["step", "layer", "tensor", "format", "scale", "max_abs", "low_abs",
           "bits_to_overflow", "bits_to_underflow"]


def hist_percentile(counts: Iterable[int], q: float) -> float:
    """The lower edge of the histogram bin that holds the ``q``-th percentile (0-100) of the
    nonzero finite values (bins as in mpviz.stats); NaN when there are none."""
    c = np.asarray(list(counts), dtype=np.float64)
    if len(c) < N_BINS:
        c = np.pad(c, (0, N_BINS - len(c)))
    finite = c[1:256]
    total = finite.sum()
    if total <= 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(finite), q / 100.0 * total, side="left")) + 1
    k = min(max(k, 1), 255)
    return 2.0 ** -149 if k == 1 else 2.0 ** (k - 128)


def bits(fmt: str, max_abs: float, low_abs: float, scale: float = 1.0) -> tuple[float, float]:
    """(bits to overflow, bits to underflow) of a tensor against format ``fmt``."""
    f = FORMATS[fmt]
    over = math.log2(f.max / (scale * max_abs)) if max_abs > 0 and math.isfinite(max_abs) else (
        float("nan") if max_abs > 0 else float("inf"))
    under = math.log2(scale * low_abs / f.min_subnormal) if low_abs > 0 else float("nan")
    return over, under


def headroom(run: Any, formats: Iterable[str] = HEADROOM_FORMATS, percentile: float = 1.0,
             tensors: Iterable[str] = ("activation", "grad"), step: int | None = None) -> pd.DataFrame:
    """Headroom in bits per statistics step, layer, tensor and format (a long DataFrame with
    columns :data:`COLUMNS`). ``run``: a :class:`mpviz.Run` or its directory; ``percentile``:
    the low percentile of ``|x| != 0`` used for underflow; ``step``: only that statistics step.

        >>> h = mpviz.headroom(run)                                     # doctest: +SKIP
        >>> h[(h.format == "fp16") & (h.tensor == "grad")].groupby("layer").bits_to_overflow.min()
    """
    from ..run import Run, load_run

    run = run if isinstance(run, Run) else load_run(run)
    formats, tensors = list(formats), list(tensors)
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}: choose from {', '.join(FORMATS)}")
    where = "WHERE s.tensor IN (%s)" % ",".join("?" * len(tensors))
    params: list[Any] = list(tensors)
    if step is not None:
        where += " AND s.step = ?"
        params.append(int(step))
    df = run.query(
        "SELECT s.step, l.layer, s.tensor, s.max_abs, h.lo, h.counts, st.loss_scale "
        "FROM layer_stats s JOIN layers l ON l.idx = s.layer_idx "
        "LEFT JOIN histograms h ON h.step = s.step AND h.layer_idx = s.layer_idx AND h.tensor = s.tensor "
        f"LEFT JOIN steps st ON st.step = s.step {where} ORDER BY s.step, s.layer_idx",
        tuple(params))
    if not len(df):
        return pd.DataFrame(columns=COLUMNS)
    low = [hist_percentile(unpack_hist(int(lo), blob), percentile) if blob is not None
           else float("nan") for lo, blob in zip(df["lo"].fillna(0), df["counts"])]
    loss_scale = pd.to_numeric(df["loss_scale"], errors="coerce").fillna(1.0).to_numpy(dtype=float)
    scale = np.where(df["tensor"] == "grad", loss_scale, 1.0)
    base = pd.DataFrame({"step": df["step"], "layer": df["layer"], "tensor": df["tensor"],
                         "scale": scale,
                         "max_abs": pd.to_numeric(df["max_abs"], errors="coerce").astype(float), "low_abs": low})
    out = []
    for f in formats:
        fm = FORMATS[f]
        part = base.copy()
        part["format"] = f
        with np.errstate(divide="ignore", invalid="ignore"):
            mx = part["max_abs"].to_numpy(dtype=np.float64) * part["scale"].to_numpy()
            lo = part["low_abs"].to_numpy(dtype=np.float64) * part["scale"].to_numpy()
            part["bits_to_overflow"] = np.where(mx > 0, np.log2(fm.max / mx),
                                                np.where(mx == 0, np.inf, np.nan))
            part["bits_to_underflow"] = np.where(lo > 0, np.log2(lo / fm.min_subnormal), np.nan)
        out.append(part)
    return pd.concat(out, ignore_index=True)[COLUMNS]


def min_headroom(h: pd.DataFrame, fmt: str = "fp16", tensor: str = "activation",
                 since: int = 0) -> pd.DataFrame:
    """Per layer, the smallest bits to overflow / underflow over statistics steps >= ``since``."""
    h = h[(h["format"] == fmt) & (h["tensor"] == tensor) & (h["step"] >= since)]
    return h.groupby("layer", sort=False)[["bits_to_overflow", "bits_to_underflow"]].min()
