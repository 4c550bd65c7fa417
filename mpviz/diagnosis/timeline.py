"""The explained loss-scale timeline, and GradScaler settings suggested from it."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

TIMELINE_COLUMNS = ["step", "scale", "scale_after", "event", "cause", "layers"]


def warmup_backoffs(steps: pd.DataFrame) -> int:
    """How many steps at the start of the run GradScaler skipped in a row (its scale finding a
    value that fits): the warm-up, which costs a few steps and is expected."""
    n = 0
    for skipped in steps["skipped"]:
        if not skipped:
            break
        n += 1
    return n


def scale_timeline(steps: pd.DataFrame, overflows: pd.DataFrame) -> pd.DataFrame:
    """One row per change of the loss scale: ``event`` ``backoff`` (a skipped step) or
    ``growth``; for a backoff, ``cause`` (``forward_overflow``: a layer's output went inf/nan
    in the forward, which no scale fixes; ``gradient_overflow``: only gradients did;
    ``nonfinite_loss``; ``unknown``) and ``layers`` (the forward culprit, or the layers whose
    gradients went non-finite, the first in backward order first)."""
    if not len(steps) or steps["loss_scale"].isna().all():
        return pd.DataFrame(columns=TIMELINE_COLUMNS)
    by_step = {s: g for s, g in overflows.groupby("step")} if len(overflows) else {}
    scale = steps["loss_scale"].to_numpy(dtype=float)
    after = steps["loss_scale_after"].to_numpy(dtype=float)
    changed = steps[~np.isnan(scale) & ~np.isnan(after) & (after != scale)]   # few of many steps
    rows = []
    for st, scale, after, loss in zip(changed["step"], changed["loss_scale"],
                                      changed["loss_scale_after"], changed["loss"]):
        if after > scale:
            rows.append((int(st), scale, after, "growth", None, []))
            continue
        ev = by_step.get(st)
        fwd = ev[(ev["phase"] == "forward")] if ev is not None else None
        if fwd is not None and len(fwd):
            first = fwd[fwd["first"]]
            layers = (first if len(first) else fwd)["layer"].tolist()[:1]
            cause = "forward_overflow"
        elif ev is not None and len(ev):
            bwd = ev[ev["phase"] == "backward"].sort_values("first", ascending=False, kind="stable")
            layers, cause = bwd["layer"].tolist(), "gradient_overflow"
        else:
            layers = []
            cause = "nonfinite_loss" if loss is None or not math.isfinite(loss) else "unknown"
        rows.append((int(st), scale, after, "backoff", cause, layers))
    return pd.DataFrame(rows, columns=TIMELINE_COLUMNS)


def scale_advice(steps: pd.DataFrame, timeline: pd.DataFrame,
                 settings: dict[str, Any] | None) -> dict[str, Any]:
    """Suggested GradScaler settings: ``init_scale``, the scale the warm-up settled on (when it
    skipped steps); ``growth_interval`` x4 when, after the warm-up, the scale keeps growing into
    overflows (more than 1% of steps skipped). Forward overflows are not the scaler's business."""
    if not settings or not settings.get("enabled") or not len(steps):
        return {}
    out: dict[str, Any] = {"init_scale": None, "growth_interval": None, "reason": ""}
    reasons = []
    n_warm = warmup_backoffs(steps)
    fwd = timeline[timeline["cause"] == "forward_overflow"] if len(timeline) else timeline
    if 0 < n_warm < len(steps) and not len(fwd):
        settled = float(steps["loss_scale"].iloc[n_warm])
        if settled > 0:
            out["init_scale"] = 2.0 ** math.floor(math.log2(settled))
            reasons.append(f"the first {n_warm} steps were skipped while the scale fell from "
                           f"{steps['loss_scale'].iloc[0]:g} to {settled:g}: start there")
    later = timeline[(timeline["event"] == "backoff") & (timeline["step"] >= n_warm)
                     & (timeline["cause"] == "gradient_overflow")] if len(timeline) else timeline
    after = len(steps) - n_warm
    if after > 0 and len(later) > max(2, 0.01 * after):
        gi = int(settings.get("growth_interval") or 2000)
        out["growth_interval"] = gi * 4
        reasons.append(f"{len(later)} of the {after} steps after warm-up were skipped by "
                       f"gradient overflows as the scale grew back every {gi} steps: grow it "
                       "less often")
    out["reason"] = "; ".join(reasons)
    return out if reasons else {}
