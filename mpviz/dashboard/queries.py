"""Plot-ready views of a run, decimated in SQL so a 100k-step run opens in seconds.

Every function takes a `mpviz.Run` (anything with `.query(sql, params)` returning a DataFrame
over the tables in docs/ARCHITECTURE.md) and a step range, and returns small pandas/numpy data.
Lines are downsampled by averaging buckets of steps; skipped steps and overflow events are never
downsampled (they are what a user looks for).

>>> import mpviz
>>> from mpviz.dashboard import queries
>>> run = mpviz.load_run("runs/demo")                        # doctest: +SKIP
>>> queries.step_view(run, 0, run.last_step, max_points=500)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

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
    df = run.query("SELECT MIN(step) AS lo, MAX(step) AS hi FROM steps")
    if df.empty or pd.isna(df["hi"].iloc[0]):
        return 0, -1
    return int(df["lo"].iloc[0]), int(df["hi"].iloc[0])


def step_view(run, lo: int, hi: int, max_points: int = 2000) -> pd.DataFrame:
    """Per-step series in [lo, hi], averaged over buckets of steps (min for the loss scale, so
    back-offs stay visible). Columns: step, loss, samples_per_s, loss_scale, wall_time."""
    k = bucket_size(lo, hi, max_points)
    df = run.query(
        "SELECT MIN(step) AS step, AVG(loss) AS loss, AVG(samples_per_s) AS samples_per_s, "
        "MIN(loss_scale) AS loss_scale, MAX(wall_time) AS wall_time "
        "FROM steps WHERE step BETWEEN ? AND ? GROUP BY (step - ?) / ? ORDER BY step",
        (lo, hi, lo, k),
    )
    for col in ("loss", "samples_per_s", "loss_scale", "wall_time"):
        vals = np.array(pd.to_numeric(df[col], errors="coerce"), dtype=float)  # a writable copy
        vals[~np.isfinite(vals)] = np.nan  # inf/nan become gaps, not broken axes
        df[col] = vals
    return df


def skipped_view(run, lo: int, hi: int) -> pd.DataFrame:
    """Every skipped step in [lo, hi] with the layer that caused it (first non-finite layer).

    Columns: step, loss_scale, culprit (e.g. "fc2 grad (backward)", or "?" if unattributed).
    """
    df = run.query(
        "SELECT s.step AS step, s.loss_scale AS loss_scale, l.layer AS layer, o.tensor AS tensor, "
        "o.phase AS phase FROM steps s "
        "LEFT JOIN overflows o ON o.step = s.step AND o.first = 1 "
        "LEFT JOIN layers l ON l.idx = o.layer_idx "
        "WHERE s.skipped = 1 AND s.step BETWEEN ? AND ? ORDER BY s.step",
        (lo, hi),
    )
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
    df = run.query(
        "SELECT p.step AS step, l.layer AS layer, p.precision AS precision FROM policy_changes p "
        "LEFT JOIN layers l ON l.idx = p.layer_idx WHERE p.step BETWEEN ? AND ? "
        "ORDER BY p.step, l.idx",
        (lo, hi),
    )
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


# Up to this many layer_stats rows a heatmap is the exact max per cell; above it, each cell is
# the max over SAMPLES_PER_CELL recorded steps spread over its bucket (an indexed lookup), so a
# 100k-step x 200-layer run draws in well under a second instead of scanning millions of rows.
EXACT_ROWS = 300_000
SAMPLES_PER_CELL = 8


def grad_heatmap(run, lo: int, hi: int, max_cells: int = MAX_HEATMAP_CELLS,
                 max_cols: int = 200) -> Heatmap:
    """log2 of the (unscaled) gradient norm per layer (rows) and step bucket (columns): the
    max over the bucket's recorded steps (sampled on very large runs, see EXACT_ROWS)."""
    n_layers = int(run.query("SELECT COUNT(*) AS n FROM layers WHERE n_params > 0")["n"].iloc[0] or 0)
    if n_layers == 0 or hi < lo:
        return Heatmap()
    cols = max(1, min(max_cols, max_cells // n_layers))
    k = bucket_size(lo, hi, cols)
    recorded = _recorded_steps(run, lo, hi)
    if recorded is None or len(recorded) * n_layers <= EXACT_ROWS:
        df = run.query(
            "SELECT layer_idx AS idx, (step - ?) / ? AS b, MAX(norm) AS norm FROM layer_stats "
            "WHERE tensor = 'grad' AND step BETWEEN ? AND ? GROUP BY layer_idx, b",
            (lo, k, lo, hi),
        )
    else:
        buckets = (recorded - lo) // k
        picked = []
        for b in np.unique(buckets):
            in_b = recorded[buckets == b]
            idx = np.linspace(0, len(in_b) - 1, min(SAMPLES_PER_CELL, len(in_b))).round().astype(int)
            picked.append(in_b[np.unique(idx)])
        steps = np.concatenate(picked)
        df = run.query(
            "SELECT layer_idx AS idx, step, norm FROM layer_stats WHERE tensor = 'grad' AND step IN "
            f"({','.join(str(int(x)) for x in steps)})")  # integers we computed: safe to inline
        df["b"] = (df["step"].to_numpy(dtype=np.int64) - lo) // k
        df = df.groupby(["idx", "b"], as_index=False)["norm"].max()
    names = _layer_names(run)
    col_ids, col_pos = np.unique(df["b"].to_numpy(dtype=np.int64), return_inverse=True)
    row_ids, row_pos = np.unique(df["idx"].to_numpy(dtype=np.int64), return_inverse=True)
    z = np.full((len(row_ids), len(col_ids)), np.nan)
    norm = np.array(pd.to_numeric(df["norm"], errors="coerce"), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z[row_pos, col_pos] = np.where(norm > 0, np.log2(norm), np.nan)
    z[~np.isfinite(z)] = np.nan
    return Heatmap([layer_label(names.get(int(i), str(i))) for i in row_ids], lo + col_ids * k, z)


def _recorded_steps(run, lo: int, hi: int) -> np.ndarray | None:
    """Steps in [lo, hi] with per-layer statistics: every `meta.every`-th step (the recorder's
    schedule); None if the run does not say. A run recorded with a statistics budget
    (`meta.stats_budget`, the default schedule) took only some of them: those are read from the
    layer_stats index, one lookup per step taken (a skip scan, not a scan of its rows)."""
    meta = run.query("SELECT key, value FROM meta WHERE key IN ('every', 'stats_budget')")
    kv = dict(zip(meta["key"], meta["value"]))
    try:
        n = int(json.loads(kv["every"]))
    except (KeyError, TypeError, ValueError):
        return None
    if json.loads(kv.get("stats_budget") or "null") is not None:
        steps = run.query(
            "WITH RECURSIVE s(step) AS (SELECT MIN(step) FROM layer_stats WHERE step >= ? "
            "UNION ALL SELECT (SELECT MIN(step) FROM layer_stats WHERE step > s.step) FROM s "
            "WHERE s.step IS NOT NULL AND s.step <= ?) SELECT step FROM s WHERE step <= ?",
            (int(lo), int(hi), int(hi)))["step"]
        return steps.dropna().to_numpy(dtype=np.int64)
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
    hi = upto if upto is not None else 2**62
    df = run.query(
        "SELECT d.layer_idx AS idx, d.tensor AS tensor, d.dtype AS dtype FROM dtypes d "
        "JOIN (SELECT layer_idx, tensor, MAX(step) AS step FROM dtypes WHERE step <= ? "
        "GROUP BY layer_idx, tensor) m "
        "ON m.layer_idx = d.layer_idx AND m.tensor = d.tensor AND m.step = d.step "
        "JOIN layers l ON l.idx = d.layer_idx WHERE l.is_leaf = 1",
        (hi,),
    )
    if df.empty:
        return DtypeMap()
    names = _layer_names(run)
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
    total = int(run.query("SELECT COUNT(*) AS n FROM overflows")["n"].iloc[0] or 0)
    df = run.query(
        "SELECT o.step AS step, l.layer AS layer, o.tensor AS tensor, o.phase AS phase, "
        "o.first AS first, o.nonfinite AS nonfinite, o.skipped AS skipped FROM overflows o "
        "LEFT JOIN layers l ON l.idx = o.layer_idx ORDER BY o.step DESC, o.first DESC LIMIT ?",
        (limit,),
    )
    df["layer"] = [layer_label(x) if isinstance(x, str) else "?" for x in df["layer"]]
    return df, total


def layer_table(run, effective: dict[str, tuple[str | None, str | None]] | None = None,
                base: str = "fp32") -> pd.DataFrame:
    """One row per module: layer, type, n_params, depth, is_leaf, precision (in force now),
    grad_norm (latest recorded, unscaled), headroom (binades between the latest activation
    max |x| and the largest finite value of the layer's precision; -inf once it overflowed)."""
    layers = run.query("SELECT idx, layer, type, n_params, depth, is_leaf FROM layers ORDER BY idx")
    last = run.query(
        "SELECT ls.layer_idx AS idx, ls.tensor AS tensor, ls.norm AS norm, ls.max_abs AS max_abs "
        "FROM layer_stats ls JOIN (SELECT layer_idx, tensor, MAX(step) AS step FROM layer_stats "
        "GROUP BY layer_idx, tensor) m ON m.layer_idx = ls.layer_idx AND m.tensor = ls.tensor "
        "AND m.step = ls.step"
    )
    is_grad, is_act = last["tensor"] == "grad", last["tensor"] == "activation"
    grad = dict(zip(last.loc[is_grad, "idx"], pd.to_numeric(last.loc[is_grad, "norm"], errors="coerce")))
    act = dict(zip(last.loc[is_act, "idx"], pd.to_numeric(last.loc[is_act, "max_abs"], errors="coerce")))
    effective = effective or {}
    rows = []
    for idx, name, typ, n_params, depth, leaf in zip(layers["idx"], layers["layer"], layers["type"],
                                                      layers["n_params"], layers["depth"], layers["is_leaf"]):
        prec = (effective.get(name) or (None, None))[0] or base
        rows.append((name, typ, int(n_params or 0), int(depth or 0), bool(leaf), prec,
                     float(grad.get(idx, np.nan)), headroom(act.get(idx, np.nan), prec)))
    return pd.DataFrame(rows, columns=["layer", "type", "n_params", "depth", "is_leaf", "precision",
                                       "grad_norm", "headroom"])


def headroom(max_abs: float, precision: str) -> float:
    """Binades between `max_abs` and the largest finite value of `precision` (nan if unknown).

    >>> round(headroom(1024.0, "fp16"), 3)   # 65504 / 1024 is just under 2**6
    5.999
    """
    if max_abs is None or np.isnan(max_abs) or max_abs <= 0:
        return float("nan")
    if not np.isfinite(max_abs):
        return float("-inf")
    return math.log2(FORMATS.get(precision, FORMATS["fp32"]).max / max_abs)


def layer_history(run, layer: str, lo: int, hi: int, max_points: int = 1000) -> pd.DataFrame:
    """One layer's statistics over [lo, hi] for the drill-down: step, tensor, norm, max_abs,
    min_abs_nonzero, zero_frac, nonfinite, underflow_fp16 (fraction), bucket-averaged."""
    k = bucket_size(lo, hi, max_points)
    idx = run.query("SELECT idx FROM layers WHERE layer = ?", (layer,))
    if idx.empty:
        raise ValueError(f"no layer {layer!r} in this run")
    # layer_idx first, so SQLite walks the (layer_idx, tensor, step) index, not the whole table.
    return run.query(
        "SELECT MIN(step) AS step, tensor, AVG(norm) AS norm, MAX(max_abs) AS max_abs, "
        "MIN(min_abs_nonzero) AS min_abs_nonzero, "
        "AVG(CAST(zeros AS REAL) / MAX(numel, 1)) AS zero_frac, SUM(nonfinite) AS nonfinite, "
        "AVG(CAST(underflow_fp16 AS REAL) / MAX(numel, 1)) AS underflow_fp16 "
        "FROM layer_stats WHERE layer_idx = ? AND step BETWEEN ? AND ? "
        "GROUP BY tensor, (step - ?) / ? ORDER BY tensor, step",
        (int(idx["idx"].iloc[0]), lo, hi, lo, k),
    )


def layer_summary(run) -> pd.DataFrame:
    """Per layer and tensor over the whole run: mean norm, max |x|, non-finite count, mean fp16
    underflow fraction. Used by the comparison table."""
    return run.query(
        "SELECT l.layer AS layer, ls.tensor AS tensor, AVG(ls.norm) AS norm, "
        "MAX(ls.max_abs) AS max_abs, SUM(ls.nonfinite) AS nonfinite, "
        "AVG(CAST(ls.underflow_fp16 AS REAL) / MAX(ls.numel, 1)) AS underflow_fp16 "
        "FROM layer_stats ls JOIN layers l ON l.idx = ls.layer_idx GROUP BY l.layer, ls.tensor"
    )


def _layer_names(run) -> dict[int, str]:
    df = run.query("SELECT idx, layer FROM layers")
    return {int(i): str(n) for i, n in zip(df["idx"], df["layer"])}


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
