"""`demo_parts`: a demo task as the generic parts a user's own model also gives the lab and
`mpviz.training.Trainer`, so both go through one code path."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from mpviz.tasks.data import Batch
from mpviz.tasks.registry import Task, get_task

__all__ = ["demo_parts"]


def demo_parts(task: "str | Task" = "digits", seed: int = 0, batch_size: int | None = None,
               lr: float | None = None) -> dict[str, Any]:
    """``model``, ``optimizer``, ``loss_fn``, ``data``, ``eval_fn``, ``eval_data`` and ``meta``.

        >>> parts = demo_parts("mlp", seed=0)
        >>> float(parts["loss_fn"](parts["model"], next(iter(parts["data"])))) > 0
        True
    """
    task = get_task(task)
    bs = int(batch_size if batch_size is not None else task.batch_size)
    lr = float(lr if lr is not None else task.lr)
    if bs < 1 or not lr > 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0, got {bs} and {lr}")
    model = task.model(seed)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return task.loss_fn(model(batch[0]), batch[1])

    def eval_fn(model: nn.Module, batch: Batch) -> float:
        return task.metric(model(batch[0]), batch[1])

    eval_fn.__name__ = task.metric_name
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=lr),
            "loss_fn": loss_fn, "data": _Endless(task, seed, bs), "eval_fn": eval_fn,
            "eval_data": [task.eval_batch()],
            "meta": {"task": task.name, "batch_size": bs, "lr": lr, "seed": int(seed)}}


class _Endless:
    """A demo's batch stream as an iterable (one endless, seeded iterator)."""

    def __init__(self, task: Task, seed: int, batch_size: int) -> None:
        self._it = task.batches(seed, batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self._it
