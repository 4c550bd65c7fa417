"""``mpviz.search``: which precision policy, for this model? The trade-off front of loss against
predicted speed and memory on a named GPU.

Each candidate policy trains a short probe: a copy of the model from the same weights, seed and
batches, under the policy (:func:`mpviz.apply_policy`, through :class:`mpviz.Recorder`, so each
probe is a run the explorer opens). Its loss is set against fp32's; its speed and memory are
predicted from one counted step (:func:`mpviz.cost.count`), priced for each policy
(:func:`mpviz.cost.predict`). The probes measure numerics on this machine; the speed is the
GPU's, from datasheet figures.

(The file is not named ``search.py``: a submodule would hide the function of its name.)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from mpviz import compat, tree
from mpviz.cost import OPTIMIZERS, Device, Estimate, count, get_device, predict, save_counts
from mpviz.cost.estimating import layer_precisions
from mpviz.diagnosis import advise
from mpviz.precision import PrecisionPolicy, resolve_policy, supported_precisions
from mpviz.recording import Recorder
from mpviz.training.copies import copy_model
from mpviz.training.run_dirs import new_run_dir

__all__ = ["search", "Front", "CANDIDATES", "LAST_STEPS", "DIVERGED_GAP"]

CANDIDATES = ("fp32", "bf16", "fp16", "advised", "fp8 linears")
LAST_STEPS = 5       # a probe's loss: the mean of its last LAST_STEPS steps
DIVERGED_GAP = 1.0   # a probe ending at more than twice fp32's loss has diverged
FP8 = "fp8_e4m3"     # torchao's tensorwise recipe uses e4m3 for every GEMM operand
COLUMNS = ["policy", "loss", "loss_gap", "diverged", "speedup", "memory_gb", "on_front", "run_dir",
           "step_time_s", "note"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
TrainStep = Callable[[nn.Module, Any, torch.optim.Optimizer, Any], Any]


@dataclass(eq=False)
class Front:
    """What :func:`search` found.

    ``table``: one row per policy: ``policy``, ``loss`` (mean of the last steps), ``loss_gap``
    (relative to fp32's loss), ``diverged``, ``speedup`` (predicted fp32 step time / this
    policy's), ``memory_gb`` (predicted total), ``on_front`` (not beaten on all of speedup,
    loss gap and memory by another policy that did not diverge), ``run_dir`` (the probe's run),
    ``step_time_s`` (predicted), ``note``.
    ``policies``: ``{name: PrecisionPolicy}`` (None for fp32; the advice carries its
    ``reasons``). ``losses``: each probe's loss per step. ``estimates``: each policy's
    :class:`mpviz.Estimate`. ``notes``: candidates left out, and why.
    """

    table: pd.DataFrame
    policies: dict[str, PrecisionPolicy | None]
    losses: dict[str, list[float]]
    estimates: dict[str, Estimate]
    notes: list[str]
    device: Device

    def __repr__(self) -> str:
        rows = [f"  {r.policy:<12} loss "
                + (f"{r.loss:.4g} ({r.loss_gap:+.1%})" if math.isfinite(r.loss) else "not finite")
                + f"{' DIVERGED' if r.diverged else ''}, {r.speedup:.2f}x, {r.memory_gb:.3g} GB"
                + ("  <- front" if r.on_front else "") for r in self.table.itertuples()]
        return "\n".join([f"<Front on {self.device.title} (predicted; loss measured here):", *rows,
                          *(f"  note: {n}" for n in self.notes)]) + ">"


def search(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn | None = None,
           train_step: TrainStep | None = None,
           policies: Iterable[str] | Mapping[str, Any] | None = None, steps: int = 30,
           device: str | Device = "h100", optimizer: str = "adamw", lr: float = 1e-3,
           seed: int = 0, run_root: str | Path | None = None,
           forward: Callable[[nn.Module, Any], Any] | None = None,
           priced_batch: Any = None) -> Front:
    """Train a short probe per precision policy and set each one's loss against its predicted
    speed and memory on ``device``; mark the Pareto front.

    ``batches``: a list of batches, taken in order (again from the first when ``steps`` is
    longer). ``loss_fn(model, batch) -> loss``: the probe does GradScaler (for policies with
    fp16), backward, the optimizer step and ``zero_grad``. Or ``train_step(model, batch,
    optimizer, scaler) -> loss``, which does those itself: ``scaler`` is a GradScaler, enabled
    only for policies with fp16 (``scaler.scale(loss).backward(); scaler.step(optimizer);
    scaler.update()`` works for all). Either way the policy is applied to the model, so no
    autocast is needed.

    ``policies``: None for :data:`CANDIDATES` (``"fp32"``; ``"bf16"`` and ``"fp16"`` everywhere,
    fp16 with a GradScaler; ``"advised"``: :func:`mpviz.advise` of the fp16 probe, trained as a
    probe of its own; ``"fp8 linears"``: emulated fp8 on every ``nn.Linear``, bf16 elsewhere, as
    torchao trains, left out with a note where this torch or ``device`` has no fp8), a subset of
    those names, or ``{name: policy}`` of your own (a PrecisionPolicy, its rules, a precision,
    None for fp32, or ``"advised"``). fp32 is always probed: the others are measured against it.

    ``optimizer`` (a name from :data:`mpviz.cost.OPTIMIZERS`) and ``lr`` build each probe's
    optimizer and price its step. Speed and memory are predicted for one step of
    ``priced_batch`` (default: the first batch; a batch on the meta device works, to price the
    batch you train with on the GPU while probing smaller ones here), counted with
    ``forward`` (default: ``loss_fn``, else the batch conventions of :func:`mpviz.estimate`).
    Probes are recorded under ``run_root`` (default: a new ``runs/search``), one folder each,
    with the counted step (``counts.json.gz``). The model itself is not changed.

        >>> import tempfile, torch, mpviz
        >>> from mpviz.scenarios import overflow_model
        >>> model = overflow_model(n_in=16, hidden=32, n_out=4)   # 'big' overflows fp16
        >>> x = torch.randn(8, 64, 16)
        >>> batches = [(x[i], x[i, :, :4].argmax(1)) for i in range(8)]
        >>> def loss_fn(model, batch):
        ...     return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        >>> big_batch = (torch.randn(8192, 16), torch.zeros(8192, dtype=torch.long))
        >>> front = mpviz.search(model, batches, loss_fn, steps=10, run_root=tempfile.mkdtemp(),
        ...                      policies=["fp32", "fp16", "advised"], priced_batch=big_batch)
        >>> front.table[["policy", "diverged", "on_front"]].values.tolist()
        [['fp32', False, True], ['fp16', True, False], ['advised', False, True]]
        >>> front.policies["advised"].rules
        {'*': 'fp16', 'big': 'fp32'}
    """
    dev = get_device(device)  # bad input is refused before any probe trains
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}: the probes train with one of "
                         f"{', '.join(OPTIMIZERS)} (mpviz.cost.OPTIMIZERS), priced as it runs.")
    if (loss_fn is None) == (train_step is None):
        raise ValueError("pass exactly one of loss_fn(model, batch) -> loss (the probe does "
                         "GradScaler, backward and the optimizer step) or train_step(model, "
                         "batch, optimizer, scaler) -> loss (does them itself)")
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    data = _batch_list(batches)
    model = compat.user_module(model)
    device_type = _device(model).type
    wanted, notes = _candidates(model, policies, dev, device_type)

    counted = priced_batch if priced_batch is not None else data[0]
    counts = count(model, counted, forward if forward is not None else loss_fn)
    fp32 = predict(counts, "fp32", dev, optimizer)
    root = (Path(run_root) if run_root is not None else new_run_dir("runs", "search")).resolve()

    probe = _Probe(model, data, int(steps), loss_fn, train_step, optimizer, lr, seed, root, counts,
                   dev)
    chosen: dict[str, PrecisionPolicy | None] = {}
    losses: dict[str, list[float]] = {}
    estimates: dict[str, Estimate] = {}
    rows = []
    for name, policy in wanted.items():
        policy, losses[name], note = _train(probe, name, policy, notes)
        row = {"policy": name, "loss": _final(losses[name]), "speedup": math.nan,
               "memory_gb": math.nan, "step_time_s": math.nan,
               "run_dir": str(probe.dirs.get(name, "")), "note": note}
        if policy != "advised":  # (the advice itself did not fail)
            chosen[name] = policy
            est = predict(counts, layer_precisions(model, policy), dev, optimizer)
            estimates[name] = est
            row.update(speedup=fp32.step_time_s / est.step_time_s,
                       memory_gb=est.memory["total"] / 1e9, step_time_s=est.step_time_s)
        rows.append(row)
    return Front(_judged(pd.DataFrame(rows)), chosen, losses, estimates, notes, dev)


def _train(probe: "_Probe", name: str, policy: Any, notes: list[str]
           ) -> tuple[Any, list[float], str]:
    """(the policy, its probe's losses, a note). A policy the model cannot train under is a
    finding (a row with its error); fp32 must train: the others are measured against it."""
    note = ""
    try:
        if policy == "advised":
            policy = _advice(probe, notes)
            note = ("; ".join(f"{layer}: {why}" for layer, why in policy.reasons.items())
                    or "advise keeps no layer in high precision (the same as fp16 everywhere)")
        losses = probe.run(name, policy)
    except Exception as e:  # noqa: BLE001
        if name == "fp32":
            raise
        return policy, [], f"failed: {type(e).__name__}: {e}"
    if name == "fp32" and not math.isfinite(_final(losses)):
        raise ValueError(f"The fp32 probe itself diverged (last loss {losses[-1]}; its run: "
                         f"{probe.dirs[name]}): the other policies have nothing to be measured "
                         f"against. Lower lr (now {probe.lr:g}) or check loss_fn / train_step.")
    return policy, losses, note


def _advice(probe: "_Probe", notes: list[str]) -> Any:
    """:func:`mpviz.advise` of the fp16 probe (probed for the advice alone if fp16 is no
    candidate), with its predicted speed on ``dev``."""
    fp16_dir = probe.dirs.get("fp16")
    if fp16_dir is None:
        name = "fp16 (for advice)"
        final = _final(probe.run(name, PrecisionPolicy({"*": "fp16"})))
        fp16_dir = probe.dirs[name]
        notes.append(f"advised: read from a probe of fp16 everywhere in {fp16_dir} (final loss "
                     f"{final:.4g}), not a candidate itself")
    return advise(fp16_dir, target="fp16", device=probe.dev, optimizer=probe.optimizer)


# ---------------------------------------------------------------- candidates


def _candidates(model: nn.Module, policies: Any, dev: Device, device_type: str
                ) -> tuple[dict[str, Any], list[str]]:
    """``{name: PrecisionPolicy, None (fp32) or "advised"}``, fp32 first; and notes on what was
    left out. Every policy is checked against the model and both devices before any probe runs."""
    notes: list[str] = []
    if policies is None:
        policies = CANDIDATES
    if isinstance(policies, str):
        raise TypeError(f"policies is one name ({policies!r}): pass a list, e.g. [{policies!r}], "
                        "or a dict {name: policy}")
    if isinstance(policies, Mapping):
        given = {str(k): (v if v is None or v == "advised" or isinstance(v, PrecisionPolicy)
                          else PrecisionPolicy(v)) for k, v in policies.items()}
    else:
        names = list(policies)
        for name in names:
            if name not in CANDIDATES:
                raise ValueError(f"Unknown candidate {name!r}; the built-in ones are "
                                 f"{', '.join(CANDIDATES)}; pass a dict {{name: policy}} for "
                                 "your own.")
        given = {name: _builtin(name, model, dev, device_type, notes)
                 for name in sorted(set(names), key=CANDIDATES.index)}  # fp16 before its advice
        given = {k: v for k, v in given.items() if not (isinstance(v, str) and v == "skip")}
    wanted: dict[str, Any] = {"fp32": given.pop("fp32", None)}
    wanted.update(given)
    ok = supported_precisions(device_type)
    for name, policy in wanted.items():
        if not isinstance(policy, PrecisionPolicy):
            continue
        resolve_policy(model, policy)  # a rule matching no layer: ValueError naming close ones
        for p in policy.precisions():
            if p not in ok:
                raise ValueError(f"Policy {name!r} needs {p}, which cannot run on this model's "
                                 f"device ({device_type}); it can run {', '.join(ok)}.")
        for p in set(layer_precisions(model, policy).values()):
            dev.peak(p)  # fp8 on a GPU without fp8 tensor cores: refused, naming those with
    return wanted, notes


def _builtin(name: str, model: nn.Module, dev: Device, device_type: str,
             notes: list[str]) -> Any:
    if name == "fp32":
        return None
    if name in ("bf16", "fp16"):
        return PrecisionPolicy({"*": name})
    if name == "advised":
        return "advised"
    linears = [n for n, m in compat.named_modules(model) if isinstance(m, nn.Linear)]
    why = ("the model has no nn.Linear" if not linears
           else f"this torch cannot emulate {FP8} on {device_type}"
           if FP8 not in supported_precisions(device_type)
           else f"the {dev.title} has no fp8 tensor cores" if "fp8" not in dev.peak_tflops
           else "")
    if why:
        notes.append(f"fp8 linears: left out: {why}")
        return "skip"
    return PrecisionPolicy({"*": "bf16", **{n: FP8 for n in linears}})


def _batch_list(batches: Any) -> list[Any]:
    one = isinstance(batches, (tuple, list)) and len(batches) > 0 and all(
        isinstance(b, torch.Tensor) for b in batches)
    if one or isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError(f"batches is one batch (a {type(batches).__name__} of tensors), not a list "
                        "of batches: pass [batch]")
    data = list(batches)
    if not data:
        raise ValueError("batches is empty: pass a list of batches (each probe trains on them in "
                         "order)")
    return data


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------- probes


class _Probe:
    """Trains copies of the model from the same weights, seed and batches: a recorded run each."""

    def __init__(self, model: nn.Module, data: list[Any], steps: int, loss_fn: LossFn | None,
                 train_step: TrainStep | None, optimizer: str, lr: float, seed: int, root: Path,
                 counts: Any, dev: Device) -> None:
        self.model, self.data, self.steps = model, data, steps
        self.loss_fn, self.train_step = loss_fn, train_step
        self.optimizer, self.lr, self.seed = optimizer, lr, seed
        self.root, self.counts, self.dev = root, counts, dev
        self.dirs: dict[str, Path] = {}

    def run(self, name: str, policy: PrecisionPolicy | None) -> list[float]:
        where = _device(self.model)
        # "search-": in a folder shared with other runs (the lab's), a probe is told from a run
        # trained by hand.
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "policy"
        run_dir = new_run_dir(self.root, f"search-{stem}")
        self.dirs[name] = run_dir
        save_counts(self.counts, run_dir)
        rules = policy.rules if policy is not None else {}
        meta = {"search": {"policy": name, "rules": rules, "seed": self.seed, "steps": self.steps,
                           "device": self.dev.name, "optimizer": self.optimizer, "lr": self.lr}}
        rng = compat.get_rng_state(where)  # the caller's RNG, as it was, afterwards
        try:
            torch.manual_seed(self.seed)
            net = copy_model(self.model).train()
            opt = _optimizer(self.optimizer, net.parameters(), self.lr)
            fp16 = policy is not None and "fp16" in policy.precisions()
            scaler = torch.amp.GradScaler(where.type, enabled=fp16)
            every = max(1, min(10, self.steps // 5))  # a few statistics steps for advise
            losses = []
            with Recorder(net, optimizer=opt, scaler=scaler, run_dir=run_dir, policy=policy,
                          every=every, name=f"search: {name}", meta=meta) as rec:
                for i in range(self.steps):
                    batch = self.data[i % len(self.data)]
                    if where.type != "cpu":
                        batch = tree.map_tensors(lambda t: t.to(where), batch)
                    loss = self._step(net, batch, opt, scaler)
                    if isinstance(loss, torch.Tensor):
                        loss = loss.detach()
                    rec.step(loss=loss)
                    losses.append(float(loss))
            return losses
        finally:
            compat.set_rng_state(rng, where)

    def _step(self, net: nn.Module, batch: Any, opt: torch.optim.Optimizer, scaler: Any) -> Any:
        if self.train_step is not None:
            return self.train_step(net, batch, opt, scaler)
        loss = self.loss_fn(net, batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss


def _optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer :data:`mpviz.cost.OPTIMIZERS` prices under ``name``."""
    if name.startswith("adam"):
        kind = torch.optim.AdamW if name.startswith("adamw") else torch.optim.Adam
        return kind(params, lr=lr, fused=name.endswith("_fused") or None)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd_momentum" else 0.0)


# ---------------------------------------------------------------- the front


def _final(losses: list[float]) -> float:
    """The mean of the last steps; NaN if any of them is not finite."""
    last = losses[-LAST_STEPS:]
    return sum(last) / len(last) if last and all(math.isfinite(v) for v in last) else math.nan


def _judged(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with each policy's loss gap to fp32, whether it diverged, and the front."""
    ref = float(table.loc[table["policy"] == "fp32", "loss"].iloc[0])
    table["loss_gap"] = (table["loss"] - ref) / (abs(ref) or 1.0)
    finite = pd.Series([math.isfinite(v) for v in table["loss"]])
    table["diverged"] = ~finite | (table["loss_gap"] > DIVERGED_GAP)
    for i in table.index[table["diverged"] & (table["note"] == "")]:
        table.loc[i, "note"] = ("loss not finite in the last steps" if not finite[i] else
                                f"loss {table.loc[i, 'loss_gap']:+.0%} against fp32's")
    table["on_front"] = _pareto(table)
    return table[COLUMNS]


def _pareto(table: pd.DataFrame) -> list[bool]:
    """Not dominated (speedup at least, loss gap and memory at most, one of them strictly) by a
    policy that did not diverge; a diverged one is never on the front."""
    ok = [(not d) and math.isfinite(s) for d, s in zip(table["diverged"], table["speedup"])]
    pts = list(zip(-table["speedup"], table["loss_gap"], table["memory_gb"]))
    out = []
    for i, p in enumerate(pts):
        beaten = any(ok[j] and q != p and all(a <= b for a, b in zip(q, p))
                     for j, q in enumerate(pts) if j != i)
        out.append(ok[i] and not beaten)
    return out
