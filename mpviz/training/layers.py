"""`model_layers`: a model's layers as a run will record them, for the lab's layer table before
the run exists."""
from __future__ import annotations

from torch import nn

from mpviz import compat

__all__ = ["model_layers"]


def model_layers(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """(name, type, own parameters, depth) of each module, as a run records them in its
    ``layers`` table: what the lab's layer table lists before a run exists.

        >>> model_layers(nn.Sequential(nn.Linear(2, 3)))
        [('', 'Sequential', 0, 0), ('0', 'Linear', 9, 1)]
    """
    return [(name, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)),
             0 if name == "" else name.count(".") + 1) for name, m in compat.named_modules(model)]
