"""Where a training step of the lab and of ``python -m mpviz demo`` runs.

- ``trainer.py``: `Trainer`, the one step runner (a demo task from `mpviz.tasks`, or your model,
  optimizer and loss), recorded by `mpviz.Recorder` under a live precision policy;
- ``copies.py``: `copy_model`, `copy_optimizer`, plain copies for the fp32 evaluation copy and
  the lab's race lanes;
- ``run_dirs.py``: `new_run_dir`, claiming a new run directory atomically;
- ``layers.py``: `model_layers`, a model's layers as its run will record them (the lab's layer
  table before Start).

The dashboards reach this package only on their torch thread (`mpviz.dashboard.worker`).

    >>> from mpviz.training import Trainer
    >>> with Trainer(task="mlp", record=False) as t:
    ...     t.step()["step"]
    0
"""
from __future__ import annotations

from mpviz.training.copies import copy_model, copy_optimizer
from mpviz.training.layers import model_layers
from mpviz.training.run_dirs import new_run_dir
from mpviz.training.trainer import LossFn, Trainer

__all__ = ["Trainer", "LossFn", "copy_model", "copy_optimizer", "model_layers", "new_run_dir"]
