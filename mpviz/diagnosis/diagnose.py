"""``diagnose(run)``: name what went wrong in a recorded run, where, and what to change.

Each rule reads what the run already holds (steps, overflow events, statistics, histograms,
recorded diagnostics) and returns findings; nothing here imports torch.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..formats import FORMATS, NONFINITE_BIN, SUBNORMAL_BIN, ZERO_BIN, bin_of
from ..run import Run, hist_chunks, load_run
from .findings import Diagnosis, Finding, layer_name as _name
from .headroom import bits, headroom, hist_percentiles
from .timeline import scale_timeline, scale_advice, warmup_backoffs

# Thresholds (module constants, so the dashboards and the docs can quote them)
CONSECUTIVE_SKIPS = 3          # this many skipped steps in a row with forward overflows: an error
COLLAPSE_SKIPS = 10            # this many in a row, or a scale below 1: the scale collapsed
UNDERFLOW_BITS = 4.0           # 1% of nonzero gradients within this many bits of fp16's floor
LOST_UPDATES_WARN, LOST_UPDATES_ERROR = 0.25, 0.75
SHADOW_REL_ERR = 0.05          # relative error of a layer's output against fp32
GROWTH = 8.0                   # a layer's max |w| grown this much before it overflowed: the lr
MAX_HIST_STEPS = 200           # gradient underflow: histograms of at most this many steps


def _runs(steps: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs in a sorted list of steps: [(first, last), ...]."""
    out: list[tuple[int, int]] = []
    for s in steps:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _output_dtype(dtypes: pd.DataFrame, layer: str, step: int) -> str | None:
    d = dtypes[(dtypes["layer"] == layer) & (dtypes["tensor"] == "output") & (dtypes["step"] <= step)]
    return d["dtype"].iloc[-1] if len(d) else None


def _weight_growth(weights: pd.DataFrame, layer: str, at: int) -> tuple[float, int, int] | None:
    """How much ``layer``'s max |w| grew from the first statistics step to the first one at or
    after step ``at``: (factor, from step, to step), or None without two such rows."""
    w = weights[weights["layer"] == layer].sort_values("step")
    later = w[w["step"] >= at]
    if not len(w) or not len(later) or later["step"].iloc[0] == w["step"].iloc[0]:
        return None
    a, b = float(w["max_abs"].iloc[0]), float(later["max_abs"].iloc[0])
    return (b / a if a > 0 else math.inf), int(w["step"].iloc[0]), int(later["step"].iloc[0])


def _forward_overflow(steps: pd.DataFrame, ov: pd.DataFrame, dtypes: pd.DataFrame,
                      weights: pd.DataFrame) -> list[Finding]:
    fwd = ov[(ov["phase"] == "forward") & ov["first"]]
    out = []
    skipped = set(steps.loc[steps["skipped"], "step"].tolist())
    for layer, g in fwd.groupby("layer", sort=False):
        st = sorted(set(g["step"].tolist()))
        longest = max((b - a + 1 for a, b in _runs([s for s in st if s in skipped])), default=0)
        dt = _output_dtype(dtypes, layer, st[0])
        low_precision = dt in ("float16", "bfloat16") or dt is None or dt.startswith("float8")
        sev = "error" if longest >= CONSECUTIVE_SKIPS or len(st) >= max(3, 0.1 * len(steps)) else "warning"
        msg = (f"the output of {_name(layer)} went inf/nan in the forward pass (it was "
               f"{dt or 'of unknown dtype'}) at {len(st)} step{'s' * (len(st) > 1)}")
        if longest >= 2:
            msg += (f", {longest} of them skipped in a row: loss scaling cannot fix a forward "
                    "overflow (the loss scale multiplies only the loss and the gradients), so "
                    "GradScaler kept halving the scale to no effect")
        msg += "."
        growth = _weight_growth(weights, layer, st[0])
        grew = growth is not None and growth[0] >= GROWTH
        if grew:
            msg += (f" Its weights' max |w| grew {growth[0]:.0f}x from step {growth[1]} to step "
                    f"{growth[2]}: the learning rate is too high for this model.")
        if grew:
            sug = (f"lower the learning rate first (keeping {_name(layer)} in fp32 alone would move "
                   f"the overflow to the layers after it); then, if {_name(layer)} still "
                   f"overflows, keep it in fp32: PrecisionPolicy({{'*': 'fp16', {layer!r}: 'fp32'}}).")
        elif low_precision:
            sug = (f"keep {_name(layer)} in fp32 (or bf16, whose range is fp32's): "
                   f"PrecisionPolicy({{'*': 'fp16', {layer!r}: 'fp32'}}), or mpviz.advise(run). "
                   "If its weights grew after a too-high learning rate, lower the learning rate.")
        else:
            sug = ("the layer overflowed in fp32 too: training diverged; lower the learning rate, "
                   "clip gradients, or normalise this layer's input.")
        out.append(Finding("forward_overflow", sev, (st[0], st[-1]), [layer], msg, sug,
                           {"steps": len(st), "consecutive_skips": longest, "dtype": dt}))
    return out


