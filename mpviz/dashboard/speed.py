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

__all__ = ["DEFAULT_GPU", "Predictor", "Speed", "Scaled", "Measured", "gpu_choices", "in_force",
           "measured", "launch_share", "load_counts"]

DEFAULT_GPU = "h100"
CACHED = 64   # estimates kept per counted step (policies x GPUs seen); the oldest go first
LAUNCH_BOUND = 0.5   # above this share of kernel-floor time, precision buys little
MAX_FACTOR = 4096    # the largest batch multiple tried for a GPU-sized batch


def launch_share(est: Estimate) -> float:
    """The share of ``est``'s step spent in rows bound by the floor per kernel (launch-bound)."""
    df = est.layers
    return float(df.loc[df["bound"] == "overhead", "time_s"].sum()) / est.step_time_s if est.step_time_s else 0.0


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
class Scaled:
    """The step at a batch ``factor`` times larger, the smallest power of two at which less than
    half of ``policy``'s predicted step is the floor per kernel: ``label``'s estimate and fp32's."""

    factor: int
    label: str
    policy: Estimate
    fp32: Estimate

    @property
    def speedup(self) -> float:
        return self.fp32.step_time_s / self.policy.step_time_s


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
    scaled: Scaled | None = None   # where the policy's step is launch-bound

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
        self._scaled: dict[int, Predictor] = {}
        self._factors: dict[Any, Scaled | None] = {}

    def estimate(self, precisions: str | Mapping[str, str], gpu: str) -> Estimate:
        """The estimate of ``precisions`` (a name, or ``{layer: precision}``; layers the count
        does not have are left out) on ``gpu``; ValueError for a precision the GPU lacks."""
        key = self._key(precisions, gpu)
        precisions = precisions if isinstance(precisions, str) else dict(key[1])
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

    def _key(self, precisions: str | Mapping[str, str], gpu: str) -> Any:
        if not isinstance(precisions, str):
            precisions = tuple(sorted((k, v) for k, v in precisions.items() if k in self._names))
        return get_device(gpu).name, precisions

    def scaled(self, policy: str | Mapping[str, str], gpu: str) -> Scaled | None:
        """The policy (bf16 where it is all fp32) at the smallest power-of-two multiple of the
        batch, up to :data:`MAX_FACTOR`, whose predicted step is less than half launch floor;
        None where none is (or the GPU cannot run it)."""
        key = self._key(policy, gpu)
        with self._lock:
            if key in self._factors:
                return self._factors[key]
        found = None
        try:
            est = self.estimate(policy, gpu)
            label = est.precision
            if label in ("fp32", "tf32"):
                policy, label = "bf16", "bf16"
            factor = 2
            while factor <= MAX_FACTOR:
                at = self._at(factor)
                est = at.estimate(policy, gpu)
                if launch_share(est) < LAUNCH_BOUND:
                    found = Scaled(factor, label, est, at.estimate("fp32", gpu))
                    break
                factor *= 2
        except ValueError:
            found = None
        with self._lock:
            self._factors[key] = found
        return found

    def _at(self, factor: int) -> "Predictor":
        with self._lock:
            at = self._scaled.get(factor)
        if at is None:
            at = Predictor(self.counts.scaled(factor), self.optimizer)
            with self._lock:
                at = self._scaled.setdefault(factor, at)
        return at

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

        est = one(policy)
        scaled = self.scaled(policy, gpu) if est is not None and launch_share(est) > LAUNCH_BOUND else None
        return Speed(get_device(gpu).title, est, self.estimate("fp32", gpu),
                     [(label, one(p)) for label, p in lanes], " ".join(problems), scaled)
