"""Small widget helpers shared by the apps: styling, HTML tables, run labels.

Everything here is self-contained: no CSS or fonts are fetched from outside (the apps must work
offline).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import ipywidgets as widgets

from . import queries

# Inline CSS for our own classes only; sent once per app.
STYLE = """
<style>
.mpviz-app {font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 13px;}
.mpviz-app table.mpviz-t {border-collapse: collapse; font-size: 12px;}
.mpviz-app table.mpviz-t th, .mpviz-app table.mpviz-t td {padding: 1px 6px; text-align: right;
  border-bottom: 1px solid #eee; white-space: nowrap;}
.mpviz-app table.mpviz-t th:first-child, .mpviz-app table.mpviz-t td:first-child {text-align: left;}
.mpviz-app .mpviz-bad {color: #c62828; font-weight: 600;}
.mpviz-app .mpviz-muted {color: #777;}
.mpviz-app .mpviz-cell {font-size: 12px; font-variant-numeric: tabular-nums;}
.mpviz-app .mpviz-title {font-size: 18px; font-weight: 600;}
</style>
"""


def runs_root(runs_dir: str | os.PathLike | None) -> Path:
    """Where runs live: `$MPVIZ_RUNS_DIR` if set (tests, deployments), else `runs_dir`, else
    `runs` in the working directory."""
    env = os.environ.get("MPVIZ_RUNS_DIR")
    return Path(env or runs_dir or "runs")


def title(text: str, sub: str = "") -> widgets.HTML:
    extra = f' <span class="mpviz-muted">{html.escape(sub)}</span>' if sub else ""
    return widgets.HTML(STYLE + f'<div class="mpviz-title">{html.escape(text)}{extra}</div>')


def fmt(x, digits: int = 3) -> str:
    """Compact number for tables: 1.23e-05, 0.123, 12.3, 1.2k; '' for nan, 'inf' for inf."""
    if x is None:
        return ""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return html.escape(str(x))
    if math.isnan(v):
        return ""
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.{max(digits - 1, 1)}e}"
    if a >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.{digits}g}"


def binades(h: float) -> str:
    """Headroom in binades: '5.2', '122', '–' when unknown, 'overflow' when non-finite."""
    if h is None or math.isnan(h):
        return "–"
    if math.isinf(h):
        return "overflow"
    return f"{h:.0f}" if abs(h) >= 10 else f"{h:.1f}"


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are given already escaped/formatted."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="mpviz-t {cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def overflow_html(df, total: int) -> str:
    """The overflow events table (newest first)."""
    if total == 0:
        return '<b>Overflow events</b> <span class="mpviz-muted">none so far</span>'
    rows = [(str(int(s)), html.escape(str(l)), html.escape(str(t)), html.escape(str(p)),
             "first" if f else "", str(int(n)) if n == n else "", "skipped" if sk else "")
            for s, l, t, p, f, n, sk in zip(df["step"], df["layer"], df["tensor"], df["phase"],
                                             df["first"], df["nonfinite"], df["skipped"])]
    shown = f"latest {len(rows)} of {total}" if total > len(rows) else f"{total}"
    return (f'<b>Overflow events</b> <span class="mpviz-muted">({shown})</span>'
            + html_table(["step", "layer", "tensor", "phase", "", "non-finite", ""], rows))


def run_label(path: Path, meta: dict | None = None) -> str:
    """Short label of a run for pickers and legends: its folder name and precision, and its
    status unless it finished ("running", "failed", "killed / not finished")."""
    meta = meta or {}
    bits = [path.name]
    extra = [str(meta[k]) for k in ("task", "precision") if meta.get(k)]
    if extra:
        bits.append("(" + ", ".join(extra) + ")")
    if meta.get("status") and meta["status"] != "finished":
        bits.append(f"· {queries.run_status(meta)}")
    return " ".join(bits)


def wrap_row(main: widgets.Widget, side: widgets.Widget, side_min_px: int = 420,
             cls: str = "mpviz-row") -> widgets.Box:
    """`main` (fixed width) and `side` side by side while `side` gets at least `side_min_px`;
    on a narrower page (JupyterLab with its file browser open) `side` wraps below `main` and
    takes the full width, instead of being squeezed into a narrow column."""
    side.layout.flex = f"1 1 {side_min_px}px"
    side.layout.min_width = f"{side_min_px}px"
    row = widgets.Box([widgets.Box([main], layout=widgets.Layout(flex="0 1 auto", max_width="100%",
                                                                 overflow="auto")), side],
                      layout=widgets.Layout(display="flex", flex_flow="row wrap",
                                            align_items="flex-start", width="100%"))
    row.add_class(cls)
    return row


def button(label: str, cls: str, style: str = "", icon: str = "") -> widgets.Button:
    b = widgets.Button(description=label, button_style=style, icon=icon,
                       layout=widgets.Layout(width="auto", flex="0 0 auto"))  # never "St…"
    b.add_class(cls)
    return b


class App:
    """Base of the three apps: displaying one shows its ``widget`` (the figures keep their
    page state current themselves, so nothing needs syncing first)."""

    widget: widgets.Box

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
