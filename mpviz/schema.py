"""The run store's tables, declared once: one dataclass per table, whose fields are its columns.

``COLUMNS`` and the SQL that creates a store are made from these classes, and rows reach the
store by field name. No torch import here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, Callable, ClassVar

SCHEMA_VERSION = 1


@dataclass(slots=True)
class MetaRow:
    TABLE: ClassVar[str] = "meta"
    KEY: ClassVar[str] = "key"
    key: str
    value: str  # JSON


@dataclass(slots=True)
class LayerRow:
    TABLE: ClassVar[str] = "layers"
    KEY: ClassVar[str] = "idx"
    idx: int
    layer: str  # the model's own name ("" for the model itself)
    type: str
    n_params: int
    param_dtype: str | None
    depth: int
    is_leaf: int


@dataclass(slots=True)
class StepRow:
    TABLE: ClassVar[str] = "steps"
    KEY: ClassVar[str] = "step"
    step: int
    loss: float | None
    loss_scale: float | None
    loss_scale_after: float | None
    skipped: int
    nonfinite_grads: int
    step_time_s: float
    samples: int | None
    samples_per_s: float | None
    wall_time: float


@dataclass(slots=True)
class LayerStatRow:
    TABLE: ClassVar[str] = "layer_stats"
    INDEXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "layer_stats_step": ("step",), "layer_stats_layer": ("layer_idx", "tensor", "step")}
    step: int
    layer_idx: int
    tensor: str
    dtype: str | None
    norm: float
    max_abs: float
    min_abs_nonzero: float
    # counts of elements (a Run turns them into fractions of numel)
    zeros: int
    nonfinite: int
    underflow_fp16: int
    overflow_fp16: int
    underflow_bf16: int
    overflow_bf16: int
    numel: int


@dataclass(slots=True)
class DtypeRow:
    TABLE: ClassVar[str] = "dtypes"
    step: int
    layer_idx: int
    tensor: str
    dtype: str


@dataclass(slots=True)
class OverflowRow:
    TABLE: ClassVar[str] = "overflows"
    step: int
    layer_idx: int
    tensor: str
    phase: str
    first: int
    nonfinite: int
    skipped: int
    origin: int  # this rank's own values were non-finite (before an all-reduce)


@dataclass(slots=True)
class HistogramRow:
    TABLE: ClassVar[str] = "histograms"
    INDEXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "histograms_layer": ("layer_idx", "tensor", "step")}
    step: int
    layer_idx: int
    tensor: str
    lo: int  # the first bin of counts
    counts: bytes  # little-endian int64, trimmed to the nonzero bins


@dataclass(slots=True)
class PolicyChangeRow:
    TABLE: ClassVar[str] = "policy_changes"
    step: int
    layer_idx: int
    precision: str | None
    rule: str | None


@dataclass(slots=True)
class DiagnosticRow:
    TABLE: ClassVar[str] = "diagnostics"
    step: int
    layer_idx: int
    kind: str
    metric: str
    value: float | None


TABLES: tuple[type, ...] = (MetaRow, LayerRow, StepRow, LayerStatRow, DtypeRow, OverflowRow,
                            HistogramRow, PolicyChangeRow, DiagnosticRow)
COLUMNS: dict[str, tuple[str, ...]] = {t.TABLE: tuple(f.name for f in fields(t)) for t in TABLES}
# the tables whose rows belong to a step (a resume drops those of later steps)
STEP_TABLES = tuple(t.TABLE for t in TABLES if COLUMNS[t.TABLE][0] == "step")

_SQL_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT", "bytes": "BLOB"}


def _create_sql(t: type) -> str:
    key = getattr(t, "KEY", None)
    cols = [f"{f.name} {_SQL_TYPES[f.type.split('|')[0].strip()]}"
            + (" PRIMARY KEY" if f.name == key else "") for f in fields(t)]
    sql = [f"CREATE TABLE IF NOT EXISTS {t.TABLE} ({', '.join(cols)});"]
    sql += [f"CREATE INDEX IF NOT EXISTS {name} ON {t.TABLE} ({', '.join(on)});"
            for name, on in getattr(t, "INDEXES", {}).items()]
    return "\n".join(sql)


SCHEMA = "\n".join(_create_sql(t) for t in TABLES)

_GETTERS: dict[type, Callable[[Any], tuple]] = {t: attrgetter(*COLUMNS[t.TABLE]) for t in TABLES}


def values(row: Any) -> tuple:
    """A row's values in its table's column order (taken by field name)."""
    return _GETTERS[type(row)](row)
