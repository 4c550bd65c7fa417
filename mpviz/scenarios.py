"""Four small training runs, each failing in one classic way, that the lab loads with one click
and `mpviz.diagnose` names: ``fp16-no-scaling`` (gradient_underflow), ``fp16-overflow``
(forward_overflow: the loss scale cannot help), ``lr-too-high`` (nonfinite_loss) and
``bf16-weights`` (lost_updates). ``fixed()`` is each one's healthy counterpart. No torch import
here (the dashboards list the scenarios).

    >>> from mpviz.scenarios import get_scenario
    >>> sc = get_scenario("fp16-no-scaling")
    >>> with sc.trainer(run_dir="runs/underflow") as t:     # doctest: +SKIP
    ...     for _ in range(sc.max_steps): t.step()
    >>> mpviz.diagnose("runs/underflow").findings[0].kind   # doctest: +SKIP
    'gradient_underflow'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .formats import did_you_mean

__all__ = ["Scenario", "SCENARIOS", "get_scenario", "overflow_model"]

UNDERFLOW_LOSS_WEIGHT = 1e-3   # fp16-no-scaling: the text model's loss, weighted
OVERFLOW_GAIN = 1e6            # fp16-overflow: `big`'s weights, times this


@dataclass(frozen=True)
class Scenario:
    """One teaching run: what it shows, the finding it should produce, and how to build it."""

    name: str
    title: str
    explanation: str          # one paragraph: what the learner will see, and why
    expect: str               # the finding kind `mpviz.diagnose` names
    layers: tuple[str, ...]   # the layers that finding names
    fix: str                  # what to change (what `fixed()` changes), in words
    build: Callable[["Scenario", int, float], dict[str, Any]] = field(repr=False)
    lr: float = 1e-3
    precision: str = "fp32"   # the autocast dtype ("fp32": none)
    grad_scaler: bool = False
    init_scale: float = 2.0**16
    weights: str = "fp32"     # the dtype the model's weights are held in ("bf16": model.to(bfloat16))
    policy: Mapping[str, str] | None = None   # per-layer precision rules
    every: int = 5            # statistics every N steps
    max_steps: int = 40       # enough for the diagnosis to name it
    changes: Mapping[str, Any] = field(default_factory=dict, repr=False)  # what fixed() changes

    def fixed(self) -> "Scenario":
        """The healthy counterpart: the same run with the fix applied (``changes``)."""
        if self.name.endswith("-fixed"):
            return self
        return dataclasses.replace(self, name=f"{self.name}-fixed", title=f"{self.title} (fixed)",
                                   changes={}, **self.changes)

    def parts(self, seed: int = 0, lr: float | None = None) -> dict[str, Any]:
        """Fresh model, optimizer, loss_fn, data, eval_fn, eval_data and meta."""
        parts = self.build(self, seed, float(lr or self.lr))
        parts["meta"] = {**parts.get("meta", {}), "scenario": self.name, "lr": float(lr or self.lr),
                         "weights": self.weights}
        return parts

    def knobs(self) -> dict[str, Any]:
        """The `Trainer` / lab settings: precision, grad_scaler, init_scale, every, policy."""
        return {"precision": self.precision, "grad_scaler": self.grad_scaler,
                "init_scale": self.init_scale, "every": self.every,
                "policy": dict(self.policy) if self.policy else None}

    def trainer(self, seed: int = 0, lr: float | None = None, **kwargs: Any) -> Any:
        """A recording `mpviz.training.Trainer` for this scenario; ``kwargs`` go to it."""
        from .training import Trainer

        parts = self.parts(seed, lr)
        meta = {**parts.pop("meta"), **kwargs.pop("meta", {})}
        return Trainer(seed=seed, meta=meta, **{**self.knobs(), **kwargs}, **parts)


# ----------------------------------------------------------------------------- models


def overflow_model(n_in: int = 30, hidden: int = 32, n_out: int = 2, seed: int = 0,
                   gain: float = OVERFLOW_GAIN) -> Any:
    """fc1 -> act1 -> big -> norm -> act2 -> head, ``big``'s weights ``gain`` times too large:
    its activations pass fp16's largest value; the LayerNorm after it brings them back."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential()
        for name, mod in [("fc1", nn.Linear(n_in, hidden)), ("act1", nn.ReLU()),
                          ("big", nn.Linear(hidden, hidden)), ("norm", nn.LayerNorm(hidden)),
                          ("act2", nn.ReLU()), ("head", nn.Linear(hidden, n_out))]:
            m.add_module(name, mod)
    with torch.no_grad():
        m.big.weight.mul_(gain)
    return m