def _gradient_overflow(steps: pd.DataFrame, timeline: pd.DataFrame, settings: Any) -> list[Finding]:
    if not len(timeline):
        return []
    back = timeline[(timeline["event"] == "backoff") & (timeline["cause"] == "gradient_overflow")]
    if not len(back):
        return []
    n_warm = warmup_backoffs(steps)
    later = back[back["step"] >= n_warm]
    counts: dict[str, int] = {}
    for layers in back["layers"]:
        for l in layers[:1]:  # the first layer in backward order whose gradient went inf/nan
            counts[l] = counts.get(l, 0) + 1
    layers = sorted(counts, key=lambda l: -counts[l])
    n_after = len(steps) - n_warm
    runs = [(a, b) for a, b in _runs(back["step"].tolist()) if a >= n_warm]  # after warm-up
    longest = max((b - a + 1 for a, b in runs), default=0)
    if longest >= COLLAPSE_SKIPS:
        sev = "error"
    elif len(later) > max(2, 0.01 * max(n_after, 1)):
        sev = "warning"
    else:
        sev = "info"
    msg = (f"GradScaler skipped {len(back)} step{'s' * (len(back) > 1)} because gradients "
           f"overflowed ({len(back) - len(later)} during the warm-up at the start, {len(later)} "
           f"after); first to overflow in backward: "
           + ", ".join(f"{_name(l)} ({counts[l]}x)" for l in layers[:4]) + ".")
    if sev == "info":
        sug = "nothing to change: this is GradScaler finding its scale."
    elif sev == "warning":
        sug = ("skips cost steps: a longer growth_interval (GradScaler(growth_interval=...)) "
               f"grows the scale into overflow less often; or keep {_name(layers[0])} in bf16/fp32.")
    else:
        sug = (f"gradients of {_name(layers[0])} overflow fp16 even at a small scale: lower the "
               "learning rate, clip gradients, or keep that layer in bf16/fp32.")
    return [Finding("gradient_overflow", sev, (int(back["step"].min()), int(back["step"].max())),
                    layers, msg, sug, {"skips": len(back), "after_warmup": len(later),
                                       "longest_run": longest})]


def _scale_collapse(steps: pd.DataFrame, timeline: pd.DataFrame, fwd: list[Finding]) -> list[Finding]:
    sc = steps.dropna(subset=["loss_scale"])
    if not len(sc):
        return []
    low = float(np.nanmin(np.r_[sc["loss_scale"].to_numpy(), sc["loss_scale_after"].to_numpy()]))
    skipped = sc.loc[sc["skipped"], "step"].tolist()
    n_warm = warmup_backoffs(sc)  # a warm-up that ended is GradScaler finding its scale
    runs = [r for r in _runs(skipped) if not (n_warm < len(sc) and r[0] == sc["step"].iloc[0])]
    longest = max(((a, b) for a, b in runs), key=lambda r: r[1] - r[0], default=None)
    n_long = longest[1] - longest[0] + 1 if longest else 0
    if low >= 1 and n_long < COLLAPSE_SKIPS:
        return []
    first = float(sc["loss_scale"].iloc[0])
    span = longest if longest else (int(sc["step"].iloc[0]), int(sc["step"].iloc[-1]))
    msg = (f"the loss scale fell from {first:g} to {low:g} (2^{math.log2(low):.0f}) "
           f"with {n_long} steps skipped in a row ({span[0]}-{span[1]}).") if low > 0 else (
           f"the loss scale fell from {first:g} to 0 with {n_long} steps skipped in a row.")
    if fwd:
        layers = [f.layers[0] for f in fwd]
        msg += (" Caused by the forward overflow in " + ", ".join(map(_name, layers))
                + ": no loss scale can fix it.")
        sug = "fix the forward overflow (see above); the scale recovers by itself."
    else:
        back = timeline[timeline["event"] == "backoff"] if len(timeline) else timeline
        layers = sorted({l for ls in back["layers"] for l in ls[:1]}) if len(back) else []
        msg += " Gradients overflowed even at a tiny scale: they exceed fp16's range unscaled."
        sug = ("lower the learning rate or clip gradients; keep the layers named here in "
               "bf16/fp32 (mpviz.advise(run)).")
    return [Finding("scale_collapse", "error", span, layers, msg, sug,
                    {"min_scale": low, "first_scale": first, "longest_skip_run": n_long})]


