"""A recorded run as TensorBoard event files, CSV or Parquet (``mpviz export FORMAT RUN OUT``).

    >>> mpviz.export("runs/exp1", "tensorboard", "tb/exp1")   # doctest: +SKIP

TensorBoard tags (float32 values): per step ``train/loss``, ``train/loss_scale`` (with a
GradScaler), ``train/skipped``, ``train/skipped_total``, ``train/samples_per_s``,
``overflow/events``; per layer on statistics steps ``grad_norm/<layer>`` (unscaled),
``max_abs/<tensor>/<layer>``, ``underflow_<fp16|bf16>/<tensor>/<layer>`` (the run's autocast
format, both without one); the model itself is ``(model)``. TensorBoard samples 10,000 points per
tag unless started with ``--samples_per_plugin scalars=0``.

CSV / Parquet: one file per :class:`mpviz.Run` table (:data:`TABLES`) and ``meta.json``;
histograms are not exported.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..formats import AUTOCAST_PRECISIONS, DTYPE_PRECISION

if TYPE_CHECKING:  # imported when used: the command line reads FORMATS without pandas
    from ..run import Run

FORMATS = ("tensorboard", "csv", "parquet")
TABLES = ("steps", "layer_stats", "overflows", "dtypes", "policy_changes", "layers")


def export(run: Run | str | Path, fmt: str, out_dir: str | Path) -> list[Path]:
    """Write ``run`` (a :class:`mpviz.Run` or a run directory) to ``out_dir`` as ``fmt``
    (:data:`FORMATS`); returns the files written (TensorBoard: one event file per rank).

        >>> mpviz.export("runs/exp1", "csv", "out/exp1")   # doctest: +SKIP
    """
    from ..run import Run, load_run

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    own = not isinstance(run, Run)
    r = load_run(run) if own else run  # a missing or unreadable run: mpviz.RunStoreError
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "tensorboard":
            return _tensorboard(r, out)
        return _tables(r, out, fmt)
    finally:
        if own:
            r.close()


def _tables(run: Run, out: Path, fmt: str) -> list[Path]:
    if fmt == "parquet":
        from . import require

        require("pyarrow", "export", "mpviz.export(..., 'parquet', ...)")
    written = []
    for table in TABLES:
        df = getattr(run, table)
        path = out / f"{table}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False, engine="pyarrow")
        written.append(path)
    meta = out / "meta.json"
    meta.write_text(json.dumps(run.meta, indent=1, default=str))
    return written + [meta]


def _tensorboard(run: Run, out: Path) -> list[Path]:
    # Several ranks: a folder each (rank0, ...), which TensorBoard overlays as runs.
    from . import require

    require("tensorboard", "export", "mpviz.export(..., 'tensorboard', ...)")
    meta, steps, stats, overflows = run.meta, run.steps, run.layer_stats, run.overflows
    if "rank" not in steps or steps["rank"].nunique() < 2:
        return [_events(meta, steps, stats, overflows, out)]
    return [_events(meta, steps[steps["rank"] == r], stats[stats["rank"] == r],
                    overflows[overflows["rank"] == r], out / f"rank{r}")
            for r in sorted(steps["rank"].unique())]


def _events(meta: dict, steps: Any, stats: Any, overflows: Any, out: Path) -> Path:
    values = _step_scalars(meta, steps, overflows)
    for step, scalars in _layer_scalars(meta, stats).items():
        values.setdefault(step, []).extend(scalars)
    wall = dict(zip(steps["step"].tolist(), steps["wall_time"].tolist()))
    return _write_events(values, wall, out)


def _step_scalars(meta: dict, steps: Any, overflows: Any) -> dict[int, list[tuple[str, float]]]:
    events = overflows.groupby("step").size().to_dict()
    scaler = isinstance(meta.get("scaler"), dict) and meta["scaler"].get("enabled", True)
    values: dict[int, list[tuple[str, float]]] = {}
    skipped_total = 0
    for row in steps.itertuples(index=False):
        v = values.setdefault(int(row.step), [])
        for tag, x in (("train/loss", row.loss), ("train/samples_per_s", row.samples_per_s),
                       ("train/loss_scale", row.loss_scale if scaler else None)):
            if x is not None and (tag == "train/loss" or not math.isnan(x)):  # a nan loss shows
                v.append((tag, float(x)))
        skipped_total += bool(row.skipped)
        v += [("train/skipped", float(bool(row.skipped))), ("train/skipped_total", float(skipped_total)),
              ("overflow/events", float(events.get(row.step, 0)))]
    return values


def _layer_scalars(meta: dict, stats: Any) -> dict[int, list[tuple[str, float]]]:
    # Underflow in the run's autocast format; both for a run without autocast.
    precision = DTYPE_PRECISION.get(meta.get("autocast_dtype") or "")
    fmts = [precision] if precision in AUTOCAST_PRECISIONS else list(AUTOCAST_PRECISIONS)
    stats = stats.assign(layer=stats["layer"].where(stats["layer"] != "", "(model)"))
    values: dict[int, list[tuple[str, float]]] = {}
    for row in stats.itertuples(index=False):
        v = values.setdefault(int(row.step), [])
        if row.tensor == "grad":
            v.append((f"grad_norm/{row.layer}", float(row.norm)))
        v.append((f"max_abs/{row.tensor}/{row.layer}", float(row.max_abs)))
        for f in fmts:
            v.append((f"underflow_{f}/{row.tensor}/{row.layer}", float(getattr(row, f"underflow_{f}"))))
    return values


def _write_events(values: dict[int, list[tuple[str, float]]], wall: dict, out: Path) -> Path:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(out), filename_suffix=".mpviz")
    try:
        for step in sorted(values):
            summary = Summary(value=[Summary.Value(tag=t, simple_value=x) for t, x in values[step]])
            writer.add_event(Event(wall_time=float(wall.get(step) or 0.0), step=step, summary=summary))
    finally:
        writer.close()
    return max(out.glob("events.out.tfevents.*.mpviz"), key=lambda p: p.stat().st_mtime)
