"""`model_layers`: a model's layers as a run records them, for the lab before the run exists."""
from __future__ import annotations

from torch import nn

from mpviz import compat

__all__ = ["model_layers"]


def model_layers(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """(name, type, own parameters, depth) of each module, as in a run's ``layers`` table.

        >>> model_layers(nn.Sequential(nn.Linear(2, 3)))
        [('', 'Sequential', 0, 0), ('0', 'Linear', 9, 1)]
    """
    return [(name, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)),
             0 if name == "" else name.count(".") + 1) for name, m in compat.named_modules(model)]
