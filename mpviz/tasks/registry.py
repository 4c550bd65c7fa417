"""`Task` and `TASKS`: each demo task's data, model, loss, default hyper-parameters and metric."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from mpviz.formats import did_you_mean
from mpviz.metrics import accuracy, cross_entropy
from mpviz.tasks.data import (Batch, Split, breast_cancer_data, digits_data, shuffled_batches,
                              text_batches, text_data)
from mpviz.tasks.models import MLP, CharTransformer, DigitsCNN

__all__ = ["Task", "TASKS", "get_task"]


@dataclass(frozen=True)
class Task:
    """One demo: data, a model factory, a loss, default hyper-parameters and a metric.

        >>> task = TASKS["digits"]
        >>> model = task.model(seed=0)
        >>> x, y = next(task.batches(seed=0))
        >>> task.loss_fn(model(x), y).item() > 0
        True
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    data: Callable[[], Split]
    batch_size: int
    lr: float
    metric_name: str  # "accuracy" (higher is better) or "bits_per_char" (lower is better)
    sequence: bool = False
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default=cross_entropy)

    def model(self, seed: int = 0) -> nn.Module:
        """A freshly initialised fp32 model; the same seed gives the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def batches(self, seed: int = 0, batch_size: int | None = None) -> Iterator[Batch]:
        """An endless, deterministic stream of ``(x, y)`` training batches for ``seed``."""
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        split = self.data()
        if self.sequence:
            return text_batches(split, bs, seed)
        return shuffled_batches(split.x_train, split.y_train, bs, seed)

    def eval_batch(self) -> Batch:
        """The fixed held-out batch the metric is computed on."""
        split = self.data()
        return split.x_eval, split.y_eval

    def metric(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy for classifiers, ``bits_per_char`` (loss / ln 2) for the text model."""
        if self.metric_name == "bits_per_char":
            return float(self.loss_fn(logits, y)) / math.log(2)
        return accuracy(logits, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out ``loss`` and the task's `metric` for ``model`` (run as is, in eval mode)."""
        x, y = self.eval_batch()
        was_training = model.training
        model.eval()
        try:
            logits = model(x)
        finally:
            model.train(was_training)
        return {"loss": float(self.loss_fn(logits, y)), self.metric_name: self.metric(logits, y)}


TASKS: dict[str, Task] = {
    "digits": Task("digits", "small CNN on scikit-learn's 8x8 handwritten digits (10 classes)",
                   DigitsCNN, digits_data, batch_size=64, lr=3e-3, metric_name="accuracy"),
    "text": Task("text", "2-block char transformer on Python stdlib source (next byte)",
                 CharTransformer, text_data, batch_size=16, lr=1e-2, metric_name="bits_per_char",
                 sequence=True),
    "mlp": Task("mlp", "MLP on scikit-learn's breast-cancer table (30 standardised features, 2 classes)",
                MLP, breast_cancer_data, batch_size=64, lr=1e-3, metric_name="accuracy"),
}


def get_task(name: "str | Task") -> Task:
    """``TASKS[name]``, or a ValueError naming the valid tasks and close matches."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        close = did_you_mean(str(name), TASKS, n=2)
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}"
                         + (f"; {close}." if close else "."))
    return TASKS[name]
