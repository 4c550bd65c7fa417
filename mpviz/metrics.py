"""The one definition of each metric that the demo tasks, the scenarios and `mpviz.evaluate`
report, so that the lab, the CLI and an evaluation agree on what "accuracy" means.

    >>> import torch
    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5
"""
from __future__ import annotations

import torch

__all__ = ["accuracy"]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The share of predictions (the largest logit along the last dimension) equal to ``y``.

    ``logits`` is ``(..., classes)`` and ``y`` the integer labels of shape ``logits.shape[:-1]``:
    ``(B, C)`` against ``(B,)`` for a classifier, ``(B, T, V)`` against ``(B, T)`` per token.
    """
    return float((logits.argmax(-1) == y).float().mean())
