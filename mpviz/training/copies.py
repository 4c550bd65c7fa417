"""Plain copies of a model and its optimizer, without what a recorder or a precision policy
attached: the trainer's fp32 evaluation copy and the lab's race lanes (`Trainer.fork`)."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mpviz.compat import bare_copy

__all__ = ["copy_model", "copy_optimizer"]

# Without hooks or another object's forward wrappers; the recorder's fp32 shadow copies with it too.
copy_model = bare_copy


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, copy_of: nn.Module) -> torch.optim.Optimizer:
    """A deep copy of ``optimizer`` that updates ``copy_of``'s parameters: same class, param
    groups and hyper-parameters, and a copy of its state (Adam's moments...); no step hooks."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    params = dict(copy_of.named_parameters(remove_duplicate=False))
    missing = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in names]
    if missing:
        raise ValueError(f"the optimizer updates {len(missing)} tensor(s) that are not parameters "
                         "of the model, so a copy of the model cannot take them: build the "
                         "optimizer over model.parameters()")
    # deepcopy maps each parameter to the copy's (state is keyed by parameter), copies the
    # state tensors, and leaves out the step hooks a recorder put on the optimizer.
    memo: dict[int, Any] = {pid: params[n] for pid, n in names.items()}
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        d = getattr(optimizer, name, None)
        if isinstance(d, dict):
            memo[id(d)] = type(d)()
    return copy.deepcopy(optimizer, memo)
