"""What a precision policy buys: predicted step time and memory on a named GPU.

- ``gpus.py``: the GPUs (datasheet peaks, bandwidth, memory; no torch) and :func:`devices`.
- ``records.py``: the plain records of a counted step (no torch).
- ``counting.py``: :func:`count`, FLOPs and elements per op and module on one real forward and
  backward.
- ``pricing.py``: :func:`predict`, the records priced for a precision per layer on a GPU (no
  torch), and :class:`Estimate`.
- ``estimating.py``: :func:`estimate`, the two together on a model and a batch.

(No file is named after a function it holds: a submodule would hide the function of its name.)

``predict`` and the records need no torch, so a stored count can be priced again where torch is
not imported (the dashboards); ``estimate`` and ``count`` are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from mpviz.cost.gpus import COST_PRECISIONS, DEVICES, Device, devices, get_device
from mpviz.cost.pricing import OPTIMIZERS, Estimate, cost_precision, predict
from mpviz.cost.records import Counts, LayerCount, OpCount, load_counts, save_counts

__all__ = ["estimate", "Estimate", "count", "predict", "devices", "get_device", "Device", "DEVICES",
           "COST_PRECISIONS", "OPTIMIZERS", "Counts", "LayerCount", "OpCount", "cost_precision",
           "layer_precisions", "save_counts", "load_counts"]

_TORCH = {"estimate": "mpviz.cost.estimating", "layer_precisions": "mpviz.cost.estimating",
          "count": "mpviz.cost.counting"}


def __getattr__(name: str) -> Any:
    if name in _TORCH:
        return getattr(importlib.import_module(_TORCH[name]), name)
    raise AttributeError(f"module 'mpviz.cost' has no attribute {name!r}")
