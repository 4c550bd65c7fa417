"""The one definition of each metric the tasks, the scenarios and `mpviz.evaluate` report."""
from __future__ import annotations

import torch

__all__ = ["accuracy", "cross_entropy"]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The share of ``logits.argmax(-1)`` (``(..., classes)``) equal to the labels ``y``.

        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
    """
    return float((logits.argmax(-1) == y).float().mean())


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 of ``(..., classes)`` logits against integer labels ``y``:
    ``(B, C)`` classifiers and ``(B, T, V)`` sequence models alike."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
