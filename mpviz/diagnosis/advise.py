"""``advise(run)``: the precision policy that keeps in high precision only the layers that need it,
and the one steering request that applies it to a live job (:func:`advice_rules`)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..cost import Device, get_device, load_counts, predict
from ..cost.records import COUNTS_FILE
from ..formats import AUTOCAST_PRECISIONS, DTYPE_PRECISION
from ..run import Run, load_run
from .diagnose import SHADOW_REL_ERR, diagnose
from .findings import Diagnosis
from .headroom import bits, check_formats

ESTIMATE_METHOD = (
    "time: the kept layers' share of the parameters of the model's leaf modules (a matmul costs "
    "parameters x tokens, so this is the share of Linear/conv-like FLOPs; attention score "
    "matmuls and elementwise ops are not counted); memory: the kept leaf layers' share of the "
    "output-activation elements recorded at the last statistics step (what autograd keeps "
    "alive, approximately).")


def _covers(kept: list[str], layer: str) -> bool:
    return any(layer == k or layer.startswith(k + ".") for k in kept)


# Over 50 lines only by its docstring, whose runnable example is advise's end-to-end doctest.
def advise(run: Any, target: str = "fp16", keep: str = "fp32", margin_bits: float = 1.0,
           shadow_threshold: float = SHADOW_REL_ERR, diagnosis: Diagnosis | None = None,
           device: str | Device | None = None, optimizer: str | None = "adamw") -> Any:
    """A :class:`mpviz.PrecisionPolicy` ``{"*": target, layer: keep, ...}`` keeping in ``keep``
    precision only the layers the run shows need it: a forward overflow (any step); the first
    layer to overflow in backward on repeated GradScaler skips after warm-up; activations within
    ``margin_bits`` of ``target``'s largest value on steps without a forward overflow (a container
    only when none of its children is named); an fp32 shadow error above ``shadow_threshold``.

    ``policy.reasons`` is ``{layer: why}``, ``policy.estimate`` the share of step time and of
    activation memory that stays in ``keep`` (:data:`ESTIMATE_METHOD`). ``diagnosis``:
    :func:`mpviz.diagnose` of this run, if you have it.

    ``device`` (a name from :func:`mpviz.devices`): ``policy.estimate`` also predicts what the
    advice buys on that GPU against fp32 everywhere (:func:`mpviz.cost.predict` of the step
    counted with the run, ``counts.json.gz``, with ``optimizer``): ``step_time_s``,
    ``fp32_step_time_s``, ``speedup``, ``memory_gb``, ``fp32_memory_gb``, ``fits``.

        >>> import tempfile, torch, mpviz
        >>> from mpviz.scenarios import overflow_model
        >>> model = overflow_model(n_in=16, hidden=32, n_out=4)   # 'big' overflows fp16
        >>> x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        >>> opt, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu")
        >>> run_dir = tempfile.mkdtemp()
        >>> with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=run_dir,
        ...                     policy={"*": "fp16"}) as rec:
        ...     for _ in range(5):
        ...         loss = torch.nn.functional.cross_entropy(model(x), y)
        ...         scaler.scale(loss).backward()
        ...         scaler.step(opt); scaler.update(); opt.zero_grad()
        ...         _ = rec.step(loss=loss)
        >>> _ = mpviz.cost.save_counts(mpviz.cost.count(model, (x, y)), run_dir)
        >>> policy = mpviz.advise(run_dir, device="h100")
        >>> policy.rules
        {'*': 'fp16', 'big': 'fp32'}
        >>> policy.reasons["big"][:40]
        'output overflowed float16 in the forward'
        >>> policy.estimate["speedup"] > 0, policy.estimate["fits"]
        (True, True)
    """
    from ..precision import PrecisionPolicy   # imports torch: only once advice is asked for

    own = not isinstance(run, Run)
    run = load_run(run) if own else run
    try:
        counts = _counts_for(run, device) if device is not None else None  # refused before any work
        if diagnosis is not None and diagnosis.run_dir != str(run.run_dir):
            raise ValueError(f"diagnosis is of {diagnosis.run_dir}, not of {run.run_dir}")
        reasons = _overflow_reasons(diagnosis if diagnosis is not None else diagnose(run))
        layers = run.layers
        for found in (_shadow_reasons(run, shadow_threshold),
                      _headroom_reasons(run, layers, target, margin_bits)):
            for layer, why in found.items():
                reasons.setdefault(layer, why)
        reasons.pop("", None)
        kept = list(reasons)
        policy = PrecisionPolicy({"*": target, **{l: keep for l in kept}})
        policy.reasons = reasons  # type: ignore[attr-defined]
        policy.estimate = _estimate(run, layers, kept)  # type: ignore[attr-defined]
        if counts is not None:
            policy.estimate.update(_predicted(counts, target, keep, kept, device, optimizer))
        return policy
    finally:
        if own:
            run.close()


def _overflow_reasons(d: Diagnosis) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for f in d.findings:
        if f.kind == "forward_overflow":
            reasons[f.layers[0]] = (f"output overflowed {f.evidence.get('dtype') or 'its format'} "
                                    f"in the forward (steps {f.steps[0]}-{f.steps[1]}): no loss "
                                    "scale fixes that")
        elif f.kind == "gradient_overflow" and f.severity != "info":
            reasons.setdefault(f.layers[0], f"gradients overflowed first on {f.evidence['skips']} "
                                            "skipped steps")
    return reasons


def _shadow_reasons(run: Run, threshold: float) -> dict[str, str]:
    sh = run.shadow()
    if not len(sh):
        return {}
    err = np.fmax(sh["rel_err"].astype(float), sh["grad_rel_err"].astype(float))
    med = sh.assign(err=err).groupby("layer", sort=False)["err"].median()
    return {l: f"fp32 shadow error {e:.2%} > {threshold:.2%} (median relative error of "
               "outputs / weight gradients)" for l, e in med[med > threshold].items()}


def _headroom_reasons(run: Run, layers: pd.DataFrame, target: str,
                      margin_bits: float) -> dict[str, str]:
    """Layers whose activations, at their largest over statistics steps without a forward
    overflow, come within ``margin_bits`` of ``target``'s largest value."""
    if target == "fp32":
        return {}
    check_formats([target])
    bad_steps = run.overflows.query("phase == 'forward'")["step"]
    peaks = run.peak_max_abs("activation", skip_steps=bad_steps)
    peaks = peaks[peaks["layer"] != ""]
    over = bits(target, pd.to_numeric(peaks["max_abs"], errors="coerce").astype(float), np.nan)[0]
    low = pd.Series(over, index=peaks["layer"].to_numpy())
    low = low[low < margin_bits]
    leaf = dict(zip(layers["layer"], layers["is_leaf"]))
    flagged = list(low.index)
    reasons = {}
    for l in flagged:  # a container only when none of its children is flagged
        if not leaf.get(l, True) and any(o.startswith(l + ".") for o in flagged if o != l):
            continue
        reasons[l] = (f"activations exceed {target}'s largest value by {-low[l]:.1f} bits"
                      if low[l] < 0 else
                      f"activations come within {low[l]:.1f} bits of {target}'s largest value"
                      ) + f" (margin {margin_bits:g} bits)"
    return reasons


