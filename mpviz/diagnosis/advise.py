"""``advise(run)``: the precision policy that keeps in high precision only the layers that need it."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .diagnose import SHADOW_REL_ERR, diagnose
from .findings import Diagnosis
from .headroom import headroom

ESTIMATE_METHOD = (
    "time: the kept layers' share of the parameters of the model's leaf modules (a matmul costs "
    "parameters x tokens, so this is the share of Linear/conv-like FLOPs; attention score "
    "matmuls and elementwise ops are not counted); memory: the kept leaf layers' share of the "
    "output-activation elements recorded at the last statistics step (what autograd keeps "
    "alive, approximately).")


def _covers(kept: list[str], layer: str) -> bool:
    return any(layer == k or layer.startswith(k + ".") for k in kept)


def advise(run: Any, target: str = "fp16", keep: str = "fp32", margin_bits: float = 1.0,
           shadow_threshold: float = SHADOW_REL_ERR, diagnosis: Diagnosis | None = None) -> Any:
    """A :class:`mpviz.PrecisionPolicy` ``{"*": target, layer: keep, ...}`` that keeps in
    ``keep`` precision only the layers the run shows need it:

    - a layer whose output went inf/nan in the forward pass (an overflow event, any step);
    - a layer first to overflow in backward on repeated GradScaler skips after warm-up (a
      ``gradient_overflow`` finding above ``info``);
    - a layer whose activations come within ``margin_bits`` of ``target``'s largest value
      (headroom, on statistics steps without a forward overflow; leaf modules first: a container
      is named only when none of its children is);
    - a layer whose fp32 shadow error (``Recorder(shadow=...)``) is above ``shadow_threshold``.

    The policy carries ``policy.reasons`` ``{layer: why}`` and ``policy.estimate``
    ``{"time_share", "memory_share", "method"}``: the share of step time and of activation
    memory that stays in ``keep`` precision, estimated as :data:`ESTIMATE_METHOD` says.
    Record the run in fp32 to ask which layers fp16 would break, or in fp16 to see which did.
    ``diagnosis``: :func:`mpviz.diagnose` of this run, if you have it (else it is diagnosed here).

        >>> policy = mpviz.advise("runs/exp1")          # doctest: +SKIP
        >>> policy.rules, policy.reasons                 # doctest: +SKIP
        ({'*': 'fp16', 'fc3': 'fp32'}, {'fc3': 'output overflowed fp16 in the forward (steps 1-79)'})
        >>> policy = mpviz.advise(run, diagnosis=mpviz.diagnose(run))   # doctest: +SKIP
    """
    from ..precision import PrecisionPolicy
    from ..run import Run, load_run

    own = not isinstance(run, Run)
    run = load_run(run) if own else run
    try:
        reasons: dict[str, str] = {}
        if diagnosis is not None and diagnosis.run_dir != str(run.run_dir):
            raise ValueError(f"diagnosis is of {diagnosis.run_dir}, not of {run.run_dir}")
        d = diagnosis if diagnosis is not None else diagnose(run)
        for f in d.findings:
            if f.kind == "forward_overflow":
                l = f.layers[0]
                reasons[l] = (f"output overflowed {f.evidence.get('dtype') or 'its format'} in the "
                              f"forward (steps {f.steps[0]}-{f.steps[1]}): no loss scale fixes that")
            elif f.kind == "gradient_overflow" and f.severity != "info":
                reasons.setdefault(f.layers[0], f"gradients overflowed first on {f.evidence['skips']} "
                                                "skipped steps")
        sh = run.shadow()
        if len(sh):
            err = np.fmax(sh["rel_err"].astype(float), sh["grad_rel_err"].astype(float))
            med = sh.assign(err=err).groupby("layer", sort=False)["err"].median()
            for l, e in med[med > shadow_threshold].items():
                reasons.setdefault(l, f"fp32 shadow error {e:.2%} > {shadow_threshold:.2%} "
                                      "(median relative error of outputs / weight gradients)")
        layers = run.layers
        leaf = dict(zip(layers["layer"], layers["is_leaf"]))
        bad_steps = set(run.overflows.query("phase == 'forward'")["step"])
        h = headroom(run, formats=[target] if not target.startswith("fp32") else [], tensors=["activation"]) \
            if target != "fp32" else pd.DataFrame()
        if len(h):
            h = h[~h["step"].isin(bad_steps) & (h["layer"] != "")]
            low = h.groupby("layer", sort=False)["bits_to_overflow"].min()
            low = low[low < margin_bits]
            flagged = list(low.index)
            for l in flagged:  # a container only when none of its children is flagged
                if not leaf.get(l, True) and any(o.startswith(l + ".") for o in flagged if o != l):
                    continue
                reasons.setdefault(l, (f"activations exceed {target}'s largest value by "
                                       f"{-low[l]:.1f} bits" if low[l] < 0 else
                                       f"activations come within {low[l]:.1f} bits of {target}'s "
                                       f"largest value") + f" (margin {margin_bits:g} bits)")
        reasons.pop("", None)
        kept = list(reasons)
        policy = PrecisionPolicy({"*": target, **{l: keep for l in kept}})
        policy.reasons = reasons  # type: ignore[attr-defined]
        policy.estimate = _estimate(run, layers, kept)  # type: ignore[attr-defined]
        return policy
    finally:
        if own:
            run.close()


def _estimate(run: Any, layers: pd.DataFrame, kept: list[str]) -> dict[str, Any]:
    leaves = layers[layers["is_leaf"]]
    total = float(leaves["n_params"].sum())
    kept_params = float(leaves.loc[[_covers(kept, l) for l in leaves["layer"]], "n_params"].sum())
    acts = run.query("SELECT l.layer, s.numel FROM layer_stats s JOIN layers l ON l.idx = s.layer_idx "
                     "WHERE s.tensor = 'activation' AND l.is_leaf = 1 AND s.step = "
                     "(SELECT MAX(step) FROM layer_stats WHERE tensor = 'activation')")
    a_total = float(acts["numel"].sum())
    a_kept = float(acts.loc[[_covers(kept, l) for l in acts["layer"]], "numel"].sum()) if len(acts) else 0.0
    return {"time_share": kept_params / total if total else float("nan"),
            "memory_share": a_kept / a_total if a_total else float("nan"),
            "method": ESTIMATE_METHOD}
