"""The old import path ``from mpviz.demos import ...``: `mpviz.tasks` and `mpviz.training`."""
from __future__ import annotations

from mpviz.precision import PRECISIONS
from mpviz.tasks import TASKS, Task, demo_parts, get_task, stdlib_text
from mpviz.training import Trainer, copy_model, copy_optimizer, model_layers, new_run_dir

# Importable from here, outside __all__:
from mpviz.tasks import (CONTEXT, MLP, TEXT_BYTES, Attention, Batch, Block,  # noqa: F401
                         CharTransformer, DigitsCNN, MLPBlock, Split)
from mpviz.training import LossFn  # noqa: F401

__all__ = ["Task", "TASKS", "PRECISIONS", "Trainer", "copy_model", "copy_optimizer", "demo_parts",
           "get_task", "model_layers", "new_run_dir", "stdlib_text"]
