"""The per-layer precision menus and the rule box that the lab and the explorer's steering panel
both show. They keep nothing but their widgets: a pick or a rule goes to the owner's callback,
which applies it (the lab to its trainer, the steering panel to the job's mailbox)."""

from __future__ import annotations

import html
from typing import Any, Callable, Iterable

import ipywidgets as widgets

from ..formats import PRECISIONS
from . import ui

INHERIT = "(policy)"  # a menu's "no rule of its own": picking it removes the layer's rule


class PrecisionTable:
    """One row per layer: name and type, a cell the owner fills, a precision menu.

    A pick calls ``on_pick(layer, precision)`` (None for `INHERIT`); `show` sets menus without
    calling it."""

    def __init__(self, on_pick: Callable[[str, str | None], Any], row_class: str,
                 menu_class: str, widths: tuple[str, str, str] = ("48%", "32%", "20%"),
                 header: str = "") -> None:
        self.on_pick, self.row_class, self.menu_class = on_pick, row_class, menu_class
        self.widths, self.header = widths, header
        self.rows: dict[str, tuple[widgets.HTML, widgets.Dropdown]] = {}
        self._quiet = False
        self.widget = widgets.VBox()

    def build(self, layers: Iterable[tuple[str, str, Any, Any]],
              picked: dict[str, str] | None = None) -> None:
        """Rows for ``(name, type, n_params, depth)`` each; the root ("") has none (the whole
        model follows the base precision, or a ``*`` rule)."""
        picked = picked or {}
        label_w, cell_w, menu_w = self.widths
        rows, self.rows = [], {}
        for name, typ, n_params, depth in layers:
            if name == "":
                continue
            label = widgets.HTML(
                f'<span style="padding-left:{12 * (int(depth) - 1)}px" title="{html.escape(typ)}">'
                f'{html.escape(name)}</span> <span class="mpviz-muted">{html.escape(typ)} '
                f'{ui.fmt(n_params) if n_params else ""}</span>', layout=widgets.Layout(width=label_w))
            cell = widgets.HTML(layout=widgets.Layout(width=cell_w))
            cell.add_class("mpviz-cell")
            menu = widgets.Dropdown(options=(INHERIT,) + PRECISIONS, value=picked.get(name, INHERIT),
                                    layout=widgets.Layout(width=menu_w))
            menu.add_class(self.menu_class)
            menu.observe(lambda ch, n=name: self._picked(n, ch["new"]), names="value")
            row = widgets.HBox([label, cell, menu])
            row.add_class(self.row_class)
            self.rows[name] = (cell, menu)
            rows.append(row)
        self.widget.children = ([widgets.HTML(self.header)] if self.header else []) + rows

    def clear(self) -> None:
        self.rows = {}
        self.widget.children = []

    def _picked(self, layer: str, value: str) -> None:
        if not self._quiet:
            self.on_pick(layer, None if value == INHERIT else value)

    def show(self, picked: dict[str, str | None]) -> None:
        """Set these layers' menus (None: `INHERIT`) without calling ``on_pick``."""
        self._quiet = True
        try:
            for layer, value in picked.items():
                if layer in self.rows:
                    self.rows[layer][1].value = value or INHERIT
        finally:
            self._quiet = False

    def picked(self) -> dict[str, str]:
        """``{layer: precision}`` of the menus set to a precision."""
        return {n: menu.value for n, (_, menu) in self.rows.items() if menu.value != INHERIT}

    def set_cell(self, layer: str, text: str) -> None:
        cell = self.rows[layer][0]
        if cell.value != text:
            cell.value = text


class RuleBox:
    """A layer name or glob, a precision (or ``remove``: drop that rule) and a button, which
    calls ``on_send(pattern, precision or None)``; `msg` is the line under it."""

    def __init__(self, on_send: Callable[[str, str | None], Any], cls: str, button: str,
                 button_class: str, remove: str, placeholder: str,
                 msg: widgets.HTML | None = None) -> None:
        self.on_send, self.remove = on_send, remove
        self.text = widgets.Text(placeholder=placeholder, description="rule",
                                 layout=widgets.Layout(width="auto", flex="1 1 160px",
                                                       min_width="160px"))
        self.text.add_class(cls)
        self.precision = widgets.Dropdown(options=PRECISIONS + (remove,), value="fp32",
                                          layout=widgets.Layout(width="130px"))
        self.precision.add_class(f"{cls}-precision")
        self.button = ui.button(button, button_class)
        self.button.on_click(lambda _: self.submit(self.text.value, self.precision.value))
        self.msg = msg if msg is not None else widgets.HTML()
        if msg is None:
            self.msg.add_class(f"{cls}-msg")
        # On a narrow side panel the text shrinks and the button wraps below it: never clipped,
        # no sideways scrolling.
        self.row = widgets.HBox([self.text, self.precision, self.button],
                                layout=widgets.Layout(flex_flow="row wrap", width="100%"))
        self.row.add_class(f"{cls}-row")

    def submit(self, pattern: str, precision: str | None) -> bool:
        """Send ``pattern`` → ``precision`` (None or ``remove``: drop that rule); False when
        there is nothing to send or ``on_send`` refused it."""
        pattern = (pattern or "").strip()
        if not pattern:
            self.msg.value = '<span class="mpviz-bad">type a layer name or a glob first</span>'
            return False
        return bool(self.on_send(pattern, None if precision in (None, self.remove) else precision))
