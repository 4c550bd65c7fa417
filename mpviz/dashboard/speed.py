"""Predicted speed of a run's precision policy on a named GPU, next to the speed measured here:
what the lab's and the explorer's estimate panels show. No torch: the step was counted with the
run (`mpviz.cost.load_counts`) and is priced here with `mpviz.cost.predict`.

>>> speed = Predictor(load_counts("runs/exp1")).speed({"": "bf16"}, "a100")   # doctest: +SKIP
>>> speed.fp32.step_time_s / speed.policy.step_time_s                        # doctest: +SKIP
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..cost import Counts, Estimate, devices, get_device, load_counts, predict

__all__ = ["DEFAULT_GPU", "Predictor", "Speed", "Measured", "gpu_choices", "in_force", "measured",
           "load_counts"]

DEFAULT_GPU = "h100"
CACHED = 64   # estimates kept per counted step (policies x GPUs seen); the oldest go first


def gpu_choices() -> list[tuple[str, str]]:
    """``(title, name)`` of every GPU `mpviz.devices()` knows, for a menu."""
    df = devices()
    return list(zip(df["title"], df["name"]))


def in_force(effective: Mapping[str, tuple[str | None, str | None]], base: str) -> dict[str, str]:
    """``{layer: precision}`` from a policy's ``{layer: (precision or None, rule)}``: a layer no
    rule reaches runs in ``base`` (the surrounding autocast)."""
    return {name: prec or base for name, (prec, _) in effective.items()}


@dataclass(frozen=True)
class Measured:
    """The speed measured on the machine that trained: medians over the last steps."""

    step_time_s: float
    samples_per_s: float | None
    samples: int | None   # per step
    device: str           # as the run recorded it: "cpu", "cuda:0"


def measured(run: Any, last: int = 20) -> Measured | None:
    """Median step time and samples/s of the run's last ``last`` steps (None before a step)."""
    steps = run.steps_since(run.last_step - last)
    if not len(steps):
        return None
    rate = steps["samples_per_s"].dropna()
    samples = steps["samples"].dropna()
    return Measured(float(steps["step_time_s"].median()),
                    float(rate.median()) if len(rate) else None,
                    int(samples.iloc[-1]) if len(samples) else None,
                    str(run.meta.get("device", "?")))


@dataclass(frozen=True)
class Speed:
    """One GPU's estimates: of the policy in force, of fp32, and of each race lane
    (``(label, Estimate or None)``); ``problem`` says why one is missing (a precision the GPU
    cannot run)."""

    gpu: str          # the GPU's title
    policy: Estimate | None
    fp32: Estimate
    lanes: list[tuple[str, Estimate | None]] = field(default_factory=list)
    problem: str = ""

    def speedup(self, est: Estimate | None) -> float | None:
        """How many times faster than fp32 ``est`` is predicted to run."""
        if est is None or not est.step_time_s:
            return None
        return self.fp32.step_time_s / est.step_time_s

    def shares(self) -> dict[str, tuple[float, str | None]]:
        """``{row: (share of the predicted step time, bound)}`` of the policy's estimate: the
        model's layers, ``(loss)`` and ``(optimizer)``; the shares add up to 1."""
        est = self.policy
        if est is None or not est.step_time_s:
            return {}
        df = est.layers
        bounds = [b if isinstance(b, str) else None for b in df["bound"]]
        return {name: (float(t) / est.step_time_s, b)
                for name, t, b in zip(df["layer"], df["time_s"], bounds)}


class Predictor:
    """`mpviz.cost.predict` over one counted step, cached by (policy, GPU): a redraw where
    neither changed predicts nothing (a prediction takes milliseconds to tens of them)."""

    def __init__(self, counts: Counts, optimizer: str | None = "adamw") -> None:
        self.counts, self.optimizer = counts, optimizer
        self._names = {lc.name for lc in counts.layers}
        self._cache: dict[Any, Estimate | ValueError] = {}
        self._lock = threading.Lock()

    def estimate(self, precisions: str | Mapping[str, str], gpu: str) -> Estimate:
        """The estimate of ``precisions`` (a name, or ``{layer: precision}``; layers the count
        does not have are left out) on ``gpu``; ValueError for a precision the GPU lacks."""
        if not isinstance(precisions, str):
            precisions = {k: v for k, v in precisions.items() if k in self._names}
        key = (get_device(gpu).name,
               precisions if isinstance(precisions, str) else tuple(sorted(precisions.items())))
        with self._lock:
            found = self._cache.get(key)
        if found is None:
            try:
                found = predict(self.counts, precisions, key[0], self.optimizer)
            except ValueError as e:
                found = e
            with self._lock:
                if len(self._cache) >= CACHED:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = found
        if isinstance(found, ValueError):
            raise found
        return found

    def speed(self, policy: str | Mapping[str, str], gpu: str,
              lanes: Sequence[tuple[str, str | Mapping[str, str]]] = ()) -> Speed:
        """The policy in force, fp32 and each ``(label, policy)`` lane, on ``gpu``."""
        problems: list[str] = []

        def one(p: str | Mapping[str, str]) -> Estimate | None:
            try:
                return self.estimate(p, gpu)
            except ValueError as e:
                if str(e) not in problems:
                    problems.append(str(e))
                return None

        return Speed(get_device(gpu).title, one(policy), self.estimate("fp32", gpu),
                     [(label, one(p)) for label, p in lanes], " ".join(problems))
