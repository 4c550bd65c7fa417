"""``Run``: read a recorded run (finished, or still being written) as pandas DataFrames. Every
read re-reads the store, so a live run grows between reads. No torch import.

    >>> run = mpviz.load_run("runs/exp1")            # doctest: +SKIP
    >>> run.steps[["step", "loss", "loss_scale"]]     # doctest: +SKIP

With the writer (``store.py``), the one module that knows the tables: the apps, the diagnosis and
the report use its named reads; ``query`` is raw SQL for users. A distributed job has one store
per rank (``run.db``, ``run-rank{r}.db``): the per-step tables get a ``rank`` column (``rank=r``:
one rank); everything else reads one store, the selected rank's or the lowest (rank 0).
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from .formats import N_BINS, bin_edges, did_you_mean
from .mailbox import steer_requests
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
_HIST_OF = "FROM histograms WHERE layer_idx = ? AND tensor = ?"


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
        recorded): columns ``lo, hi`` (magnitude range of the bin) and ``count``; zeros have
        ``lo == hi == 0``, inf/nan ``lo == hi == inf``. ``df.attrs["step"]``: its step.
        Histograms exist on statistics steps only. Raises ``ValueError`` (never an empty frame)
        naming close matches or the nearest steps that have one. ``rank``: whose (default: the
        rank this Run reads one store from).

            >>> run.histogram("fc1", "grad", step=10)   # doctest: +SKIP
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
        idx = self._layer_idx(layer)
        if idx is None:
            names = self.layers["layer"].tolist()
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"no layer {layer!r} in run {str(self.run_dir)!r}"
                             f"{_hint(layer, names)} Layers are run.layers['layer'] "
                             f"(named_modules() names, '' is the model itself): {shown}")
        key: tuple = (idx, tensor)
        at = self._scalar(f"SELECT MAX(step) {_HIST_OF}" + (" AND step = ?" if step is not None else ""),
                          key + ((int(step),) if step is not None else ()))
        if at is None:
            raise self._no_histogram(layer, tensor, step, idx)
        df = self.query(f"SELECT lo, counts {_HIST_OF} AND step = ?", key + (int(at),))
        counts = unpack_hist(int(df["lo"].iloc[0]), df["counts"].iloc[0])
        rows = [(*bin_edges(k), c) for k, c in enumerate(counts) if c]
        out = pd.DataFrame(rows, columns=["lo", "hi", "count"])
        out.attrs["step"] = int(at)
        return out

    def _no_histogram(self, layer: str, tensor: str, step: int | None, idx: int) -> ValueError:
        key: tuple = (idx, tensor)
        if step is not None and self._scalar(f"SELECT 1 {_HIST_OF} LIMIT 1", key) is not None:
            before = self._scalar(f"SELECT MAX(step) {_HIST_OF} AND step < ?", key + (int(step),))
            after = self._scalar(f"SELECT MIN(step) {_HIST_OF} AND step > ?", key + (int(step),))
            near = " and ".join(str(s) for s in (before, after) if s is not None)
            return ValueError(
                f"no {tensor} histogram of {layer!r} at step {step}: histograms are recorded "
                f"on statistics steps ({self.stats_schedule}); nearest: {near}")
        has = self.query("SELECT DISTINCT tensor FROM histograms WHERE layer_idx = ?",
                         (idx,))["tensor"].tolist()
        return ValueError(
            f"no {tensor} histogram of {layer!r} in this run"
            + (f" (it has {', '.join(sorted(has))})" if has else
               " (none of its tensors has one: no statistics step of it recorded yet?)"))

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
        return steer_requests(self.run_dir)

    # The named reads of the apps, the diagnosis and the report (one store). Step lists are
    # inlined: integers we computed.

    def _layer_idx(self, layer: str) -> int | None:
        idx = self._scalar("SELECT idx FROM layers WHERE layer = ?", (layer,))
        return None if idx is None else int(idx)

    def layer_names(self) -> dict[int, str]:
        """``{idx: layer name}`` (``idx``: the stored position in ``named_modules()``)."""
        df = self.query("SELECT idx, layer FROM layers")
        return {int(i): str(n) for i, n in zip(df["idx"], df["layer"])}

    def n_param_layers(self) -> int:
        """How many modules have parameters of their own."""
        return int(self._scalar("SELECT COUNT(*) FROM layers WHERE n_params > 0") or 0)

    def step_range(self) -> tuple[int, int]:
        """(first, last) recorded step; (0, -1) for a run without steps."""
        if self._before_read is not None:
            self._before_read()
        with self._lock:
            lo, hi = self._con.execute("SELECT MIN(step), MAX(step) FROM steps").fetchone()
        return (0, -1) if hi is None else (int(lo), int(hi))

    def step_totals(self) -> dict[str, Any]:
        """``n`` steps, ``skipped``, and the sums of ``samples`` and ``step_time_s``."""
        df = self.query("SELECT COUNT(*) AS n, SUM(skipped) AS skipped, SUM(samples) AS samples, "
                        "SUM(step_time_s) AS step_time_s FROM steps")
        return df.iloc[0].to_dict()

    def step_buckets(self, lo: int, hi: int, size: int) -> pd.DataFrame:
        """Steps ``lo..hi`` in buckets of ``size``: first step, mean loss and samples/s, the
        smallest loss scale (back-offs stay visible), the last wall time."""
        return self.query(
            "SELECT MIN(step) AS step, AVG(loss) AS loss, AVG(samples_per_s) AS samples_per_s, "
            "MIN(loss_scale) AS loss_scale, MAX(wall_time) AS wall_time "
            "FROM steps WHERE step BETWEEN ? AND ? GROUP BY (step - ?) / ? ORDER BY step",
            (lo, hi, lo, size))

    def skipped_steps(self, lo: int, hi: int) -> pd.DataFrame:
        """``step, loss_scale, layer, tensor, phase``: skipped steps, a row per culprit (or NA)."""
        return self.query(
            "SELECT s.step AS step, s.loss_scale AS loss_scale, l.layer AS layer, "
            "o.tensor AS tensor, o.phase AS phase FROM steps s "
            "LEFT JOIN overflows o ON o.step = s.step AND o.first = 1 "
            "LEFT JOIN layers l ON l.idx = o.layer_idx "
            "WHERE s.skipped = 1 AND s.step BETWEEN ? AND ? ORDER BY s.step", (lo, hi))

    def policy_changes_in(self, lo: int, hi: int) -> pd.DataFrame:
        """``step, layer, precision`` of the policy changes in ``lo..hi``, in layer order."""
        return self.query(
            "SELECT p.step AS step, l.layer AS layer, p.precision AS precision FROM policy_changes p "
            "LEFT JOIN layers l ON l.idx = p.layer_idx WHERE p.step BETWEEN ? AND ? "
            "ORDER BY p.step, l.idx", (lo, hi))

    def overflow_count(self) -> int:
        return int(self._scalar("SELECT COUNT(*) FROM overflows") or 0)

    def latest_overflows(self, limit: int) -> pd.DataFrame:
        """The newest ``limit`` overflow events (first culprits first within a step)."""
        return self.query(
            "SELECT o.step AS step, l.layer AS layer, o.tensor AS tensor, o.phase AS phase, "
            "o.first AS first, o.nonfinite AS nonfinite, o.skipped AS skipped FROM overflows o "
            "LEFT JOIN layers l ON l.idx = o.layer_idx ORDER BY o.step DESC, o.first DESC LIMIT ?",
            (limit,))

    def stats_steps(self, lo: int, hi: int) -> np.ndarray:
        """The steps in ``lo..hi`` that have per-layer statistics."""
        # a skip scan of the step index: one lookup per statistics step, not per row
        steps = self.query(
            "WITH RECURSIVE s(step) AS (SELECT MIN(step) FROM layer_stats WHERE step >= ? "
            "UNION ALL SELECT (SELECT MIN(step) FROM layer_stats WHERE step > s.step) FROM s "
            "WHERE s.step IS NOT NULL AND s.step <= ?) SELECT step FROM s WHERE step <= ?",
            (int(lo), int(hi), int(hi)))["step"]
        return steps.dropna().to_numpy(dtype=np.int64)

    def last_stats_step(self) -> int | None:
        last = self._scalar("SELECT MAX(step) FROM layer_stats")
        return None if last is None else int(last)

    def grad_norm_buckets(self, lo: int, hi: int, size: int) -> pd.DataFrame:
        """``idx, b, norm``: each layer's largest gradient norm per bucket ``b`` of ``size`` steps."""
        return self.query(
            "SELECT layer_idx AS idx, (step - ?) / ? AS b, MAX(norm) AS norm FROM layer_stats "
            "WHERE tensor = 'grad' AND step BETWEEN ? AND ? GROUP BY layer_idx, b",
            (lo, size, lo, hi))

    def grad_norms_at(self, steps: Iterable[int]) -> pd.DataFrame:
        """``idx, step, norm`` of every layer's gradient at ``steps``."""
        return self.query("SELECT layer_idx AS idx, step, norm FROM layer_stats WHERE "
                          f"tensor = 'grad' AND step IN ({_ints(steps)})")

    def stats_at(self, steps: Iterable[int]) -> pd.DataFrame:
        """``step, layer, tensor, dtype, max_abs`` of every statistics row at ``steps``."""
        return self.query("SELECT s.step, l.layer, s.tensor, s.dtype, s.max_abs FROM layer_stats s "
                          f"JOIN layers l ON l.idx = s.layer_idx WHERE s.step IN ({_ints(steps)}) "
                          "ORDER BY s.step")

    def any_zero(self, tensor: str, steps: Iterable[int]) -> bool:
        """Whether some layer's ``tensor`` was all zero (max |x| = 0) at one of ``steps``."""
        return self._scalar(f"SELECT 1 FROM layer_stats WHERE tensor = ? AND max_abs = 0 AND "
                            f"step IN ({_ints(steps)}) LIMIT 1", (tensor,)) is not None

    def zero_fractions(self, tensor: str) -> pd.DataFrame:
        """``layer, z``: the share of exact zeros in each statistics row of ``tensor``."""
        return self.query("SELECT l.layer, CAST(s.zeros AS REAL) / s.numel AS z FROM layer_stats s "
                          "JOIN layers l ON l.idx = s.layer_idx WHERE s.tensor = ?", (tensor,))

    def max_abs_of(self, layers: list[str], tensor: str) -> pd.DataFrame:
        """``step, layer, max_abs`` of ``tensor`` of these layers at every statistics step."""
        # CROSS JOIN: layer by layer through the (layer_idx, tensor, step) index
        return self.query("SELECT s.step, l.layer, s.max_abs FROM layers l CROSS JOIN layer_stats s "
                          "ON s.layer_idx = l.idx AND s.tensor = ? WHERE l.layer IN (%s)"
                          % ",".join("?" * len(layers)), (tensor, *layers))

    def peak_max_abs(self, tensor: str, skip_steps: Iterable[int] = ()) -> pd.DataFrame:
        """``layer, max_abs``: each layer's largest max |x| outside ``skip_steps``, in the
        order the layers first appear."""
        # NOT INDEXED: one pass over the table; the (layer_idx, ...) index would fetch each of
        # a long run's millions of rows from a random page
        return self.query(
            "SELECT l.layer, p.max_abs FROM (SELECT layer_idx, MAX(max_abs) AS max_abs, "
            "MIN(step) AS first FROM layer_stats NOT INDEXED WHERE tensor = ? AND step NOT IN "
            f"({_ints(sorted(set(skip_steps)))}) GROUP BY layer_idx) p JOIN layers l "
            "ON l.idx = p.layer_idx ORDER BY p.first, p.layer_idx", (tensor,))

    def leaf_numels(self, tensor: str = "activation") -> pd.DataFrame:
        """``layer, numel`` of each leaf module's ``tensor`` at the last step that recorded one."""
        return self.query("SELECT l.layer, s.numel FROM layer_stats s JOIN layers l "
                          "ON l.idx = s.layer_idx WHERE s.tensor = ? AND l.is_leaf = 1 AND s.step = "
                          "(SELECT MAX(step) FROM layer_stats WHERE tensor = ?)", (tensor, tensor))

    def latest_stats(self) -> pd.DataFrame:
        """``layer, tensor, norm, max_abs`` at each layer's and tensor's last statistics step."""
        df = self.query(
            "SELECT ls.layer_idx AS idx, ls.tensor AS tensor, ls.norm AS norm, ls.max_abs AS max_abs "
            "FROM layer_stats ls JOIN (SELECT layer_idx, tensor, MAX(step) AS step FROM layer_stats "
            "GROUP BY layer_idx, tensor) m ON m.layer_idx = ls.layer_idx AND m.tensor = ls.tensor "
            "AND m.step = ls.step")
        names = self.layer_names()
        df.insert(0, "layer", [names.get(int(i)) for i in df.pop("idx")])
        return df

    def leaf_dtypes(self, upto: int | None = None) -> pd.DataFrame:
        """``idx, tensor, dtype`` in force at step ``upto`` (default: the last) in leaf modules."""
        return self.query(
            "SELECT d.layer_idx AS idx, d.tensor AS tensor, d.dtype AS dtype FROM dtypes d "
            "JOIN (SELECT layer_idx, tensor, MAX(step) AS step FROM dtypes WHERE step <= ? "
            "GROUP BY layer_idx, tensor) m "
            "ON m.layer_idx = d.layer_idx AND m.tensor = d.tensor AND m.step = d.step "
            "JOIN layers l ON l.idx = d.layer_idx WHERE l.is_leaf = 1",
            (upto if upto is not None else 2**62,))

    def layer_buckets(self, layer: str, lo: int, hi: int, size: int) -> pd.DataFrame:
        """One layer's statistics in ``lo..hi`` per tensor and bucket of ``size`` steps (means,
        extremes of max/min |x|, summed non-finite counts)."""
        idx = self._layer_idx(layer)
        if idx is None:
            raise ValueError(f"no layer {layer!r} in this run")
        # layer_idx first, so SQLite walks the (layer_idx, tensor, step) index
        return self.query(
            "SELECT MIN(step) AS step, tensor, AVG(norm) AS norm, MAX(max_abs) AS max_abs, "
            "MIN(min_abs_nonzero) AS min_abs_nonzero, "
            "AVG(CAST(zeros AS REAL) / MAX(numel, 1)) AS zero_frac, SUM(nonfinite) AS nonfinite, "
            "AVG(CAST(underflow_fp16 AS REAL) / MAX(numel, 1)) AS underflow_fp16 "
            "FROM layer_stats WHERE layer_idx = ? AND step BETWEEN ? AND ? "
            "GROUP BY tensor, (step - ?) / ? ORDER BY tensor, step", (idx, lo, hi, lo, size))

    def layer_summary(self) -> pd.DataFrame:
        """Per layer and tensor over the whole run: mean norm, largest max |x|, summed
        non-finite count, mean fp16 underflow fraction."""
        return self.query(
            "SELECT l.layer AS layer, ls.tensor AS tensor, AVG(ls.norm) AS norm, "
            "MAX(ls.max_abs) AS max_abs, SUM(ls.nonfinite) AS nonfinite, "
            "AVG(CAST(ls.underflow_fp16 AS REAL) / MAX(ls.numel, 1)) AS underflow_fp16 "
            "FROM layer_stats ls JOIN layers l ON l.idx = ls.layer_idx GROUP BY l.layer, ls.tensor")

    def histogram_steps(self, layer: str, tensor: str, lo: int, hi: int) -> list[int]:
        """The steps in ``lo..hi`` with a histogram of this layer's ``tensor``."""
        idx = self._layer_idx(layer)
        if idx is None:
            return []
        return self.query(f"SELECT step {_HIST_OF} AND step BETWEEN ? AND ? ORDER BY step",
                          (idx, tensor, lo, hi))["step"].tolist()

    def histograms_of(self, layer: str, tensor: str, steps: list[int]) -> tuple[list[int], np.ndarray]:
        """(the steps that have one, their ``(n, N_BINS)`` counts) of this layer's histograms."""
        idx = self._layer_idx(layer)
        if idx is None or not steps:
            return [], np.zeros((0, N_BINS), dtype=np.int64)
        rows = self.query(f"SELECT step, lo, counts {_HIST_OF} AND step IN ({_ints(steps)}) "
                          "ORDER BY step", (idx, tensor))
        return [int(s) for s in rows["step"]], hist_counts(rows["lo"], rows["counts"])

    def grad_histogram_steps(self) -> pd.Series:
        """The statistics steps that have a gradient histogram."""
        # Histograms are written and dropped with their layer_stats rows, so each step of the
        # layer_stats step index is looked up, instead of a DISTINCT over every histogram
        return self.query(
            "SELECT s.step FROM (SELECT DISTINCT step FROM layer_stats) s WHERE EXISTS "
            "(SELECT 1 FROM layers l CROSS JOIN histograms h ON h.layer_idx = l.idx AND "
            "h.tensor = 'grad' AND h.step = s.step) ORDER BY s.step")["step"]

    def grad_histograms_at(self, steps: Iterable[int]) -> pd.DataFrame:
        """``step, layer, lo, counts`` (stored form: :func:`hist_chunks`) of gradients at ``steps``."""
        return self.query("SELECT h.step, l.layer, h.lo, h.counts FROM layers l CROSS JOIN "
                          "histograms h ON h.layer_idx = l.idx WHERE h.tensor = 'grad' AND "
                          f"h.step IN ({_ints(steps)}) ORDER BY h.step, h.layer_idx")

    def stats_with_histograms(self, tensors: list[str], step: int | None = None) -> pd.DataFrame:
        """Every statistics row of ``tensors`` (at ``step`` only, if given) with its histogram
        (stored form, NA where none) and the step's loss scale."""
        where = "WHERE s.tensor IN (%s)" % ",".join("?" * len(tensors))
        params: list[Any] = list(tensors)
        if step is not None:
            where += " AND s.step = ?"
            params.append(int(step))
        return self.query(
            "SELECT s.step, l.layer, s.tensor, s.max_abs, h.lo, h.counts, st.loss_scale "
            "FROM layer_stats s JOIN layers l ON l.idx = s.layer_idx "
            "LEFT JOIN histograms h ON h.step = s.step AND h.layer_idx = s.layer_idx AND h.tensor = s.tensor "
            f"LEFT JOIN steps st ON st.step = s.step {where} ORDER BY s.step, s.layer_idx",
            tuple(params))

    def close(self) -> None:
        with self._lock:
            for con in self._cons.values():
                con.close()


