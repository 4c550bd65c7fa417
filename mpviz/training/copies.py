"""Plain copies of a model and its optimizer, without what a recorder or a precision policy
attached: the trainer's fp32 evaluation copy and the lab's race lanes (`Trainer.fork`)."""
from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch import nn

__all__ = ["copy_model", "copy_optimizer"]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")
_DROPPED = object()   # stands for a forward wrapper in deepcopy's memo: deleted from the copy


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` without any module hooks or ``forward`` wrappers that belong to
    another object (a recorder's hooks and a precision policy's hooks and wrapped forwards are
    attached while the lab trains; a copy must carry none of them, nor the objects they belong
    to). A ``forward`` bound to the module itself (a user's own) is kept."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for name in _HOOK_DICTS:
            d = getattr(m, name, None)
            if isinstance(d, dict):
                memo[id(d)] = type(d)()
        forward = m.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__self__ is not m:
            memo[id(forward)] = _DROPPED
    out = copy.deepcopy(model, memo)
    for m in out.modules():
        if m.__dict__.get("forward") is _DROPPED:
            del m.__dict__["forward"]   # the class's own forward again
    return out


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
