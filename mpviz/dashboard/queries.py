"""Plot-ready views of a run: how many points, which steps, what labels, over `mpviz.Run`'s
bucketed reads (a 100k-step run opens in well under a second). Lines average buckets of steps;
skipped steps and overflow events are never downsampled (they are what a user looks for).

>>> run = mpviz.load_run("runs/demo")                        # doctest: +SKIP
>>> queries.step_view(run, 0, run.last_step, max_points=500)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mpviz.diagnosis.headroom import bits
from mpviz.formats import DTYPE_PRECISION, FORMATS, PRECISIONS, dtype_name  # no torch import
# Whether a run's writer is gone, and the status to show: one check for `mpviz info`, the
# steering mailbox and the apps (it lives in the core package: the apps' extras are optional).
from mpviz.mailbox import process_gone, run_status  # noqa: F401


# Heatmaps are sent as JSON (~20 B/cell): keep each update under ~20k cells.
MAX_HEATMAP_CELLS = 20_000


def layer_label(name: str) -> str:
    """Display name of a layer: the root module ("") shows as "(model)"."""
    return name if name else "(model)"


def bucket_size(lo: int, hi: int, max_points: int) -> int:
    """Steps per displayed point so that [lo, hi] fits in `max_points` points.

    >>> bucket_size(0, 99_999, 2000)
    50
    """
    n = max(0, hi - lo + 1)
    return max(1, math.ceil(n / max(1, max_points)))


def step_range(run) -> tuple[int, int]:
    """(first, last) recorded step, (0, -1) for an empty run."""
    return run.step_range()


def step_view(run, lo: int, hi: int, max_points: int = 2000) -> pd.DataFrame:
    """Per-step series in [lo, hi], averaged over buckets of steps (min for the loss scale, so
    back-offs stay visible). Columns: step, loss, samples_per_s, loss_scale, wall_time."""
    df = run.step_buckets(lo, hi, bucket_size(lo, hi, max_points))
    for col in ("loss", "samples_per_s", "loss_scale", "wall_time"):
        vals = np.array(pd.to_numeric(df[col], errors="coerce"), dtype=float)  # a writable copy
        vals[~np.isfinite(vals)] = np.nan  # inf/nan become gaps, not broken axes
        df[col] = vals
    return df


def skipped_view(run, lo: int, hi: int) -> pd.DataFrame:
    """Every skipped step in [lo, hi] with the layer that caused it (first non-finite layer).

    Columns: step, loss_scale, culprit (e.g. "fc2 grad (backward)", or "?" if unattributed).
    """
    df = run.skipped_steps(lo, hi)
    if df.empty:
        return pd.DataFrame({"step": [], "loss_scale": [], "culprit": []})
    culprit = [
        "?" if pd.isna(layer) else f"{layer_label(layer)} {tensor} ({phase})"
        for layer, tensor, phase in zip(df["layer"], df["tensor"], df["phase"])
    ]
    out = df.groupby("step", as_index=False).agg(loss_scale=("loss_scale", "first"))
    out["culprit"] = pd.Series(culprit, index=df.index).groupby(df["step"]).agg(
        lambda c: ", ".join(dict.fromkeys(c))).to_numpy()
    return out


def policy_marks(run, lo: int, hi: int) -> pd.DataFrame:
    """Policy changes in [lo, hi], one row per step: step, text ("head → fp32<br>...")."""
    df = run.policy_changes_in(lo, hi)
    if df.empty:
        return pd.DataFrame({"step": [], "text": []})
    rows = []
    for step, grp in df.groupby("step", sort=True):
        items = [f"{layer_label(str(l) if l is not None else '?')} → {p}"
                 for l, p in zip(grp["layer"], grp["precision"])]
        if len(items) > 6:  # hover boxes stay readable
            items = items[:6] + [f"... {len(items) - 6} more"]
        rows.append((int(step), "<br>".join(items)))
    return pd.DataFrame(rows, columns=["step", "text"])


@dataclass
class Heatmap:
    """log2 of a per-layer statistic, layers (rows) x step buckets (columns)."""

    layers: list[str] = field(default_factory=list)
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


# Up to this many statistics rows a heatmap is the exact max per cell; above it, each cell is
# the max over SAMPLES_PER_CELL recorded steps spread over its bucket (an indexed lookup), so a
# 100k-step x 200-layer run draws in well under a second instead of scanning millions of rows.
EXACT_ROWS = 300_000
SAMPLES_PER_CELL = 8


def grad_heatmap(run, lo: int, hi: int, max_cells: int = MAX_HEATMAP_CELLS,
                 max_cols: int = 200) -> Heatmap:
    """log2 of the (unscaled) gradient norm per layer (rows) and step bucket (columns): the
    max over the bucket's recorded steps (sampled on very large runs, see EXACT_ROWS)."""
    n_layers = run.n_param_layers()
    if n_layers == 0 or hi < lo:
        return Heatmap()
    cols = max(1, min(max_cols, max_cells // n_layers))
    k = bucket_size(lo, hi, cols)
    recorded = _recorded_steps(run, lo, hi)
    if recorded is None or len(recorded) * n_layers <= EXACT_ROWS:
        df = run.grad_norm_buckets(lo, hi, k)
    else:
        df = run.grad_norms_at(_sample_buckets(recorded, lo, k))
        df["b"] = (df["step"].to_numpy(dtype=np.int64) - lo) // k
        df = df.groupby(["idx", "b"], as_index=False)["norm"].max()
    names = run.layer_names()
    col_ids, col_pos = np.unique(df["b"].to_numpy(dtype=np.int64), return_inverse=True)
    row_ids, row_pos = np.unique(df["idx"].to_numpy(dtype=np.int64), return_inverse=True)
    z = np.full((len(row_ids), len(col_ids)), np.nan)
    norm = np.array(pd.to_numeric(df["norm"], errors="coerce"), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z[row_pos, col_pos] = np.where(norm > 0, np.log2(norm), np.nan)
    z[~np.isfinite(z)] = np.nan
    return Heatmap([layer_label(names.get(int(i), str(i))) for i in row_ids], lo + col_ids * k, z)


def _sample_buckets(recorded: np.ndarray, lo: int, k: int) -> np.ndarray:
    """At most SAMPLES_PER_CELL of the `recorded` steps of each bucket of `k` steps, evenly spread."""
    buckets = (recorded - lo) // k
    picked = []
    for b in np.unique(buckets):
        in_b = recorded[buckets == b]
        idx = np.linspace(0, len(in_b) - 1, min(SAMPLES_PER_CELL, len(in_b))).round().astype(int)
        picked.append(in_b[np.unique(idx)])
    return np.concatenate(picked)


def _recorded_steps(run, lo: int, hi: int) -> np.ndarray | None:
    """Steps in [lo, hi] with per-layer statistics: every `meta.every`-th step (the recorder's
    schedule); None if the run does not say. A run recorded with a statistics budget
    (`meta.stats_budget`, the default schedule) took only some of them: those the store has."""
    meta = run.meta
    try:
        n = int(meta["every"])
    except (KeyError, TypeError, ValueError):
        return None
    if meta.get("stats_budget") is not None:
        return run.stats_steps(lo, hi)
    first = lo + (-lo) % n
    return np.arange(first, hi + 1, n, dtype=np.int64)


DTYPE_KINDS = ("input", "output", "weight", "grad")


@dataclass
class DtypeMap:
    """Latest dtype per layer (rows) and tensor kind (columns), with numeric codes for colour."""

    layers: list[str] = field(default_factory=list)
    kinds: tuple[str, ...] = DTYPE_KINDS
    names: list[list[str]] = field(default_factory=list)
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def dtype_map(run, upto: int | None = None) -> DtypeMap:
    """The dtypes each leaf layer ran with at step `upto` (default: latest): input, output,
    weight, grad. Containers are left out: their rows repeat their children's."""
    df = run.leaf_dtypes(upto)
    if df.empty:
        return DtypeMap()
    names = run.layer_names()
    idxs = sorted(set(int(i) for i in df["idx"]))
    pos = {i: r for r, i in enumerate(idxs)}
    table = [["" for _ in DTYPE_KINDS] for _ in idxs]
    codes = np.full((len(idxs), len(DTYPE_KINDS)), np.nan)
    for idx, tensor, dtype in zip(df["idx"], df["tensor"], df["dtype"]):
        if tensor not in DTYPE_KINDS:
            continue
        name = dtype_name(str(dtype))  # (str: a missing dtype reads "None")
        precision = DTYPE_PRECISION.get(name)
        r, c = pos[int(idx)], DTYPE_KINDS.index(tensor)
        table[r][c] = precision or name
        # colour code: the precision's place in PRECISIONS, len(PRECISIONS) for any other dtype
        codes[r, c] = PRECISIONS.index(precision) if precision else len(PRECISIONS)
    return DtypeMap([layer_label(names.get(i, str(i))) for i in idxs], DTYPE_KINDS, table, codes)


def overflow_table(run, limit: int = 50) -> tuple[pd.DataFrame, int]:
    """The latest `limit` overflow events (newest first) and the total number of events."""
    total = run.overflow_count()
    df = run.latest_overflows(limit)
    df["layer"] = [layer_label(x) if isinstance(x, str) else "?" for x in df["layer"]]
    return df, total


def layer_table(run, effective: dict[str, tuple[str | None, str | None]] | None = None,
                base: str = "fp32") -> pd.DataFrame:
    """One row per module: layer, type, n_params, depth, is_leaf, precision (in force now),
    grad_norm (latest recorded, unscaled), headroom (bits between the latest activation max |x|
    and the largest finite value of the layer's precision; -inf once it overflowed; NaN when
    unknown or all zero)."""
    layers = run.layers
    last = run.latest_stats()
    is_grad, is_act = last["tensor"] == "grad", last["tensor"] == "activation"
    grad = dict(zip(last.loc[is_grad, "layer"], pd.to_numeric(last.loc[is_grad, "norm"], errors="coerce")))
    act = dict(zip(last.loc[is_act, "layer"], pd.to_numeric(last.loc[is_act, "max_abs"], errors="coerce")))
    effective = effective or {}
    rows = []
    for name, typ, n_params, depth, leaf in zip(layers["layer"], layers["type"], layers["n_params"],
                                                 layers["depth"], layers["is_leaf"]):
        prec = (effective.get(name) or (None, None))[0] or base
        rows.append((name, typ, int(n_params or 0), int(depth or 0), bool(leaf), prec,
                     float(grad.get(name, np.nan)), _headroom(act.get(name, np.nan), prec)))
    return pd.DataFrame(rows, columns=["layer", "type", "n_params", "depth", "is_leaf", "precision",
                                       "grad_norm", "headroom"])


def _headroom(max_abs: float, precision: str) -> float:
    """Bits to overflow the layer's precision (fp32 for any other name); NaN, not inf, for an
    all-zero output: the table shows "–" there, not "overflow".

    >>> round(_headroom(1024.0, "fp16"), 3)   # 65504 / 1024 is just under 2**6
    5.999
    """
    if max_abs == 0:
        return float("nan")
    return float(bits(precision if precision in FORMATS else "fp32", max_abs, np.nan)[0])


def layer_history(run, layer: str, lo: int, hi: int, max_points: int = 1000) -> pd.DataFrame:
    """One layer's statistics over [lo, hi] for the drill-down: step, tensor, norm, max_abs,
    min_abs_nonzero, zero_frac, nonfinite, underflow_fp16 (fraction), bucket-averaged."""
    return run.layer_buckets(layer, lo, hi, bucket_size(lo, hi, max_points))


def layer_summary(run) -> pd.DataFrame:
    """Per layer and tensor over the whole run: mean norm, max |x|, non-finite count, mean fp16
    underflow fraction. Used by the comparison table."""
    return run.layer_summary()


@dataclass
class Snapshot:
    """Everything the run figure shows for one run and step range."""

    lo: int
    hi: int
    steps: pd.DataFrame
    skipped: pd.DataFrame
    marks: pd.DataFrame
    dtypes: DtypeMap | None = None
    heat: Heatmap | None = None


def snapshot(run, lo: int | None = None, hi: int | None = None, max_points: int = 2000,
             detail: bool = True) -> Snapshot:
    """Decimated views of `run` over [lo, hi] (default: the whole run). `detail` adds the dtype
    map and the gradient heatmap (the lab shows them for its first run only)."""
    first, last = step_range(run)
    lo = first if lo is None else max(lo, 0)
    hi = last if hi is None else hi
    snap = Snapshot(lo, hi, step_view(run, lo, hi, max_points), skipped_view(run, lo, hi),
                    policy_marks(run, lo, hi))
    if detail:
        snap.dtypes = dtype_map(run, hi if hi >= 0 else None)
        snap.heat = grad_heatmap(run, lo, hi)
    return snap
