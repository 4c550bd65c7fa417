"""What hooks a model and its optimizer carry: to check that mpviz leaves none behind (after
close, after a refused or failed attach, on the copies the lab makes)."""

from __future__ import annotations

import torch


def forward_hooks(model: torch.nn.Module) -> int:
    """How many forward and pre-forward hooks the model's modules carry."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def hooks_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(the model's forward and pre-forward hooks, the optimizer's step pre- and post-hooks)."""
    return (forward_hooks(model),
            len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks))


def hook_snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list]:
    """Every hook the recorder could leave behind, by handle id: each module's forward,
    pre-forward, backward and pre-backward hooks, each parameter's tensor hooks and
    post-accumulate-grad hooks, the optimizer's step hooks, and torch's global module and
    optimizer hooks. Equal snapshots before attach and after close: nothing of ours is left."""
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optim_mod

    def ids(hooks) -> list:
        return sorted(hooks) if hooks else []

    snap = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            snap[f"module {name or '(model)'} {attr}"] = ids(getattr(m, attr))
    for name, p in model.named_parameters(remove_duplicate=False):
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            snap[f"parameter {name} {attr}"] = ids(getattr(p, attr, None))
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        snap[f"optimizer {attr}"] = ids(getattr(optimizer, attr))
    for attr in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks"):
        snap[f"torch.nn {attr}"] = ids(getattr(module_mod, attr))
    for attr in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        snap[f"torch.optim {attr}"] = ids(getattr(optim_mod, attr))
    return snap