def _nonfinite_loss(steps: pd.DataFrame, ov: pd.DataFrame, fwd: list[Finding]) -> list[Finding]:
    # SQLite stores NaN as NULL, as it does a loss never given: a NULL loss counts as
    # non-finite on steps that went wrong (skipped, inf/nan gradients, an overflow event).
    loss = pd.to_numeric(steps["loss"], errors="coerce").to_numpy(dtype=float)
    went_wrong = (steps["skipped"] | steps["nonfinite_grads"] | steps["step"].isin(ov["step"])).to_numpy()
    is_bad = np.isinf(loss) | (np.isnan(loss) & went_wrong)
    bad = steps[is_bad]
    if not len(bad):
        return []
    st = bad["step"].tolist()
    last_bad = bool(is_bad[-1])
    culprits = ov[(ov["phase"] == "forward") & ov["first"] & ov["step"].isin(st)]
    layers = culprits["layer"].value_counts().index.tolist()
    msg = (f"the loss was inf/nan at {len(st)} of {len(steps)} steps (first {st[0]}"
           + (", still at the last step" if last_bad else "") + ")")
    sev = "error" if last_bad or len(st) > max(3, 0.1 * len(steps)) else "warning"
    if fwd:
        msg += "; explained by the forward overflow in " + ", ".join(_name(f.layers[0]) for f in fwd) + "."
        sug = "fix the forward overflow (see above)."
    else:
        msg += (("; the first layer whose output went inf/nan: " + ", ".join(map(_name, layers[:3])))
                if layers else "") + "."
        sug = ("training diverged: lower the learning rate, add warm-up or gradient clipping, "
               "and check the data for inf/nan.")
    return [Finding("nonfinite_loss", sev, (st[0], st[-1]), layers, msg, sug,
                    {"steps": len(st), "at_end": last_bad})]


def _vanished(run: Any, steps: pd.DataFrame, picked: list[int],
              at_floor: set[int]) -> tuple[dict[str, list[int]], list[int]]:
    """Gradients that underflowed to exactly zero: ({layer: statistics steps}, the steps where
    every layer's gradient was zero).

    A layer's gradient counts on a statistics step when all of it is zero (max |g| = 0, exact),
    the layer ran in fp16 that step (its output or its weights float16), the loss was not 0, no
    module's output was entirely zero (a ReLU dead for the whole batch, or a zero-initialised
    layer, zeroes the gradients behind it with no underflow), and the run shows that gradients
    were at fp16's floor: every layer's was zero at once (the loss's own gradient vanished
    before it reached any weight), or other layers' sat at the floor that step. A frozen layer,
    or one that got no gradient, has no gradient row, and a gradient zero only in part (an
    embedding's unused rows, some dead units) is not all zero: neither is named."""
    if not run.any_zero("grad", picked):
        return {}, []   # no gradient all zero (the rows below are many in a long run)
    s = run.stats_at(picked)
    grad, act = s[s["tensor"] == "grad"], s[s["tensor"] == "activation"]
    zero = grad[grad["max_abs"] == 0]
    if not len(zero):
        return {}, []
    low = s[(s["tensor"] != "grad") & (s["dtype"] == "float16")]
    fp16 = set(zip(low["step"], low["layer"]))
    cut = set(act.loc[act["max_abs"] == 0, "step"])
    loss = dict(zip(steps["step"], pd.to_numeric(steps["loss"], errors="coerce")))
    n_grad, n_zero = grad.groupby("step").size(), zero.groupby("step").size()
    all_zero = {st for st, n in n_zero.items() if n == n_grad[st]}
    out: dict[str, list[int]] = {}
    for st, layer in zip(zero["step"], zero["layer"]):
        if ((st, layer) in fp16 and st not in cut and loss.get(st) != 0
                and (st in all_zero or st in at_floor)):
            out.setdefault(layer, []).append(int(st))
    named = {st for v in out.values() for st in v}
    return out, sorted(int(st) for st in all_zero & named)


