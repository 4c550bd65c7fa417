"""Adapters for the trainers and tools users already have. Each is optional and imported on its
own, so ``import mpviz`` never needs them:

- :mod:`mpviz.integrations.hf`: ``MpvizCallback`` for the Hugging Face ``Trainer``
  (``pip install "mpviz[hf]"``);
- :mod:`mpviz.integrations.lightning`: ``MpvizCallback`` for Lightning
  (``pip install "mpviz[lightning]"``);
- :mod:`mpviz.integrations.export`: a run as TensorBoard event files, CSV or Parquet
  (``mpviz.export(run, "tensorboard", out_dir)``; ``pip install "mpviz[export]"``).
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the {module!r} package, which is not installed: "
                          f'pip install "mpviz[{extra}]"') from e
