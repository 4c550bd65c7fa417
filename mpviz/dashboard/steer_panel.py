"""The explorer's steering panel: a per-layer precision menu for a live, steerable run.

It posts requests with :func:`mpviz.steer` (the run directory is the mailbox, see
:mod:`mpviz.mailbox`) and shows each one's fate as the training process reports it: pending,
applied at step N (the loss curve's ★ marks that step), or refused with the reason. Shown only for
a run recorded with ``Recorder(..., steerable=True)`` whose status is ``running``.

It also sends the Diagnosis panel's "Apply advice" (:meth:`SteerPanel.apply_advice`): what
:func:`mpviz.advise` keeps in high precision, as one request (:func:`mpviz.mailbox.advice_rules`),
shown with the reasons and followed like the others. No torch at import; the advice imports it
(``mpviz.advise`` returns a PrecisionPolicy), only for a live steerable run.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..formats import PRECISIONS
from . import queries, ui
from .policy_widgets import INHERIT, PrecisionTable, RuleBox

SHOWN_REQUESTS = 8


class SteerPanel:
    """Per-layer precision menus, a glob rule box, and the latest requests with their status."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self._own: dict[int, str] = {}  # request id -> the layer row it was sent from
        self._requests: Any = None  # the last steer_requests() read
        self._in_force: dict[str, tuple[Any, Any]] = {}  # layer -> (precision, rule) in force
        self._advice_sent: tuple[int, dict, dict, dict] | None = None  # id, rules, reasons, estimate
        self.advice = widgets.HTML()   # the advice request's fate (shown in the Diagnosis panel)
        self.error = ""   # why the last request could not be posted
        self.note = widgets.HTML()
        self.note.add_class("mpviz-steer-note")
        self.table = PrecisionTable(lambda layer, value: self._post({layer: value}, layer),
                                    "mpviz-steer-row", "mpviz-steer-menu", ("40%", "40%", "20%"))
        self.table.widget.layout = widgets.Layout(max_height="320px", overflow="auto")
        self.rules = RuleBox(lambda pattern, value: self._post({pattern: value}),
                             "mpviz-steer-rule", "Send", "mpviz-steer-send", INHERIT,
                             "layer or glob, e.g. blocks.*.norm*", msg=self.note)
        self.rule, self.rule_precision = self.rules.text, self.rules.precision   # tests fill them
        self.requests = widgets.HTML()
        self.requests.add_class("mpviz-steer-requests")
        self.widget = widgets.VBox(
            [widgets.HTML("<b>Steer this run</b> <span class='mpviz-muted'>precision per layer, "
                          "applied by the training process at its next step</span>"),
             self.note, self.table.widget, self.rules.row, self.requests],
            layout=widgets.Layout(display="none"))
        self.widget.add_class("mpviz-steer")

    @property
    def _rows(self) -> dict[str, tuple[widgets.HTML, widgets.Dropdown]]:   # read by tests
        return self.table.rows

    # ------------------------------------------------------------------ showing a run
    def show(self, run: Any) -> None:
        """Build the menu for ``run`` if it is live and steerable; hide the panel otherwise."""
        meta = run.meta if run is not None else {}
        if not (meta.get("steerable") and meta.get("status") == "running") or queries.process_gone(meta):
            self.hide()
            return
        if self.run_dir != Path(run.run_dir):
            self._advice_sent, self.advice.value = None, ""
        self.run_dir = Path(run.run_dir)
        self._own = {}
        layers = run.layers
        self.table.build(zip(layers["layer"], layers["type"], layers["n_params"], layers["depth"]),
                         _own_rules(run))
        self.note.value = ""
        self.widget.layout.display = "flex"
        self.refresh(run)

    def hide(self) -> None:
        self.run_dir, self._advice_sent, self.advice.value = None, None, ""
        self.widget.layout.display = "none"

    # ------------------------------------------------------------------ posting
    def _send_rule(self) -> None:
        self.rules.submit(self.rule.value, self.rule_precision.value)

    def _post(self, rules: dict[str, str | None], layer: str | None = None) -> int | None:
        import mpviz

        if self.run_dir is None:
            return None
        try:
            rid = mpviz.steer(self.run_dir, rules)
        except (mpviz.SteerError, TypeError) as e:
            self.note.value = f"<span class='mpviz-bad'>{html.escape(str(e))}</span>"
            self.error = str(e)
            return None
        what = ", ".join(f"{k or '(model)'} → {v or 'no rule'}" for k, v in rules.items())
        if layer is not None:
            self._own[rid] = layer
        self.note.value = (f"request #{rid} sent ({html.escape(what)}): "
                           "<span class='mpviz-steer-pending'>pending</span> until the next step")
        self._show_requests()
        self._draw_rows()
        return rid

    # ------------------------------------------------------------------ following
    def refresh(self, run: Any) -> None:
        """Re-read the requests and the precision in force per layer (the explorer's redraw)."""
        if self.run_dir is None or run is None:
            return
        if not run.is_live:
            self.note.value = "the run has ended: nothing more can be steered"
            self.table.clear()
        self._show_requests()
        self._in_force = _in_force(run)
        self._draw_rows()
        self._draw_advice()

    # ------------------------------------------------------------------ advice (mpviz.advise)
    def advice_offer(self, run: Any, diagnosis: Any = None) -> tuple[bool, str]:
        """Whether "Apply advice" has something to send to ``run`` now; if not, why not.
        ``diagnosis``: ``mpviz.diagnose(run)`` if made already (the advice reuses it)."""
        import mpviz
        from mpviz.diagnosis.advise import advice_rules, advice_target
        from mpviz.mailbox import FIX, process_gone

        if run is None:
            return False, "no run open"
        meta = run.meta
        if not meta.get("steerable"):
            return False, (f"advice can be sent only to a steerable run: {FIX} to apply it "
                           "from here (or use mpviz.advise(run) in the training script)")
        if meta.get("status") != "running" or self.run_dir != Path(run.run_dir):
            return False, (f"the run is {meta.get('status')}: advice can be sent only to a job "
                           "still training")
        if process_gone(meta):
            return False, (f"the run's process (pid {meta.get('pid')}) is gone: advice can be "
                           "sent only to a job still training")
        if self._advice_pending():
            return False, f"advice request #{self._advice_sent[0]} is pending"
        applied_at = self._advice_step()
        if applied_at is not None and run.last_step < applied_at:   # not in run.policy_changes yet
            return False, (f"advice request #{self._advice_sent[0]} applies from step "
                           f"{applied_at}: waiting for the job to record it")
        policy = mpviz.advise(run, target=advice_target(run), diagnosis=diagnosis)
        rules = advice_rules(run, policy)
        if not rules:
            kept = "/".join(sorted({policy.rules[l] for l in policy.reasons}))
            return False, ("the advice changes nothing: " + (
                f"{', '.join(policy.reasons)} already run in {kept}" if policy.reasons
                else "no layer needs high precision"))
        return True, "send " + _rules_text(rules) + " to the job (mpviz.advise), from its next step"

    def apply_advice(self) -> str:
        """Send :func:`mpviz.advise` for the open run as one request; the HTML saying what was
        sent, with the reasons (refreshed as the job applies or refuses it)."""
        import mpviz
        from mpviz.diagnosis.advise import advice_rules, advice_target

        if self.run_dir is None:
            raise mpviz.SteerError("no live steerable run is open")
        if self._advice_pending():
            return self.advice.value
        run = mpviz.load_run(self.run_dir)
        try:
            policy = mpviz.advise(run, target=advice_target(run))
            rules = advice_rules(run, policy)
        finally:
            run.close()
        if not rules:
            return '<span class="mpviz-muted">advice: nothing to change in this job</span>'
        rid = self._post(rules)
        if rid is None:   # refused here (the run ended, ...)
            raise mpviz.SteerError(self.error)
        reasons = {l: policy.reasons[l] for l in rules}
        self._advice_sent = (rid, rules, reasons, dict(policy.estimate))
        self._draw_advice()
        return self.advice.value

    def _advice_row(self) -> Any:
        """The sent advice's row of the last ``steer_requests()`` read (None: none sent or read
        yet; empty while the read predates it)."""
        if self._advice_sent is None or self._requests is None:
            return None
        return self._requests[self._requests["id"] == self._advice_sent[0]]

    def _advice_pending(self) -> bool:
        row = self._advice_row()
        return row is not None and bool(len(row)) and row["status"].iloc[0] == "pending"

    def _advice_step(self) -> int | None:
        """The step the sent advice applies from, once the job applied it."""
        row = self._advice_row()
        if row is None or not len(row) or row["status"].iloc[0] != "applied":
            return None
        return int(row["step"].iloc[0])

    def _draw_advice(self) -> None:
        row = self._advice_row()
        if row is None:
            return
        rid, rules, reasons, estimate = self._advice_sent
        status = _status_html(row.iloc[0]) if len(row) else _status_html({"status": "pending"})
        lines = [f"<code>{html.escape(l)}</code> → {html.escape(p)}: {html.escape(reasons.get(l, ''))}"
                 for l, p in rules.items()]
        share = (estimate or {}).get("time_share")
        tail = (f'<br><span class="mpviz-muted">~{share:.0%} of the matmul work stays in high '
                "precision</span>" if isinstance(share, float) and math.isfinite(share) else "")
        text = (f"<b>Advice sent</b> as request #{rid} · <span class='mpviz-advice-status'>"
                f"{status}</span><br>" + "<br>".join(lines) + tail)
        if self.advice.value != text:
            self.advice.value = text

    def _draw_rows(self) -> None:
        """Each row: the precision in force (and the rule that set it), and the fate of the
        last request sent from that row."""
        for name in list(self.table.rows):
            precision, rule = self._in_force.get(name, (None, None))
            if precision:
                text = (f"<b>{html.escape(str(precision))}</b> "
                        f"<span class='mpviz-muted'>({html.escape(str(rule))})</span>")
            else:
                text = "<span class='mpviz-muted'>autocast</span>"
            self.table.set_cell(name, text + self._row_status(name))

    def _row_status(self, layer: str) -> str:
        reqs = self._requests
        mine = [rid for rid, lay in self._own.items() if lay == layer]
        if not mine or reqs is None:
            return ""
        row = reqs[reqs["id"] == max(mine)]
        return " · " + _status_html(row.iloc[0]) if len(row) else ""

    def _show_requests(self) -> None:
        import mpviz.mailbox as mailbox

        if self.run_dir is None:
            return
        self._requests = reqs = mailbox.steer_requests(self.run_dir)
        if reqs.empty:
            self.requests.value = "<span class='mpviz-muted'>no requests yet</span>"
            return
        shown = reqs.iloc[::-1].head(SHOWN_REQUESTS)
        rows = [(str(int(r["id"])), html.escape(_rules_text(r["rules"])), _status_html(r),
                 time.strftime("%H:%M:%S", time.localtime(float(r["time"]))))
                for _, r in shown.iterrows()]
        self.requests.value = ui.html_table(["#", "rules", "status", "sent"], rows)


