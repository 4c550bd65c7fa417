"""mpviz: see and steer mixed-precision PyTorch training, layer by layer.

    >>> import mpviz
    >>> rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir="runs/exp1")  # doctest: +SKIP
    >>> run = mpviz.load_run("runs/exp1")                                              # doctest: +SKIP

Names are imported lazily so that reading runs (``load_run``, the dashboards) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Recorder": "mpviz.recording",
    "Run": "mpviz.run",
    "load_run": "mpviz.run",
    "list_runs": "mpviz.run",
    "RunStoreError": "mpviz.store",
    "FloatFormat": "mpviz.formats",
    "FORMATS": "mpviz.formats",
    "PrecisionPolicy": "mpviz.precision",
    "apply_policy": "mpviz.precision",
    "explain_policy": "mpviz.precision",
    "evaluate": "mpviz.evaluation",
    "memory_report": "mpviz.evaluation",
    "steer": "mpviz.steering",
    "steer_status": "mpviz.mailbox",
    "SteerError": "mpviz.mailbox",
    "export": "mpviz.integrations.export",
    "thin": "mpviz.store",
    "diagnose": "mpviz.diagnosis",
    "advise": "mpviz.diagnosis",
    "headroom": "mpviz.diagnosis",
    "Diagnosis": "mpviz.diagnosis",
    "Finding": "mpviz.diagnosis",
    "estimate": "mpviz.cost",
    "Estimate": "mpviz.cost",
    "devices": "mpviz.cost",
    "search": "mpviz.searching",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in ("distributed", "cost"):  # mpviz.distributed.checked(...), mpviz.cost.count(...)
        return importlib.import_module(f"mpviz.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mpviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