def _estimate(run: Run, layers: pd.DataFrame, kept: list[str]) -> dict[str, Any]:
    leaves = layers[layers["is_leaf"]]
    total = float(leaves["n_params"].sum())
    kept_params = float(leaves.loc[[_covers(kept, l) for l in leaves["layer"]], "n_params"].sum())
    acts = run.leaf_numels("activation")
    a_total = float(acts["numel"].sum())
    a_kept = float(acts.loc[[_covers(kept, l) for l in acts["layer"]], "numel"].sum()) if len(acts) else 0.0
    return {"time_share": kept_params / total if total else float("nan"),
            "memory_share": a_kept / a_total if a_total else float("nan"),
            "method": ESTIMATE_METHOD}


def _counts_for(run: Run, device: str | Device) -> Any:
    """The counted step kept with ``run``; a clear error naming the fix if it has none."""
    dev = get_device(device)  # an unknown GPU is refused with the known ones
    counts = load_counts(run.run_dir)
    if counts is None:
        where = str(run.run_dir)
        raise ValueError(
            f"Cannot predict the advice's speed on the {dev.title}: the run in {where!r} holds no "
            f"counted step ({COUNTS_FILE}). Count the model's training step once and keep it with "
            f"the run: mpviz.cost.save_counts(mpviz.cost.count(model, batch), {where!r}); runs of "
            "the lab, `python -m mpviz demo` and mpviz.search carry one. Or call advise without "
            "device=.")
    return counts