def load_run(path: str | Path, rank: int | None = None) -> Run:
    """Open a run directory written by :class:`mpviz.Recorder` (while it trains, or later);
    every rank of a distributed job (``rank=r``: one).

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



def _ints(values: Iterable[int]) -> str:
    """``1,2,3``: integers for an SQL ``IN (...)`` list."""
    return ",".join(str(int(x)) for x in values)


CHUNK_ROWS = 20_000  # histograms unpacked at once (a long run has millions: ~40 MB a chunk)


def hist_counts(los: Any, blobs: Any) -> np.ndarray:
    """Stored histograms (first bin, little-endian int64 counts: ``store.pack_hists``) as one
    ``(n, N_BINS)`` int64 array."""
    blobs = list(blobs)
    lens = np.fromiter((len(b) // 8 for b in blobs), dtype=np.int64, count=len(blobs))
    flat = np.frombuffer(b"".join(blobs), dtype="<i8")
    first = np.asarray(los, dtype=np.int64) - (np.cumsum(lens) - lens)  # bin of flat[0] per row
    out = np.zeros((len(blobs), N_BINS), dtype=np.int64)
    out[np.repeat(np.arange(len(blobs)), lens), np.repeat(first, lens) + np.arange(len(flat))] = flat
    return out


def hist_chunks(los: Any, blobs: Any) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, :func:`hist_counts` of those rows), at most :data:`CHUNK_ROWS` rows at a time."""
    los, blobs = np.asarray(los), np.asarray(blobs, dtype=object)
    for i in range(0, len(blobs), CHUNK_ROWS):
        rows = slice(i, min(i + CHUNK_ROWS, len(blobs)))
        yield rows, hist_counts(los[rows], blobs[rows])


def is_foreign_store(db: Path) -> bool:
    """An SQLite file without mpviz's meta table (True), or one we cannot tell about (False)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False
    return "meta" not in names
