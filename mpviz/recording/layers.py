"""The model as the recorder sees it: its layers by the user's names, and their parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import compat
from ..formats import dtype_name
from ..schema import LayerRow


@dataclass(frozen=True)
class Layers:
    names: list[str]  # named_modules() order; the model itself is ""
    modules: list[nn.Module]
    parent: list[int]  # -1 for the model
    index: dict[str, int]
    params: list[nn.Parameter]
    param_layer: list[int]  # each parameter belongs to the first layer that owns it
    device: torch.device

    @classmethod
    def of(cls, model: nn.Module) -> "Layers":
        # by the user's own names, also behind torch.compile's wrapper ("_orig_mod.")
        named = compat.named_modules(model)
        names = [n for n, _ in named]
        modules = [m for _, m in named]
        index = {n: i for i, n in enumerate(names)}
        parent = [index.get(n.rpartition(".")[0], 0) if n else -1 for n in names]
        params: list[nn.Parameter] = []
        param_layer: list[int] = []
        seen: set[int] = set()
        for i, m in enumerate(modules):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
                    param_layer.append(i)
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        return cls(names, modules, parent, index, params, param_layer, device)

    def rows(self) -> list[LayerRow]:
        rows = []
        for i, (name, m) in enumerate(zip(self.names, self.modules)):
            ps = list(m.parameters(recurse=False))
            rows.append(LayerRow(i, name, _type_name(m), sum(p.numel() for p in ps),
                                 dtype_name(ps[0].dtype) if ps else None,
                                 0 if name == "" else name.count(".") + 1,
                                 int(not any(True for _ in m.children()))))
        return rows


def _type_name(m: nn.Module) -> str:
    """The module's class name; for an FSDP2 unit the user's class (``fully_shard`` swaps
    ``Block`` for a ``FSDPBlock`` subclass)."""
    cls = type(m)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls.__name__
    if isinstance(m, FSDPModule):
        cls = next((b for b in cls.__mro__ if not issubclass(b, FSDPModule)), cls)
    return cls.__name__