def _predicted(counts: Any, target: str, keep: str, kept: list[str], device: str | Device,
               optimizer: str | None) -> dict[str, Any]:
    """The advice against fp32 everywhere, both priced on ``device`` (``""`` is the whole model;
    a kept layer's children inherit its precision, as the policy's rules do)."""
    advice = predict(counts, {"": target, **{l: keep for l in kept}}, device, optimizer)
    fp32 = predict(counts, "fp32", device, optimizer)
    return {"device": advice.device.name, "step_time_s": advice.step_time_s,
            "fp32_step_time_s": fp32.step_time_s, "speedup": fp32.step_time_s / advice.step_time_s,
            "memory_gb": advice.memory["total"] / 1e9, "fp32_memory_gb": fp32.memory["total"] / 1e9,
            "fits": advice.fits}


# ---------------------------------------------------------------- applying advice to a live job


def is_advice(policy: Any) -> bool:
    """A PrecisionPolicy from :func:`advise` (it carries ``reasons``); no torch import."""
    if isinstance(policy, Mapping) or not hasattr(policy, "rules"):
        return False
    if not isinstance(getattr(policy, "reasons", None), Mapping):
        raise TypeError("steer takes a dict {layer name or glob: precision or None} or the policy "
                        "mpviz.advise returns; for a PrecisionPolicy of your own, pass its rules: "
                        "mpviz.steer(run_dir, policy.rules)")
    return True


def precision_in_force(run: Run) -> dict[str, str]:
    """``{layer: precision}`` each layer of the job runs in now: its policy's decision (the last
    of ``run.policy_changes``), or the outer autocast's (``fp32`` without one)."""
    outer = DTYPE_PRECISION.get(str(run.meta.get("autocast_dtype")), "fp32")
    now = dict.fromkeys(run.layers["layer"].astype(str), outer)
    last = run.policy_changes.drop_duplicates("layer", keep="last")
    for layer, p in zip(last["layer"], last["precision"]):
        now[str(layer)] = p if isinstance(p, str) else outer
    return now


def advice_target(run: Run) -> str:
    """The low precision to advise the job for: the one its model runs in (``fp16`` or
    ``bf16``), else ``fp16`` (which layers fp16 would break)."""
    root = precision_in_force(run).get("", "fp32")
    return root if root in AUTOCAST_PRECISIONS else "fp16"


def advice_rules(run: Run, policy: Any) -> dict[str, str]:
    """The one request that applies ``policy`` to the job recording ``run``: ``{layer:
    precision}`` for each layer it keeps in high precision whose precision in force differs
    (the default ``"*"`` is not sent and no rule is removed)."""
    now = precision_in_force(run)
    rules = policy.rules
    return {l: rules[l] for l in policy.reasons if l in rules and now.get(l) != rules[l]}


def nothing_to_send(policy: Any) -> str:
    """Why :func:`advice_rules` is empty, in words."""
    if not policy.reasons:
        return "it keeps no layer in high precision (nothing the run shows needs it)."
    kept = ", ".join(f"{l} ({policy.rules.get(l)})" for l in policy.reasons)
    return f"the layers it keeps in high precision already run so: {kept}."