# ----------------------------------------------------------------------------- builders


def _demo(task: str, seed: int, lr: float) -> dict[str, Any]:
    from .tasks import demo_parts

    return demo_parts(task, seed, lr=lr)


def _underflow(sc: Scenario, seed: int, lr: float) -> dict[str, Any]:
    """The text demo (a 2-block transformer), its loss weighted by UNDERFLOW_LOSS_WEIGHT."""
    parts = _demo("text", seed, lr)
    plain = parts["loss_fn"]

    def loss_fn(model: Any, batch: Any) -> Any:
        return plain(model, batch) * UNDERFLOW_LOSS_WEIGHT

    parts["loss_fn"] = loss_fn
    return parts


def _overflow(sc: Scenario, seed: int, lr: float) -> dict[str, Any]:
    """The MLP demo's data and loss, with `overflow_model` instead of its MLP."""
    import torch

    parts = _demo("mlp", seed, lr)
    model = overflow_model(seed=seed)
    parts.update(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr))
    return parts


def _lr_too_high(sc: Scenario, seed: int, lr: float) -> dict[str, Any]:
    """The MLP demo, trained by SGD with momentum at ``lr``."""
    import torch

    parts = _demo("mlp", seed, lr)
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=lr, momentum=0.9)
    return parts


def _low_precision_weights(sc: Scenario, seed: int, lr: float) -> dict[str, Any]:
    """The MLP demo with its weights held in ``sc.weights``; inputs cast to the weights' dtype."""
    import torch

    from .metrics import accuracy, cross_entropy
    from .precision.numerics import torch_dtype

    parts = _demo("mlp", seed, lr)
    model = parts["model"]
    if sc.weights != "fp32":
        model.to(torch_dtype(sc.weights))

    def cast(model: Any, x: Any) -> Any:
        return x.to(next(model.parameters()).dtype)

    def loss_fn(model: Any, batch: Any) -> Any:
        return cross_entropy(model(cast(model, batch[0])), batch[1])

    def eval_fn(model: Any, batch: Any) -> float:
        return accuracy(model(cast(model, batch[0])), batch[1])

    eval_fn.__name__ = "accuracy"
    parts.update(optimizer=torch.optim.Adam(model.parameters(), lr=lr), loss_fn=loss_fn,
                 eval_fn=eval_fn)
    return parts


# ----------------------------------------------------------------------------- the four

