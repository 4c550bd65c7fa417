"""``Finding`` and ``Diagnosis``: what :func:`mpviz.diagnose` returns (plain data, no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

SEVERITIES = ("info", "warning", "error")


def layer_name(layer: str) -> str:
    """A layer as diagnosis messages write it: quoted (a name such as ``2`` or ``head`` reads
    as a word otherwise), the root module ``""`` as ``(model)``, as the dashboards show it."""
    return f'"{layer}"' if layer else "(model)"

# Causes before their consequences: on equal severity, a forward overflow is listed before the
# scale collapse and the NaN loss it causes.
KINDS = ("forward_overflow", "gradient_underflow", "gradient_overflow", "lost_updates",
         "precision_loss", "nonfinite_loss", "scale_collapse")


@dataclass
class Finding:
    """One thing that went wrong (or is worth knowing), where, and what to change.

    ``kind``: one of :data:`KINDS`; ``severity``: ``info`` / ``warning`` / ``error``;
    ``steps``: (first, last) step it was seen at (None if not tied to steps); ``layers``: the
    layers it names (``named_modules()`` names, ``""`` is the model itself); ``message``: what
    happened, in one or two sentences; ``suggestion``: what to change; ``evidence``: the numbers
    behind it (counts, scales, fractions), JSON-able.
    """

    kind: str
    severity: str
    steps: tuple[int, int] | None
    layers: list[str]
    message: str
    suggestion: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def rank(self) -> tuple:
        return (-SEVERITIES.index(self.severity), KINDS.index(self.kind),
                self.steps[0] if self.steps else -1)

    def __str__(self) -> str:
        where = f"steps {self.steps[0]}-{self.steps[1]}" if self.steps else ""
        if self.steps and self.steps[0] == self.steps[1]:
            where = f"step {self.steps[0]}"
        layers = ", ".join(map(layer_name, self.layers[:6]))
        if len(self.layers) > 6:
            layers += f" and {len(self.layers) - 6} more"
        head = " | ".join(x for x in (where, layers) if x)
        return (f"[{self.severity.upper()}] {self.kind}" + (f" ({head})" if head else "")
                + f"\n  {self.message}" + (f"\n  -> {self.suggestion}" if self.suggestion else ""))


@dataclass
class Diagnosis:
    """What :func:`mpviz.diagnose` found in a run.

    ``findings``: worst first (severity, then causes before consequences, then first step);
    ``timeline``: the explained loss-scale timeline (one row per backoff or growth of the scale:
    ``step, scale, scale_after, event, cause, layers``); ``scale_advice``: suggested GradScaler
    ``init_scale`` / ``growth_interval`` with the reason (empty without a GradScaler);
    ``run_dir``, ``n_steps``; ``notes``: headroom at the last statistics step, in words ("the
    scale can double 3 more times before the gradients of "fc1" overflow fp16").
    """

    findings: list[Finding]
    timeline: pd.DataFrame
    scale_advice: dict[str, Any]
    run_dir: str
    n_steps: int
    notes: list[str] = field(default_factory=list)  # headroom at the last statistics step

    @property
    def worst(self) -> str | None:
        """The highest severity found (None: nothing found)."""
        return self.findings[0].severity if self.findings else None

    @property
    def ok(self) -> bool:
        """True when no finding is above ``info``."""
        return all(f.severity == "info" for f in self.findings)

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_frame(self) -> pd.DataFrame:
        """One row per finding (for tables in the dashboards)."""
        return pd.DataFrame([{"kind": f.kind, "severity": f.severity,
                              "first_step": f.steps[0] if f.steps else None,
                              "last_step": f.steps[1] if f.steps else None,
                              "layers": list(f.layers), "message": f.message,
                              "suggestion": f.suggestion} for f in self.findings],
                            columns=["kind", "severity", "first_step", "last_step", "layers",
                                     "message", "suggestion"])

    def __str__(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        head = (f"mpviz diagnosis of {self.run_dir} ({self.n_steps} steps): "
                + (", ".join(f"{n} {s}" + ("s" if n > 1 and s != "info" else "")
                             for s, n in reversed(counts.items()) if n) or "nothing found"))
        parts = [head] + [str(f) for f in self.findings] + [f"headroom: {n}" for n in self.notes]
        if self.scale_advice.get("reason"):
            adv = ", ".join(f"{k}={v:g}" for k, v in self.scale_advice.items()
                            if k in ("init_scale", "growth_interval") and v is not None)
            parts.append(f"GradScaler: {self.scale_advice['reason']}" + (f" -> {adv}" if adv else ""))
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<Diagnosis {self.run_dir!r}: {len(self.findings)} findings, worst {self.worst}>"
