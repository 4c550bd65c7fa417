"""``Run``: read a recorded run (finished, or still being written) as pandas DataFrames.

    >>> run = mpviz.load_run("runs/exp1")            # doctest: +SKIP
    >>> run.steps[["step", "loss", "loss_scale"]]     # doctest: +SKIP

Every property re-reads the store, so a live run grows between reads. No torch import.
"""
from __future__ import annotations

import difflib
import json
import threading
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .formats import bin_edges
from .store import connect_readonly, db_path, unpack_hist

_STATS_SELECT = """
SELECT s.step, l.layer, s.tensor, s.dtype, s.norm, s.max_abs, s.min_abs_nonzero,
       CAST(s.zeros AS REAL) / s.numel AS zero_frac, s.nonfinite,
       CAST(s.underflow_fp16 AS REAL) / s.numel AS underflow_fp16,
       CAST(s.overflow_fp16 AS REAL) / s.numel AS overflow_fp16,
       CAST(s.underflow_bf16 AS REAL) / s.numel AS underflow_bf16,
       CAST(s.overflow_bf16 AS REAL) / s.numel AS overflow_bf16,
       s.numel
FROM layer_stats s JOIN layers l ON l.idx = s.layer_idx
"""

TENSORS = ("activation", "grad", "weight")  # what layer_stats and histograms rows describe


def _did_you_mean(name: str, names: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, [n for n in names if n], n=3)
    return f"; close matches: {', '.join(map(repr, close))}." if close else "."


