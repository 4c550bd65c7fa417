"""Compare runs: loss vs step and vs wall time, throughput, loss scale, and where layers differ.

>>> from mpviz.dashboard import compare_app
>>> cmp = compare_app(runs_dir="runs")                              # doctest: +SKIP
>>> cmp.select(["runs/digits-fp32", "runs/digits-fp16"])             # doctest: +SKIP
>>> cmp.differences().head()                                         # doctest: +SKIP

No thread: the comparison is drawn when the selection changes or on Refresh.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as widgets
import numpy as np
import pandas as pd

from . import queries, ui
from .plots import CompareFigure

MAX_RUNS = 6


def differences(summaries: dict[str, pd.DataFrame], top: int | None = None) -> pd.DataFrame:
    """Per layer and tensor, how far apart the runs are: `spread` is max - min over runs of
    log2(mean norm), in binades (1.0 = a factor of 2). Also each run's mean norm, the largest
    |x| and the non-finite count summed over runs. Sorted by spread, largest first.

    summaries: {run label: queries.layer_summary(run)}.

    >>> a = pd.DataFrame({"layer": ["fc"], "tensor": ["grad"], "norm": [1.0], "max_abs": [2.0],
    ...                   "nonfinite": [0], "underflow_fp16": [0.0]})
    >>> b = a.assign(norm=[4.0])
    >>> differences({"a": a, "b": b})[["layer", "spread"]].to_dict("records")
    [{'layer': 'fc', 'spread': 2.0}]
    """
    if not summaries:
        return pd.DataFrame(columns=["layer", "tensor", "spread"])
    frames = []
    for label, df in summaries.items():
        frames.append(df.assign(run=label))
    long = pd.concat(frames, ignore_index=True)
    norms = long.pivot_table(index=["layer", "tensor"], columns="run", values="norm", aggfunc="first")
    norms = norms.reindex(columns=list(summaries))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log2(norms.where(norms > 0))
    out = norms.copy()
    out.columns = [f"norm: {c}" for c in norms.columns]
    out["spread"] = (logs.max(axis=1) - logs.min(axis=1)).round(3)
    agg = long.groupby(["layer", "tensor"]).agg(max_abs=("max_abs", "max"), nonfinite=("nonfinite", "sum"))
    out = out.join(agg).reset_index()
    # Layers that went non-finite in one run but not another come first, then the spread.
    out = out.sort_values(["nonfinite", "spread"], ascending=[False, False], na_position="last")
    out = out.reset_index(drop=True)
    return out.head(top) if top else out


class Compare(ui.App):
    """Two or more runs side by side."""

    def __init__(self, runs: Sequence[str | Path] | None = None, runs_dir: str | Path | None = None) -> None:
        self.runs_dir = ui.runs_root(runs_dir)
        self.opened: dict[str, Any] = {}   # path -> mpviz.Run
        self.picker = widgets.SelectMultiple(description="runs", rows=6,
                                             layout=widgets.Layout(width="70%"))
        self.picker.add_class("mpviz-compare-picker")
        self.refresh_btn = ui.button("Refresh", "mpviz-refresh")
        self.info = widgets.HTML()
        self.info.add_class("mpviz-compare-info")
        self.table = widgets.HTML()
        self.table.add_class("mpviz-diff-table")
        self.fig = CompareFigure(n_slots=MAX_RUNS)
        self.fig.widget.add_class("mpviz-figure")
        self.refresh_btn.on_click(lambda _: self.rescan(keep=True))
        self.picker.observe(lambda _: self.refresh(), names="value")
        self.widget = widgets.VBox([
            ui.title("mpviz compare", "two or more runs side by side"),
            widgets.HBox([self.picker, self.refresh_btn]), self.info, self.fig.widget,
            widgets.HTML("<b>Where the runs differ most</b> <span class='mpviz-muted'>(per layer: "
                         "spread of log2 mean norm across runs, in binades; non-finite first)</span>"),
            self.table,
        ])
        self.widget.add_class("mpviz-app")
        self.widget.add_class("mpviz-compare")
        self.rescan(select=runs)

    def rescan(self, select: Sequence[str | Path] | None = None, keep: bool = False) -> None:
        """Re-list runs under runs_dir; select `select` (default: the newest two)."""
        import mpviz

        paths = [str(p) for p in mpviz.list_runs(self.runs_dir)]
        for p in select or ():
            if str(p) not in paths:
                paths.append(str(p))
        labels = {}
        for p in paths:
            try:
                meta = self._run(p).meta
            except Exception:  # unreadable store: list it so the user sees it, unlabelled
                meta = {}
            labels[p] = ui.run_label(Path(p), meta)
        previous = self.picker.value if keep else ()
        self.picker.options = [(labels[p], p) for p in paths]
        chosen = [str(p) for p in select] if select else [p for p in previous if p in paths] or paths[:2]
        if tuple(chosen) == tuple(self.picker.value):
            self.refresh()
        else:
            self.picker.value = tuple(chosen)  # fires refresh
        if not paths:
            self.info.value = f"No runs under <code>{html.escape(str(self.runs_dir))}</code> yet."

    def select(self, runs: Sequence[str | Path]) -> None:
        self.rescan(select=runs)

    def _run(self, path: str) -> Any:
        import mpviz

        if path not in self.opened:
            self.opened[path] = mpviz.load_run(path)
        return self.opened[path]

    def labels(self) -> dict[str, str]:
        return {p: ui.run_label(Path(p), self._run(p).meta) for p in self.picker.value}

    def refresh(self) -> None:
        """Draw the selected runs."""
        chosen = list(self.picker.value)[:MAX_RUNS]
        shown = []
        for p in chosen:
            run = self._run(p)
            snap = queries.snapshot(run, detail=False)
            shown.append((ui.run_label(Path(p), run.meta), snap.steps, snap.skipped))
        self.fig.show(shown)
        diff = self.differences(top=20)
        self.table.value = self._table_html(diff, [label for label, _, _ in shown])
        if len(chosen) < 2:
            self.info.value = "Pick two or more runs (ctrl/shift-click)."
        else:
            self.info.value = f"{len(chosen)} runs: " + ", ".join(
                f"{html.escape(label)}: {len(steps)} points" for label, steps, _ in shown)

    def differences(self, top: int | None = None) -> pd.DataFrame:
        """The per-layer difference table of the selected runs (see `differences`)."""
        summaries = {}
        for p in list(self.picker.value)[:MAX_RUNS]:
            run = self._run(p)
            summaries[ui.run_label(Path(p), run.meta)] = queries.layer_summary(run)
        return differences(summaries, top=top)

    @staticmethod
    def _table_html(diff: pd.DataFrame, labels: list[str]) -> str:
        if diff.empty:
            return "<span class='mpviz-muted'>no per-layer statistics recorded yet</span>"
        norm_cols = [f"norm: {l}" for l in labels if f"norm: {l}" in diff.columns]
        rows = []
        for _, r in diff.iterrows():
            rows.append([html.escape(queries.layer_label(r["layer"])), html.escape(str(r["tensor"]))]
                        + [ui.fmt(r[c]) for c in norm_cols]
                        + [ui.fmt(r["spread"], 2), ui.fmt(r["max_abs"]),
                           f"<span class='mpviz-bad'>{int(r['nonfinite'])}</span>" if r["nonfinite"] else "0"])
        return ui.html_table(["layer", "tensor"] + [c.replace("norm: ", "mean norm: ") for c in norm_cols]
                             + ["spread (binades)", "max |x|", "non-finite"], rows)

    def close(self) -> None:
        for run in self.opened.values():
            run.close()
        self.widget.close()


def compare_app(runs: Sequence[str | Path] | None = None, runs_dir: str | Path | None = None) -> Compare:
    """The comparison app: `runs` (paths), or the newest two under `runs_dir`
    (`$MPVIZ_RUNS_DIR` overrides it).

    >>> cmp = compare_app(runs_dir="runs")   # doctest: +SKIP
    """
    return Compare(runs=runs, runs_dir=runs_dir)
