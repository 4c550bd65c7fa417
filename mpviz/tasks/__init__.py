"""The demo tasks: real, locally shipped data, a model for it, a loss and a metric.

Three tasks, all small enough that one training step stays well under 100 ms on a 2-core CPU
even under bf16/fp16 autocast (which is several times *slower* than fp32 on CPUs without
bf16 instructions), and that learn visibly within a minute:

- ``digits``: a small CNN on scikit-learn's bundled 8x8 handwritten digits (10 classes).
- ``text``: a 2-block character-level transformer predicting the next byte of Python's own
  standard-library source code (read from ``os.path.dirname(os.__file__)``).
- ``mlp``: an MLP on scikit-learn's bundled breast-cancer table (30 standardised features,
  2 classes). Chosen over flattened digits so the three demos cover three kinds of data
  (images, text, tables) and the MLP does not just repeat the CNN's dataset.

Nothing is downloaded. Where each part lives:

- ``data.py``: the datasets and their seeded batch streams;
- ``models.py``: the three models (module names are stable: users toggle precision by name);
- ``registry.py``: `Task` (data + model + loss + metric + defaults), `TASKS`, `get_task`;
- ``parts.py``: `demo_parts`, a task as the parts `mpviz.training.Trainer` and the lab take.

The scenarios (`mpviz.scenarios`) build on these tasks; `mpviz.training.Trainer` trains them.

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