class Run:
    """A recorded run. Use :func:`load_run` (or ``Recorder.run`` for the live one)."""

    def __init__(self, path: str | Path, rank: int = 0,
                 before_read: Callable[[], None] | None = None) -> None:
        self.path = db_path(path, rank)
        self.run_dir = self.path.parent
        self._before_read = before_read
        self._con = connect_readonly(self.path)
        self._lock = threading.Lock()  # one sqlite connection, possibly several UI threads

    def __repr__(self) -> str:
        return f"<mpviz.Run {str(self.run_dir)!r} steps={self.last_step + 1} {self.meta.get('status')}>"

    def query(self, sql: str, params: tuple | dict = ()) -> pd.DataFrame:
        """Raw SQL over the store's tables (see docs/ARCHITECTURE.md) as a DataFrame."""
        if self._before_read is not None:
            self._before_read()
        with self._lock:
            return pd.read_sql_query(sql, self._con, params=params)

    def _scalar(self, sql: str, params: tuple = ()) -> Any:
        if self._before_read is not None:
            self._before_read()
        with self._lock:
            row = self._con.execute(sql, params).fetchone()
        return row[0] if row else None

    @property
    def meta(self) -> dict[str, Any]:
        df = self.query("SELECT key, value FROM meta")
        return {k: json.loads(v) for k, v in zip(df["key"], df["value"])}

    @property
    def is_live(self) -> bool:
        """True while the recording process says it is running (it may have been killed)."""
        return self.meta.get("status") == "running"

    @property
    def last_step(self) -> int:
        v = self._scalar("SELECT MAX(step) FROM steps")
        return -1 if v is None else int(v)

    @property
    def layers(self) -> pd.DataFrame:
        df = self.query("SELECT layer, type, n_params, param_dtype, depth, is_leaf FROM layers "
                        "ORDER BY idx")
        df["is_leaf"] = df["is_leaf"].astype(bool)
        return df

    @property
    def steps(self) -> pd.DataFrame:
        return self.steps_since(-1)

    def steps_since(self, step: int) -> pd.DataFrame:
        """Steps after ``step`` (use the last step you have seen to follow a live run)."""
        df = self.query("SELECT * FROM steps WHERE step > ? ORDER BY step", (int(step),))
        for col in ("skipped", "nonfinite_grads"):
            df[col] = df[col].astype(bool)
        return df

    @property
    def layer_stats(self) -> pd.DataFrame:
        return self.layer_stats_since(-1)

    def layer_stats_since(self, step: int, tensor: str | None = None) -> pd.DataFrame:
        sql = _STATS_SELECT + " WHERE s.step > ?"
        params: tuple = (int(step),)
        if tensor is not None:
            sql += " AND s.tensor = ?"
            params += (tensor,)
        return self.query(sql + " ORDER BY s.step, s.layer_idx, s.tensor", params)

    def layer_history(self, layer: str, tensor: str = "grad") -> pd.DataFrame:
        """One layer's statistics over time (the explorer's drill-down)."""
        return self.query(_STATS_SELECT + " WHERE l.layer = ? AND s.tensor = ? ORDER BY s.step",
                          (layer, tensor))

    def histogram(self, layer: str, tensor: str = "grad", step: int | None = None) -> pd.DataFrame:
        """The log2 magnitude histogram of one layer's tensor at ``step`` (default: the last
        recorded): columns ``lo, hi`` (magnitude range of the bin) and ``count``. Zeros have
        ``lo == hi == 0`` and inf/nan ``lo == hi == inf`` (see mpviz.stats for the bins);
        ``df.attrs["step"]`` is the step it was recorded at.

        Histograms exist only on statistics steps (every ``meta["every"]`` steps). Raises
        ``ValueError``, never an empty frame: for a ``layer`` or ``tensor`` (``activation``,
        ``grad``, ``weight``) the run does not have, naming close matches; for a ``step``
        without this histogram, naming the nearest steps that have one; when the layer has no
        such histogram at all (a ReLU has no ``weight``) or none is recorded yet.

            >>> run.histogram("fc1", "grad", step=10)   # doctest: +SKIP
        """
        if tensor not in TENSORS:
            raise ValueError(f"unknown tensor {tensor!r}: choose one of {', '.join(TENSORS)}"
                             f"{_did_you_mean(tensor, TENSORS)}")
        idx = self._scalar("SELECT idx FROM layers WHERE layer = ?", (layer,))
        if idx is None:
            names = self.layers["layer"].tolist()
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"no layer {layer!r} in run {str(self.run_dir)!r}"
                             f"{_did_you_mean(layer, names)} Layers are run.layers['layer'] "
                             f"(named_modules() names, '' is the model itself): {shown}")
        where = "FROM histograms WHERE layer_idx = ? AND tensor = ?"
        key: tuple = (int(idx), tensor)
        at = self._scalar(f"SELECT MAX(step) {where}" + (" AND step = ?" if step is not None else ""),
                          key + ((int(step),) if step is not None else ()))
        if at is None:
            if step is not None and self._scalar(f"SELECT 1 {where} LIMIT 1", key) is not None:
                before = self._scalar(f"SELECT MAX(step) {where} AND step < ?", key + (int(step),))
                after = self._scalar(f"SELECT MIN(step) {where} AND step > ?", key + (int(step),))
                near = " and ".join(str(s) for s in (before, after) if s is not None)
                raise ValueError(
                    f"no {tensor} histogram of {layer!r} at step {step}: histograms are recorded "
                    f"on statistics steps (every {self.meta.get('every')} steps); nearest: {near}")
            has = self.query("SELECT DISTINCT tensor FROM histograms WHERE layer_idx = ?",
                             (int(idx),))["tensor"].tolist()
            raise ValueError(
                f"no {tensor} histogram of {layer!r} in this run"
                + (f" (it has {', '.join(sorted(has))})" if has else
                   " (none of its tensors has one: no statistics step of it recorded yet?)"))
        df = self.query(f"SELECT lo, counts {where} AND step = ?", key + (int(at),))
        counts = unpack_hist(int(df["lo"].iloc[0]), df["counts"].iloc[0])
        rows = [(*bin_edges(k), c) for k, c in enumerate(counts) if c]
        out = pd.DataFrame(rows, columns=["lo", "hi", "count"])
        out.attrs["step"] = int(at)
        return out

    @property
    def overflows(self) -> pd.DataFrame:
        df = self.query("SELECT o.step, l.layer, o.tensor, o.phase, o.first, o.nonfinite, o.skipped "
                        "FROM overflows o JOIN layers l ON l.idx = o.layer_idx "
                        "ORDER BY o.step, o.rowid")
        for col in ("first", "skipped"):
            df[col] = df[col].astype(bool)
        return df

    @property
    def dtypes(self) -> pd.DataFrame:
        """A row each time a layer's input/output/weight/grad dtype changed (first step included)."""
        return self.query("SELECT d.step, l.layer, d.tensor, d.dtype FROM dtypes d "
                          "JOIN layers l ON l.idx = d.layer_idx ORDER BY d.step, d.rowid")

    def dtype_map(self, step: int | None = None) -> pd.DataFrame:
        """layer x tensor table of the dtypes in force at ``step`` (default: the last)."""
        df = self.dtypes
        if step is not None:
            df = df[df["step"] <= step]
        last = df.groupby(["layer", "tensor"], sort=False)["dtype"].last()
        return last.unstack("tensor")

    @property
    def policy_changes(self) -> pd.DataFrame:
        return self.query("SELECT p.step, l.layer, p.precision, p.rule FROM policy_changes p "
                          "JOIN layers l ON l.idx = p.layer_idx ORDER BY p.step, p.rowid")

    @property
    def steer_requests(self) -> pd.DataFrame:
        """Precision changes other processes asked for (:func:`mpviz.steer`): ``id, time, rules,
        status`` (pending / applied / refused), ``step`` (applied: the first step run with it),
        ``reason`` (why it was refused). Empty for a run nobody steered."""
        from .mailbox import steer_requests

        return steer_requests(self.run_dir)

    def close(self) -> None:
        with self._lock:
            self._con.close()


def load_run(path: str | Path, rank: int = 0) -> Run:
    """Open a run directory written by :class:`mpviz.Recorder` (while it trains, or later).

    >>> run = mpviz.load_run("runs/exp1")   # doctest: +SKIP
    """
    return Run(path, rank=rank)


def list_runs(root: str | Path = "runs") -> list[Path]:
    """Run directories under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dbs = [p for p in root.glob("*/run.db")]
    return [p.parent for p in sorted(dbs, key=lambda p: p.stat().st_mtime, reverse=True)]