def _grad_floor(run: Any, steps: pd.DataFrame, low_layers: set[str]) -> tuple[pd.DataFrame, list[int]]:
    """The gradient histograms of ``low_layers`` on at most MAX_HIST_STEPS statistics steps,
    evenly spread (a long run has thousands), and those steps. Per histogram with a nonzero
    finite value: ``bits`` from the 1st percentile of |g| != 0, at the loss scale in force, to
    fp16's subnormal floor; ``frac``, the share of the nonzero values that are fp16 subnormals."""
    have = run.grad_histogram_steps()
    if not len(have):
        return pd.DataFrame(columns=["step", "layer", "bits", "frac"]), []
    pick = have.iloc[np.unique(np.linspace(0, len(have) - 1, min(len(have), MAX_HIST_STEPS)).astype(int))]
    h = run.grad_histograms_at(pick)
    h = h[h["layer"].isin(low_layers)]
    s = h["step"].map(dict(zip(steps["step"], steps["loss_scale"].fillna(1.0)))).to_numpy(dtype=float)
    s = np.where(s > 0, s, 1.0)   # no scale recorded (or 0): gradients as recorded
    # per histogram: bins below `cut` hold values that, times the scale, are fp16 subnormals
    cut = np.clip(bin_of(math.log2(FORMATS["fp16"].min_normal) - np.round(np.log2(s))).astype(int),
                  SUBNORMAL_BIN, NONFINITE_BIN)
    p1, nz, sub = np.empty(len(h)), np.empty(len(h)), np.empty(len(h))
    for rows, counts in hist_chunks(h["lo"], h["counts"]):
        cum = np.cumsum(counts, axis=1)
        p1[rows] = hist_percentiles(counts, 1.0)
        nz[rows] = cum[:, NONFINITE_BIN - 1] - cum[:, ZERO_BIN]                 # nonzero, finite
        sub[rows] = cum[np.arange(len(counts)), cut[rows] - 1] - cum[:, ZERO_BIN]  # ... below cut
    ok = p1 > 0   # a histogram with a nonzero finite value
    g = pd.DataFrame({"step": h["step"].to_numpy()[ok].astype(int), "layer": h["layer"].to_numpy()[ok],
                      "bits": bits("fp16", np.nan, p1[ok], s[ok])[1], "frac": sub[ok] / nz[ok]})
    return g, pick.tolist()


def _gradient_underflow(run: Any, steps: pd.DataFrame, dtypes: pd.DataFrame) -> list[Finding]:
    """Layers whose gradients, at the loss scale in force, sit at fp16's subnormal floor or
    underflowed to zero altogether (:func:`_vanished`)."""
    low_layers = set(dtypes.loc[(dtypes["tensor"].isin(["output", "weight"]))
                                & (dtypes["dtype"] == "float16"), "layer"])
    if not low_layers:
        return []
    g, pick = _grad_floor(run, steps, low_layers)
    if not pick:
        return []
    med = g.groupby("layer", sort=False)[["bits", "frac"]].median()
    hits = list(med.index[med["bits"] < UNDERFLOW_BITS])
    at_floor = set(g.loc[g["bits"] < UNDERFLOW_BITS, "step"].tolist())
    gone, everywhere = _vanished(run, steps, pick, at_floor)
    if not hits and not gone:
        return []
    hit_steps = g.loc[g["layer"].isin(hits), "step"].tolist()
    first = min(hit_steps + [v[0] for v in gone.values()])
    last = max(hit_steps + [v[-1] for v in gone.values()])
    frac = {l: float(med.at[l, "frac"]) for l in hits}
    zs = run.zero_fractions("grad")
    zero = zs.groupby("layer")["z"].median().to_dict() if len(zs) else {}
    layers = sorted(hits, key=lambda l: -frac[l]) + [l for l in gone if l not in hits]
    scaled = bool(steps["loss_scale"].notna().any())
    msg = _underflow_message(layers, frac, zero, gone, everywhere, len(pick), scaled)
    sug = ("turn loss scaling on: torch.amp.GradScaler() (init_scale 2^16 is a good start)"
           if not scaled else "raise the loss scale (GradScaler(init_scale=...)); or use bf16.")
    worst = max(list(frac.values()) + [len(v) / len(pick) for v in gone.values()])
    return [Finding("gradient_underflow", "error" if worst > 0.25 else "warning",
                    (first, last), layers, msg, sug,
                    {"subnormal_frac": frac, "zero_frac": {l: zero.get(l) for l in layers},
                     "zero_steps": gone, "all_zero_steps": everywhere, "loss_scaling": scaled})]