SCENARIOS: dict[str, Scenario] = {sc.name: sc for sc in [
    Scenario(
        "fp16-no-scaling", "fp16 without loss scaling: gradients underflow",
        "The stdlib-text transformer trains under fp16 autocast with GradScaler off. Its loss is "
        f"weighted by {UNDERFLOW_LOSS_WEIGHT:g} (as when it is one small term of a larger "
        "objective, or a mean over many more tokens), so its gradients are that much smaller: "
        "most fall below fp16's smallest normal number (2^-14, about 6e-5), where they keep few "
        "significant bits, and the smallest below 2^-24, where the backward pass flushes them to "
        "zero. The plotted loss is the weighted one. Watch the gradient heatmap and the Diagnosis: "
        "gradient_underflow names the linear layers whose gradients sit at fp16's floor, and the "
        "loss falls more slowly than fp32's (add fp32 'alongside' to race it).",
        "gradient_underflow",
        ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
         "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj", "head"),
        "tick GradScaler: the loss is multiplied by the scale (2^16) before backward, so the "
        "gradients land inside fp16's range, and divided back before the optimizer step.",
        _underflow, lr=1e-2, precision="fp16", grad_scaler=False, max_steps=40,
        changes={"grad_scaler": True}),
    Scenario(
        "fp16-overflow", "an activation past fp16's range: the loss scale cannot help",
        "An MLP on the breast-cancer table whose layer big makes activations of about 1e5, past "
        "fp16's largest value, 65504 (its weights are 1e6 times too large, as after a unit "
        "mismatch; T5's feed-forward layers overflow fp16 like this in real models). The LayerNorm "
        "after it brings them back to about 1, so fp32 and bf16 train fine. In fp16, big's output "
        "is inf, the loss NaN, and GradScaler skips every step, halving its scale each time to no "
        "effect: the scale multiplies the loss and the gradients, never the activations. The "
        "Diagnosis names a forward_overflow in big, and the loss scale's collapse it caused.",
        "forward_overflow", ("big",),
        "keep big in fp32 (Apply advice in the Diagnosis panel, or big → fp32 in the layer "
        "table): PrecisionPolicy({'*': 'fp16', 'big': 'fp32'}).",
        _overflow, lr=1e-2, precision="fp16", grad_scaler=True, max_steps=30,
        changes={"policy": {"big": "fp32"}}),
    Scenario(
        "lr-too-high", "a learning rate too high: the loss goes NaN",
        "The breast-cancer MLP in plain fp32, trained by SGD with momentum 0.9 at a learning rate "
        "of 1, about ten times too high. The loss falls, then jumps (to about 1, then 20) and "
        "turns NaN after about 20 steps: each step overshoots, the weights grow until fc1's "
        "output overflows even fp32, and from then on every number is NaN. No precision setting "
        "fixes this; the Diagnosis reports nonfinite_loss, with the forward overflow in fc1 that "
        "the runaway weights caused.",
        "nonfinite_loss", ("fc1",),
        "lower the learning rate (lr 0.1): the same model and data train to a loss near 0.03.",
        _lr_too_high, lr=1.0, precision="fp32", max_steps=40, changes={"lr": 0.1}),
    Scenario(
        "bf16-weights", "bf16 weights lose small updates",
        "The breast-cancer MLP with its weights held in bf16 (model.to(torch.bfloat16), no fp32 "
        "master copy), trained by Adam at lr 1e-4. bf16 keeps 8 significant bits, so a weight "
        "near 0.1 can only change in steps of about 5e-4; Adam's updates of about 1e-4 are less "
        "than half a step and round back to the old value. The loss hardly moves, and the "
        "Diagnosis reports lost_updates: for each layer, the share of weights whose update was "
        "rounded away (about 80% here).",
        "lost_updates", ("fc1", "fc2", "fc3", "head"),
        "keep fp32 weights and train them under bf16 autocast (the 'fixed' run): the updates land "
        "in fp32, and the loss falls as fp32's does.",
        _low_precision_weights, lr=1e-4, precision="fp32", weights="bf16", max_steps=150,
        every=5, changes={"weights": "fp32", "precision": "bf16"}),
]}


def get_scenario(name: "str | Scenario") -> Scenario:
    """``SCENARIOS[name]`` (``NAME-fixed``: its healthy counterpart), or a ValueError naming
    the scenarios."""
    if isinstance(name, Scenario):
        return name
    base = name[:-len("-fixed")] if name.endswith("-fixed") else name
    if base not in SCENARIOS:
        close = did_you_mean(str(name), SCENARIOS, n=2)
        raise ValueError(f"unknown scenario {name!r}; scenarios: {', '.join(SCENARIOS)}"
                         + (f"; {close}." if close else "."))
    sc = SCENARIOS[base]
    return sc.fixed() if base != name else sc
