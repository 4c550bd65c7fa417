"""``Run``: read a recorded run (finished, or still being written) as pandas DataFrames.

    >>> run = mpviz.load_run("runs/exp1")            # doctest: +SKIP
    >>> run.steps[["step", "loss", "loss_scale"]]     # doctest: +SKIP

Every property re-reads the store, so a live run grows between reads. No torch import.

A distributed job writes one store per rank into its run directory (``run.db`` for rank 0,
``run-rank{r}.db`` for rank r). ``load_run(run_dir)`` reads every rank found there: the per-step
tables (steps, layer_stats, overflows, dtypes, policy_changes, layer_history) get a ``rank``
column (0 for a single-process run); ``load_run(run_dir, rank=r)`` reads one rank. ``layers``,
``meta``, ``histogram`` and raw SQL (``query``, which the dashboards use) read one store: the
selected rank's, or the lowest rank found (rank 0).
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .formats import bin_edges, did_you_mean
from .store import DB_NAME, connect_readonly, db_path, unpack_hist

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


_RANK_FILE = re.compile(r"run-rank(\d+)\.db")


def rank_stores(run_dir: str | Path) -> dict[int, Path]:
    """The store file of each rank found in ``run_dir``, by rank (rank 0 is ``run.db``)."""
    p = Path(run_dir)
    found = {0: p / DB_NAME} if (p / DB_NAME).exists() else {}
    for f in p.glob("run-rank*.db"):
        m = _RANK_FILE.fullmatch(f.name)
        if m:
            found[int(m.group(1))] = f
    return dict(sorted(found.items()))


def _schedule(meta: dict[str, Any]) -> str:
    """The statistics schedule a run was recorded with, in words."""
    every, budget = meta.get("every"), meta.get("stats_budget")
    if budget is None:
        return f"every {every} steps"
    return (f"at most every {every} steps, fewer when they cost more than {budget:.0%} of "
            "the training time")


def _hint(name: str, names: list[str] | tuple[str, ...]) -> str:
    """The end of an unknown-name sentence: ``"; close matches: 'fc1'."`` or ``"."``."""
    close = did_you_mean(name, names)
    return f"; {close}." if close else "."


class Run:
    """A recorded run. Use :func:`load_run` (or ``Recorder.run`` for the live one)."""

    def __init__(self, path: str | Path, rank: int | None = None,
                 before_read: Callable[[], None] | None = None) -> None:
        p = Path(path)
        if p.suffix == ".db":  # one store file
            m = _RANK_FILE.fullmatch(p.name)
            rank = int(m.group(1)) if m else 0
            stores = {rank: p}
        elif rank is not None:
            stores = {int(rank): db_path(p, int(rank))}
        else:  # every rank found (none: rank 0's path, which says clearly that it is missing)
            stores = rank_stores(p) or {0: db_path(p)}
        self.rank = rank  # None: all ranks
        self.ranks = list(stores)
        self.path = stores[self.ranks[0]]
        self.run_dir = self.path.parent
        self._before_read = before_read
        self._cons: dict[int, sqlite3.Connection] = {}
        try:
            for r, f in stores.items():
                self._cons[r] = connect_readonly(f)
        except BaseException:
            for con in self._cons.values():
                con.close()
            raise
        self._con = self._cons[self.ranks[0]]
        self._lock = threading.Lock()  # sqlite connections, possibly several UI threads

    def __repr__(self) -> str:
        return f"<mpviz.Run {str(self.run_dir)!r} steps={self.last_step + 1} {self.meta.get('status')}>"

    def query(self, sql: str, params: tuple | dict = ()) -> pd.DataFrame:
        """Raw SQL over one store's tables (see docs/ARCHITECTURE.md) as a DataFrame: the
        selected rank's, or the lowest rank's (rank 0) when the run was loaded with all ranks."""
        if self._before_read is not None:
            self._before_read()
        with self._lock:
            return pd.read_sql_query(sql, self._con, params=params)

    def _ranks_query(self, sql: str, params: tuple = (),
                     fix: Callable[[sqlite3.Connection, str], str] | None = None) -> pd.DataFrame:
        """``sql`` on every rank's store, with a ``rank`` column first, ordered by step then rank
        (each rank's own order kept within a step)."""
        if self._before_read is not None:
            self._before_read()
        frames = []
        with self._lock:
            for r, con in self._cons.items():
                df = pd.read_sql_query(fix(con, sql) if fix else sql, con, params=params)
                df.insert(0, "rank", r)
                frames.append(df)
        if len(frames) == 1:
            return frames[0]
        full = [f for f in frames if len(f)] or frames[:1]
        df = pd.concat(full, ignore_index=True)
        return df.sort_values(["step", "rank"], kind="stable", ignore_index=True)

    def for_rank(self, rank: int) -> "Run":
        """This run's store of one rank (a new :class:`Run`; close it when done)."""
        return Run(self.run_dir, rank=rank)

    @property
    def world_size(self) -> int:
        """How many ranks the job had (``meta["world_size"]``; 1 for a single process)."""
        return int(self.meta.get("world_size") or 1)

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
    def stats_schedule(self) -> str:
        """The statistics schedule this run was recorded with, in words ("every 10 steps", or
        "at most every 10 steps, fewer when they cost more than 5% of the training time")."""
        return _schedule(self.meta)

    @property
    def is_live(self) -> bool:
        """True while the recording process says it is running (it may have been killed)."""
        return self.meta.get("status") == "running"

    @property
    def last_step(self) -> int:
        """The last step recorded (by any rank read)."""
        if len(self._cons) == 1:
            v = self._scalar("SELECT MAX(step) FROM steps")
            return -1 if v is None else int(v)
        df = self._ranks_query("SELECT MAX(step) AS step FROM steps")
        v = df["step"].max()
        return -1 if pd.isna(v) else int(v)

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
        df = self._ranks_query("SELECT * FROM steps WHERE step > ? ORDER BY step", (int(step),))
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
        return self._ranks_query(sql + " ORDER BY s.step, s.layer_idx, s.tensor", params)

    def layer_history(self, layer: str, tensor: str = "grad") -> pd.DataFrame:
        """One layer's statistics over time (the explorer's drill-down)."""
        return self._ranks_query(_STATS_SELECT + " WHERE l.layer = ? AND s.tensor = ? ORDER BY s.step",
                                 (layer, tensor))

    def histogram(self, layer: str, tensor: str = "grad", step: int | None = None,
                  rank: int | None = None) -> pd.DataFrame:
        """The log2 magnitude histogram of one layer's tensor at ``step`` (default: the last
        recorded): columns ``lo, hi`` (magnitude range of the bin) and ``count``. Zeros have
        ``lo == hi == 0`` and inf/nan ``lo == hi == inf`` (see mpviz.stats for the bins);
        ``df.attrs["step"]`` is the step it was recorded at.

        Histograms exist only on statistics steps (``meta["every"]``, ``meta["stats_budget"]``:
        see :class:`mpviz.Recorder`). Raises
        ``ValueError``, never an empty frame: for a ``layer`` or ``tensor`` (``activation``,
        ``grad``, ``weight``) the run does not have, naming close matches; for a ``step``
        without this histogram, naming the nearest steps that have one; when the layer has no
        such histogram at all (a ReLU has no ``weight``) or none is recorded yet.

            >>> run.histogram("fc1", "grad", step=10)   # doctest: +SKIP

        ``rank``: whose histogram (default: the rank this Run reads raw SQL from, rank 0).
        """
        if rank is not None and rank != self.ranks[0]:
            other = self.for_rank(rank)
            try:
                return other.histogram(layer, tensor, step)
            finally:
                other.close()
        if tensor not in TENSORS:
            raise ValueError(f"unknown tensor {tensor!r}: choose one of {', '.join(TENSORS)}"
                             f"{_hint(tensor, TENSORS)}")
        idx = self._scalar("SELECT idx FROM layers WHERE layer = ?", (layer,))
        if idx is None:
            names = self.layers["layer"].tolist()
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"no layer {layer!r} in run {str(self.run_dir)!r}"
                             f"{_hint(layer, names)} Layers are run.layers['layer'] "
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
                    f"on statistics steps ({self.stats_schedule}); nearest: {near}")
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
        """Where inf/nan appeared: ``rank, step, layer, tensor, phase`` (forward: the replay's
        culprits; backward: layers with non-finite gradients), ``first``, ``nonfinite`` (count),
        ``skipped``, and ``origin``: True where this rank's own gradients (before DDP's
        all-reduce) or its own forward were non-finite, False where the inf/nan came from another
        rank through the all-reduce (NA: a run recorded before origins were)."""
        def fix(con: sqlite3.Connection, sql: str) -> str:
            cols = {r[1] for r in con.execute("PRAGMA table_info(overflows)")}
            return sql if "origin" in cols else sql.replace("o.origin", "NULL AS origin")

        df = self._ranks_query("SELECT o.step, l.layer, o.tensor, o.phase, o.first, o.nonfinite, "
                               "o.skipped, o.origin FROM overflows o JOIN layers l "
                               "ON l.idx = o.layer_idx ORDER BY o.step, o.rowid", fix=fix)
        for col in ("first", "skipped"):
            df[col] = df[col].astype(bool)
        df["origin"] = df["origin"].astype("boolean")
        return df

    @property
    def dtypes(self) -> pd.DataFrame:
        """A row each time a layer's input/output/weight/grad dtype changed (first step included)."""
        return self._ranks_query("SELECT d.step, l.layer, d.tensor, d.dtype FROM dtypes d "
                                 "JOIN layers l ON l.idx = d.layer_idx ORDER BY d.step, d.rowid")

    def dtype_map(self, step: int | None = None) -> pd.DataFrame:
        """layer x tensor table of the dtypes in force at ``step`` (default: the last), on the
        rank raw SQL reads (rank 0 unless one was selected)."""
        df = self.dtypes
        df = df[df["rank"] == self.ranks[0]]
        if step is not None:
            df = df[df["step"] <= step]
        last = df.groupby(["layer", "tensor"], sort=False)["dtype"].last()
        return last.unstack("tensor")

    @property
    def policy_changes(self) -> pd.DataFrame:
        return self._ranks_query("SELECT p.step, l.layer, p.precision, p.rule FROM policy_changes p "
                                 "JOIN layers l ON l.idx = p.layer_idx ORDER BY p.step, p.rowid")

    @property
    def diagnostics(self) -> pd.DataFrame:
        """Diagnostics recorded while training (:mod:`mpviz.recording.diagnostics`): ``step,
        layer, kind, metric, value``, e.g. kind ``lost_updates`` (metric ``lost_frac``,
        ``eligible``) or ``shadow`` (``rel_err``, ``sqnr_db``). Empty for runs without them
        (also runs recorded before this table existed)."""
        try:
            return self.query("SELECT d.step, l.layer, d.kind, d.metric, d.value FROM diagnostics d "
                              "JOIN layers l ON l.idx = d.layer_idx ORDER BY d.step, d.rowid")
        except Exception:  # noqa: BLE001 - pandas wraps sqlite's "no such table" (older runs)
            return pd.DataFrame(columns=["step", "layer", "kind", "metric", "value"])

    def lost_updates(self) -> pd.DataFrame:
        """Per statistics step and layer held in bf16/fp16: ``step, layer, lost_frac`` (of the
        elements with a nonzero gradient, the fraction the optimizer step left unchanged),
        ``eligible`` (how many had a nonzero gradient)."""
        return self._diag_wide("lost_updates", ["lost_frac", "eligible"])

    def shadow(self) -> pd.DataFrame:
        """fp32 shadow error of chosen layers (``Recorder(shadow=[...])``): ``step, layer,
        rel_err, sqnr_db`` of the layer's output against the same layer rerun in fp32 on the
        same inputs, ``grad_rel_err, grad_sqnr_db`` of its weight gradients against the fp32
        copy's from the same upstream gradient."""
        return self._diag_wide("shadow", ["rel_err", "sqnr_db", "grad_rel_err", "grad_sqnr_db"])

    def _diag_wide(self, kind: str, metrics: list[str]) -> pd.DataFrame:
        df = self.diagnostics
        df = df[df["kind"] == kind]
        if not len(df):
            return pd.DataFrame(columns=["step", "layer", *metrics])
        wide = df.pivot_table(index=["step", "layer"], columns="metric", values="value",
                              aggfunc="last", sort=False).reset_index()
        wide.columns.name = None
        return wide.reindex(columns=["step", "layer", *metrics])

    @property
    def steer_requests(self) -> pd.DataFrame:
        """Precision changes other processes asked for (:func:`mpviz.steer`): ``id, time, rules,
        status`` (pending / applied / refused), ``step`` (applied: the first step run with it),
        ``reason`` (why it was refused). Empty for a run nobody steered."""
        from .mailbox import steer_requests

        return steer_requests(self.run_dir)

    def close(self) -> None:
        with self._lock:
            for con in self._cons.values():
                con.close()


def load_run(path: str | Path, rank: int | None = None) -> Run:
    """Open a run directory written by :class:`mpviz.Recorder` (while it trains, or later).

    A distributed job's run holds one store per rank: all are read, and the per-step tables
    have a ``rank`` column; ``rank=r`` reads rank r only.

    >>> run = mpviz.load_run("runs/exp1")   # doctest: +SKIP
    >>> run.overflows.query("origin")       # doctest: +SKIP
    """
    return Run(path, rank=rank)


def list_runs(root: str | Path = "runs") -> list[Path]:
    """Run directories under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    # a node of a distributed job may hold only other ranks' stores (run-rank{r}.db)
    dbs = {p.parent: p for pat in ("*/run-rank*.db", "*/run.db") for p in root.glob(pat)}
    return sorted(dbs, key=lambda d: dbs[d].stat().st_mtime, reverse=True)