def _underflow_message(layers: list[str], frac: dict[str, float], zero: dict[str, float],
                       gone: dict[str, list[int]], everywhere: list[int], n_steps: int,
                       scaled: bool) -> str:
    floor = math.log2(FORMATS["fp16"].min_subnormal)        # -24
    at_scale = " at the loss scale in force" if scaled else ""
    parts = []
    if frac:
        parts.append("gradients of " + ", ".join(
            f"{_name(l)} ({zero.get(l, 0):.0%} zeros, {frac[l]:.0%} of the rest subnormal)"
            for l in layers[:4] if l in frac)
            + f" sit at fp16's floor (2^{floor:.0f}){at_scale}: smaller values were flushed to "
            "zero in the backward pass, and the survivors below 2^-14 keep few significant bits")
    if gone:
        names = [l for l in layers if l in gone]
        n = [len(gone[l]) for l in names[:4]]
        parts.append("the gradients of " + ", ".join(map(_name, names[:4]))
            + (f" and {len(names) - 4} more layers" if len(names) > 4 else "")
            + f" were entirely zero on {n[0] if len(set(n)) == 1 else ', '.join(map(str, n))} "
            f"of {n_steps} statistics steps" + (" respectively" if len(set(n)) > 1 else "")
            + (f" (on {len(everywhere)} of them every layer's at once, though the loss was not 0)"
               if everywhere else "")
            + f": they underflowed fp16 in the backward pass{at_scale}, and no gradient reached "
            "these weights on those steps")
    return "; ".join(parts) + "."


def _lost_updates(run: Any) -> list[Finding]:
    lu = run.lost_updates()
    if not len(lu):
        return []
    med = lu.groupby("layer", sort=False)["lost_frac"].median()
    hits = med[med >= LOST_UPDATES_WARN].sort_values(ascending=False)
    if not len(hits):
        return []
    st = lu[lu["layer"].isin(hits.index)]["step"]
    sev = "error" if hits.max() >= LOST_UPDATES_ERROR else "warning"
    msg = ("weights held in low precision lost most of their optimizer updates (rounded away: "
           "the update was smaller than half a unit in the last place): "
           + ", ".join(f"{_name(l)} {v:.0%}" for l, v in hits.head(4).items()) + " of elements "
           "with a nonzero gradient stayed unchanged (median over statistics steps).")
    sug = ("keep fp32 master weights: train the fp32 model under torch.autocast instead of "
           "model.to(bfloat16), or use stochastic rounding / Kahan summation, or a larger "
           "learning rate for these layers.")
    return [Finding("lost_updates", sev, (int(st.min()), int(st.max())), hits.index.tolist(),
                    msg, sug, {"median_lost_frac": hits.to_dict()})]


def _precision_loss(run: Any) -> list[Finding]:
    sh = run.shadow()
    if not len(sh):
        return []
    # the output's error, or the weight gradients' (backward shadow) where larger
    sh = sh.assign(err=np.fmax(sh["rel_err"].astype(float), sh["grad_rel_err"].astype(float)))
    med = sh.groupby("layer", sort=False)["err"].median()
    hits = med[med > SHADOW_REL_ERR].sort_values(ascending=False)
    if not len(hits):
        worst = med.sort_values(ascending=False).head(3)
        return [Finding("precision_loss", "info", (int(sh["step"].min()), int(sh["step"].max())),
                        worst.index.tolist(),
                        "fp32 shadow error is small: " + ", ".join(
                            f"{_name(l)} {v:.2g}" for l, v in worst.items()) + " (relative, median).",
                        "", {"median_rel_err": med.to_dict()})]
    st = sh[sh["layer"].isin(hits.index)]["step"]
    msg = ("outputs (or weight gradients) differ from the same layer rerun in fp32 on the same "
           "inputs (upstream gradient) by "
           + ", ".join(f"{_name(l)} {v:.1%}" for l, v in hits.head(4).items())
           + " (relative error, median over shadow steps).")
    return [Finding("precision_loss", "warning", (int(st.min()), int(st.max())),
                    hits.index.tolist(), msg,
                    "keep these layers in fp32 (mpviz.advise(run)) if the loss suffers.",
                    {"median_rel_err": hits.to_dict()})]


