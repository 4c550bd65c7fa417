"""Compare runs: loss vs step and vs wall time, throughput, loss scale, and where layers differ.
Drawn when the selection changes or on Refresh (no thread).

>>> from mpviz.dashboard import compare_app
>>> cmp = compare_app(runs_dir="runs")                              # doctest: +SKIP
>>> cmp.select(["runs/digits-fp32", "runs/digits-fp16"])             # doctest: +SKIP
>>> cmp.differences().head()                                         # doctest: +SKIP
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as widgets
import numpy as np
import pandas as pd

from . import paths, queries, run_list, ui
from .plots import CompareFigure

MAX_RUNS = 6
RANK_SEP = "#rank"   # picker value of one rank of a distributed run: "<run dir>#rank<r>"


def _split(path: str) -> tuple[str, int | None]:
    """"runs/job#rank1" -> ("runs/job", 1); a plain path -> (path, None)."""
    base, sep, r = path.rpartition(RANK_SEP)
    return (base, int(r)) if sep and r.isdigit() else (path, None)


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
        self.refused: list[str] = []        # `runs` given outside the runs folder
        self.problems: dict[str, str] = {}  # path -> why it cannot be shown (one message each)
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
        select = [str(Path(p)) for p in select or ()]
        runs, refused = run_list.scan(self.runs_dir, select)
        found, labels = self._entries([str(p) for p in runs])
        if select:
            select = [q for p in select for q in
                      ([str(p)] if str(p) in found else [f for f in found if _split(f)[0] == str(p)])]
        previous = self.picker.value if keep else ()
        self.picker.options = [(labels[p], p) for p in found]
        chosen = ([str(p) for p in select if str(p) in found] if select else
                  [p for p in previous if p in found] or found[:2])
        self.refused = refused
        if tuple(chosen) == tuple(self.picker.value):
            self.refresh()
        else:
            self.picker.value = tuple(chosen)  # fires refresh
        if not found:
            self.info.value = (f"No runs under <code>{html.escape(str(self.runs_dir))}</code> yet."
                               + self._problems_html())

    def _entries(self, runs: list[str]) -> tuple[list[str], dict[str, str]]:
        """The picker's entries (a distributed run: one per rank, to overlay or pick) and their
        labels; an unreadable run is listed, so that the user sees it."""
        found, labels = [], {}
        for p in runs:
            try:
                run = self._run(p)
                meta, ranks = run.meta, list(run.ranks)
            except (paths.RunUnavailable, *paths.STORE_ERRORS):
                meta, ranks = {"precision": "unreadable"}, [0]
            labels[p] = ui.run_label(Path(p), meta)
            if len(ranks) > 1:
                for r in ranks:
                    found.append(f"{p}{RANK_SEP}{r}")
                    labels[f"{p}{RANK_SEP}{r}"] = f"{labels[p]} rank {r}"
            else:
                found.append(p)
        return found, labels

    def select(self, runs: Sequence[str | Path]) -> None:
        self.rescan(select=runs)

    def _run(self, path: str) -> Any:
        """The open run of `path` (confined to the runs folder); `paths.RunUnavailable` if it
        cannot be shown, also once it was deleted."""
        run = self.opened.get(path)
        if run is not None and not run.path.exists():
            self._forget(path)
            raise paths.RunUnavailable(f"{Path(_split(path)[0]).name} was deleted while open: "
                                       f"pick other runs or press Refresh")
        if run is None:
            base, rank = _split(path)
            run = paths.open_run(self.runs_dir, base)
            if rank is not None:   # that rank's own store
                whole, run = run, run.for_rank(rank)
                whole.close()
            self.opened[path] = run
        return run

    def _forget(self, path: str) -> None:
        run = self.opened.pop(path, None)
        if run is not None:
            run.close()

    def _readable(self) -> list[tuple[str, Any]]:
        """(path, run) of the selected runs that can be shown; the others go to `problems`."""
        self.problems = {}
        out = []
        for p in list(self.picker.value)[:MAX_RUNS]:
            try:
                out.append((p, self._run(p)))
            except paths.RunUnavailable as e:
                self.problems[p] = str(e)
        return out

    def _problems_html(self) -> str:
        msgs = self.refused + list(self.problems.values())
        return "".join(f"<div class='mpviz-bad mpviz-problem'>{html.escape(m)}</div>" for m in msgs)

    @staticmethod
    def _label(path: str, run: Any) -> str:
        base, rank = _split(path)
        label = ui.run_label(Path(base), run.meta)
        return label if rank is None else f"{label} rank {rank}"

    def labels(self) -> dict[str, str]:
        return {p: self._label(p, run) for p, run in self._readable()}

    def refresh(self) -> None:
        """Draw the selected runs; each one that cannot be shown gets one message instead."""
        shown, summaries = [], {}
        for p, run in self._readable():
            try:   # all of a run is read before any of it is drawn
                label = self._label(p, run)
                snap = queries.snapshot(run, detail=False)
                summaries[label] = queries.layer_summary(run)
            except paths.STORE_ERRORS as e:   # corrupt beyond what opening it read
                self.problems[p] = paths.describe(run.run_dir, e)
                self._forget(p)
                continue
            shown.append((label, snap.steps, snap.skipped))
        self.fig.show(shown)
        diff = differences(summaries, top=20)
        self.table.value = self._table_html(diff, [label for label, _, _ in shown])
        text = f"{len(shown)} runs: " + ", ".join(
            f"{html.escape(label)}: {len(steps)} points" for label, steps, _ in shown) if shown else ""
        if len(shown) < 2:
            text += " Pick two or more runs (ctrl/shift-click)."
        self.info.value = text.strip() + self._problems_html()

    def differences(self, top: int | None = None) -> pd.DataFrame:
        """The per-layer difference table of the selected runs (see `differences`); runs that
        cannot be read are left out (and named in `problems`)."""
        summaries = {}
        for p, run in self._readable():
            try:
                summaries[self._label(p, run)] = queries.layer_summary(run)
            except paths.STORE_ERRORS as e:
                self.problems[p] = paths.describe(run.run_dir, e)
                self._forget(p)
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
