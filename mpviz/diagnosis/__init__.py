"""Diagnosis: name what went wrong in a recorded run, where, and what to change (no torch).

- :func:`diagnose` -> :class:`Diagnosis` (findings worst first, the explained loss-scale
  timeline, suggested GradScaler settings);
- :func:`headroom` -> bits to overflow / underflow per layer, tensor and format;
- :func:`advise` -> a :class:`mpviz.PrecisionPolicy` keeping only the layers that need it in
  high precision, with ``reasons`` and an ``estimate`` of what stays in high precision.
"""
from .advise import advise
from .diagnose import diagnose
from .findings import KINDS, SEVERITIES, Diagnosis, Finding
from .headroom import headroom
from .timeline import scale_timeline

__all__ = ["Diagnosis", "Finding", "KINDS", "SEVERITIES", "advise", "diagnose",
           "headroom", "scale_timeline"]
