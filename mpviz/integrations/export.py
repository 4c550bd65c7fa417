"""A recorded run as TensorBoard event files, CSV or Parquet. No torch import.

    >>> mpviz.export("runs/exp1", "tensorboard", "tb/exp1")   # doctest: +SKIP
    >>> mpviz.export("runs/exp1", "parquet", "out/exp1")      # doctest: +SKIP

or ``python -m mpviz export tensorboard|csv|parquet RUN_DIR OUT_DIR``.

TensorBoard (written with tensorboard's own ``EventFileWriter``; values are float32 there):

- per step: ``train/loss``, ``train/loss_scale`` (the scale the step used; runs with a
  GradScaler), ``train/skipped`` (1 when GradScaler skipped the step) and
  ``train/skipped_total``, ``train/samples_per_s``, ``overflow/events`` (inf/nan events mpviz
  recorded at that step: layers and phases, see ``run.overflows``);
- per layer, on statistics steps: ``grad_norm/<layer>`` (unscaled), ``max_abs/<tensor>/<layer>``
  and ``underflow_<fmt>/<tensor>/<layer>`` (fraction that underflows in the run's autocast format;
  both fp16 and bf16 for a run without autocast), tensor in activation, grad, weight. The model
  itself is the layer ``(model)``.

TensorBoard's reader keeps 10,000 points per scalar tag by default (a random sample beyond):
start it with ``--samples_per_plugin scalars=0`` to see every step of a long run.

CSV / Parquet: one file per table of :class:`mpviz.Run` (``steps``, ``layer_stats``,
``overflows``, ``dtypes``, ``policy_changes``, ``layers``), the same columns as its DataFrames,
and ``meta.json``. Histograms are not exported (``run.histogram`` reads them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from ..run import Run, load_run

FORMATS = ("tensorboard", "csv", "parquet")
TABLES = ("steps", "layer_stats", "overflows", "dtypes", "policy_changes", "layers")


def export(run: Run | str | Path, fmt: str, out_dir: str | Path) -> list[Path]:
    """Write ``run`` (a :class:`mpviz.Run` or a run directory) to ``out_dir`` as ``fmt``, one of
    ``tensorboard``, ``csv``, ``parquet``. Returns the files written (for TensorBoard, the event
    file, one per rank in ``out_dir/rank<r>`` for a run with several; point ``tensorboard
    --logdir`` at ``out_dir``).

        >>> mpviz.export("runs/exp1", "csv", "out/exp1")   # doctest: +SKIP
    """
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
    """One event file; for a run read with several ranks, one folder per rank (``rank0``, ...:
    TensorBoard shows them as runs, overlaid)."""
    from . import require

    require("tensorboard", "export", "mpviz.export(..., 'tensorboard', ...)")
    meta, steps, stats, overflows = run.meta, run.steps, run.layer_stats, run.overflows
    if "rank" not in steps or steps["rank"].nunique() < 2:
        return [_events(meta, steps, stats, overflows, out)]
    return [_events(meta, steps[steps["rank"] == r], stats[stats["rank"] == r],
                    overflows[overflows["rank"] == r], out / f"rank{r}")
            for r in sorted(steps["rank"].unique())]


def _events(meta: dict, steps: Any, stats: Any, overflows: Any, out: Path) -> Path:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    fmts = {"float16": ["fp16"], "bfloat16": ["bf16"]}.get(meta.get("autocast_dtype") or "",
                                                            ["fp16", "bf16"])
    events = overflows.groupby("step").size().to_dict()
    wall = dict(zip(steps["step"].tolist(), steps["wall_time"].tolist()))
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
    stats = stats.assign(layer=stats["layer"].where(stats["layer"] != "", "(model)"))
    for row in stats.itertuples(index=False):
        v = values.setdefault(int(row.step), [])
        if row.tensor == "grad":
            v.append((f"grad_norm/{row.layer}", float(row.norm)))
        v.append((f"max_abs/{row.tensor}/{row.layer}", float(row.max_abs)))
        for f in fmts:
            v.append((f"underflow_{f}/{row.tensor}/{row.layer}", float(getattr(row, f"underflow_{f}"))))
    writer = EventFileWriter(str(out), filename_suffix=".mpviz")
    try:
        for step in sorted(values):
            summary = Summary(value=[Summary.Value(tag=t, simple_value=x) for t, x in values[step]])
            writer.add_event(Event(wall_time=float(wall.get(step) or 0.0), step=step, summary=summary))
    finally:
        writer.close()
    return max(out.glob("events.out.tfevents.*.mpviz"), key=lambda p: p.stat().st_mtime)