def _rules_text(rules: Any) -> str:
    if not isinstance(rules, dict):
        return str(rules)
    return ", ".join(f"{queries.layer_label(k)} → {v or 'no rule'}" for k, v in rules.items())


def _status_html(r: Any) -> str:
    status = str(r["status"])
    if status == "applied":
        return f"<span class='mpviz-steer-applied'>applied at step {int(r['step'])}</span>"
    if status == "refused":
        return f"<span class='mpviz-bad mpviz-steer-refused'>refused: {html.escape(str(r['reason']))}</span>"
    return "<span class='mpviz-steer-pending'>pending</span>"


def _in_force(run: Any) -> dict[str, tuple[Any, Any]]:
    """``{layer: (precision, rule)}`` in force now, from ``run.policy_changes`` (its last change;
    precision None: the layer went back to the outer autocast)."""
    last = run.policy_changes.drop_duplicates("layer", keep="last")
    return {str(layer): (p if isinstance(p, str) else None, rule if isinstance(rule, str) else None)
            for layer, p, rule in zip(last["layer"], last["precision"], last["rule"])}


def _own_rules(run: Any) -> dict[str, str]:
    """Layers with a rule of their own in force: ``{layer: precision}``."""
    return {layer: str(p) for layer, (p, rule) in _in_force(run).items()
            if p and rule == layer and p in PRECISIONS}