def _headroom_notes(run: Any, scaling: bool) -> list[str]:
    """Headroom against fp16 at the last statistics step, in words."""
    last = run.last_stats_step()
    if last is None:
        return []
    h = headroom(run, formats=["fp16"], step=int(last))
    h = h[(h["layer"] != "") & np.isfinite(h["bits_to_overflow"].astype(float))]
    notes = []
    g = h[h["tensor"] == "grad"]
    if scaling and len(g):
        w = g.loc[g["bits_to_overflow"].astype(float).idxmin()]
        k = math.floor(w["bits_to_overflow"])
        notes.append(f"at step {int(last)} (loss scale {w['scale']:g}) the scale can double {k} more "
                     f"time{'s' * (k != 1)} before the gradients of {_name(w['layer'])} overflow fp16"
                     if k >= 0 else f"at step {int(last)} the gradients of {_name(w['layer'])} are "
                     f"past fp16's range at the loss scale in force ({w['scale']:g})")
    a = h[h["tensor"] == "activation"]
    out = run.dtype_map(int(last))
    if "output" in out:  # layers that ran in fp16, if any did (an fp32 run: all of them)
        f16 = set(out.index[out["output"] == "float16"])
        a = a[a["layer"].isin(f16)] if f16 else a
    if len(a):
        w = a.loc[a["bits_to_overflow"].astype(float).idxmin()]
        b = float(w["bits_to_overflow"])
        notes.append(f"at step {int(last)} the activation closest to fp16's largest value is the "
                     f"output of {_name(w['layer'])}: "
                     + (f"{b:.1f} bits of headroom" if b >= 0 else
                        f"{-b:.1f} bits past it (it would overflow in fp16)"))
    return notes


def diagnose(run: Any) -> Diagnosis:
    """What went wrong in a run, where, and what to change.

    ``run``: a :class:`mpviz.Run` or a run directory. Returns a :class:`Diagnosis` whose
    ``findings`` are sorted worst first; ``str(diagnosis)`` is a short report.

        >>> d = mpviz.diagnose("runs/exp1")        # doctest: +SKIP
        >>> print(d)                                # doctest: +SKIP
        >>> d.findings[0].kind, d.findings[0].layers, d.findings[0].steps   # doctest: +SKIP
        ('forward_overflow', ['fc3'], (1, 79))
    """
    own = not isinstance(run, Run)
    run = load_run(run) if own else run
    try:
        steps, ov, dtypes, meta = run.steps, run.overflows, run.dtypes, run.meta
        timeline = scale_timeline(steps, ov)
        findings: list[Finding] = []
        if len(steps):
            # the weights of the layers that overflowed in the forward only (a long run has
            # millions of rows)
            named = sorted(set(ov.loc[(ov["phase"] == "forward") & ov["first"], "layer"].dropna()))
            weights = run.max_abs_of(named, "weight")
            fwd = _forward_overflow(steps, ov, dtypes, weights)
            fwd_err = [f for f in fwd if f.severity == "error"]
            findings += fwd
            findings += _gradient_overflow(steps, timeline, meta.get("scaler"))
            findings += _scale_collapse(steps, timeline, fwd_err)
            findings += _nonfinite_loss(steps, ov, fwd_err)
            findings += _gradient_underflow(run, steps, dtypes)
        findings += _lost_updates(run)
        findings += _precision_loss(run)
        findings.sort(key=Finding.rank)
        advice = scale_advice(steps, timeline, meta.get("scaler"))
        scaling = bool((meta.get("scaler") or {}).get("enabled"))
        notes = _headroom_notes(run, scaling) if len(steps) else []
        return Diagnosis(findings, timeline, advice, str(run.run_dir), len(steps), notes)
    finally:
        if own:
            run.close()
