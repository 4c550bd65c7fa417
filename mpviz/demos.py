"""The names ``from mpviz.demos import ...`` has always given, kept for the code, notebooks and
tests that use them. The code lives in two packages:

- `mpviz.tasks`: the demo tasks (data, models, `Task`/`TASKS`, `demo_parts`);
- `mpviz.training`: `Trainer`, the step runner of the lab and the CLI (plus `copy_model`,
  `copy_optimizer`, `new_run_dir`, `model_layers`).

    >>> from mpviz.demos import Trainer
    >>> t = Trainer(task="digits", precision="fp32", record=False, seed=0)
    >>> out = t.step(); sorted(out)
    ['loss', 'step']
    >>> t.close()
"""
from __future__ import annotations

from mpviz.precision import PRECISIONS
from mpviz.tasks import TASKS, Task, demo_parts, get_task, stdlib_text
from mpviz.training import Trainer, copy_model, copy_optimizer, model_layers, new_run_dir

# Importable from here as before, outside __all__ as before:
from mpviz.tasks import (CONTEXT, MLP, TEXT_BYTES, Attention, Batch, Block,  # noqa: F401
                         CharTransformer, DigitsCNN, MLPBlock, Split)
from mpviz.training import LossFn  # noqa: F401

__all__ = ["Task", "TASKS", "PRECISIONS", "Trainer", "copy_model", "copy_optimizer", "demo_parts",
           "get_task", "model_layers", "new_run_dir", "stdlib_text"]
