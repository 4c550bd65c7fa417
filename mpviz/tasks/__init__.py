"""The demo tasks: real data shipped with the installed packages (nothing is downloaded), a
model, a loss and a metric, small enough to learn visibly on a CPU within a minute.

- ``digits``: a small CNN on scikit-learn's 8x8 handwritten digits (10 classes);
- ``text``: a 2-block byte-level transformer on Python's own standard-library source;
- ``mlp``: an MLP on scikit-learn's breast-cancer table (30 standardised features, 2 classes).

``data.py`` (datasets, seeded batches), ``models.py``, ``registry.py`` (`Task`, `TASKS`),
``parts.py`` (`demo_parts`: a task as the parts `mpviz.training.Trainer` and the lab take).

    >>> from mpviz.tasks import TASKS
    >>> TASKS["digits"].evaluate(TASKS["digits"].model(seed=0))["accuracy"] < 0.5
    True
"""
from __future__ import annotations

from mpviz.tasks.data import CONTEXT, TEXT_BYTES, Batch, Split, stdlib_text
from mpviz.tasks.models import MLP, Attention, Block, CharTransformer, DigitsCNN, MLPBlock
from mpviz.tasks.parts import demo_parts
from mpviz.tasks.registry import TASKS, Task, get_task

__all__ = ["Task", "TASKS", "get_task", "demo_parts", "stdlib_text", "Split", "Batch", "CONTEXT",
           "TEXT_BYTES", "DigitsCNN", "MLP", "CharTransformer", "Attention", "MLPBlock", "Block"]
