"""Rows of per-layer statistics, made on the writer thread from the numbers a step handed over."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..schema import HistogramRow, LayerStatRow
from ..stats import HostSample, by_layer
from ..store import Rows, pack_hists


@dataclass(slots=True)
class Joined:
    """Rows in two parts: a HostSample's (activations, finished on the writer thread), then rows
    already made (FSDP: the gradients and weights the statistics collectives returned)."""

    first: HostSample
    rest: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + self.rest.nbytes

    def rows(self) -> np.ndarray:
        return np.concatenate([self.first.rows(), self.rest])


@dataclass(slots=True)
class Measured:
    """A statistics step's numbers, and the layer each row belongs to."""

    step: int
    values: Any  # a HostSample or Joined (CPU), a device tensor, or after the host copy numpy rows
    owners: dict[str, list[int]]  # kind -> the layer of each row
    act_rows: list[int]  # activation -> its row (a tensor shared by modules is measured once)
    dtypes: dict[tuple[int, str], str] = field(default_factory=dict)  # (layer, role) -> dtype


def stat_rows(items: list[Measured]) -> list[Rows]:
    """``layer_stats`` and ``histograms`` rows of many steps (on the writer thread: the training
    thread only hands over the numbers); one merge per layer for all of them."""
    kinds = ("activation", "grad", "weight")
    role = {"activation": "output", "grad": "grad", "weight": "weight"}
    blocks, keys, steps, dts = [], [], [], []
    for n, m in enumerate(items):
        stats = m.values.rows() if isinstance(m.values, (HostSample, Joined)) else m.values
        n_act = max(m.act_rows, default=-1) + 1
        # activations of a tensor shared by several modules: the same row for each
        blocks += [stats[:n_act][m.act_rows], stats[n_act:]]
        # a (step, kind, layer)'s rows share a key: one merge for everything
        keys += [(n * 3 + k) * _KIND + layer for k, kind in enumerate(kinds)
                 for layer in m.owners[kind]]
        steps.append(m.step)
        dts.append(m.dtypes)
    if not keys:
        return []
    merged, d = by_layer(np.concatenate(blocks), keys)
    item, layers = [key // _KIND for key in merged], [key % _KIND for key in merged]
    step_of = [steps[i // 3] for i in item]
    kind_of = [kinds[i % 3] for i in item]
    counts = {c: d[c].astype(np.int64).tolist() for c in (
        "zeros", "nonfinite", "underflow_fp16", "overflow_fp16", "underflow_bf16",
        "overflow_bf16", "numel")}
    mins = np.where(np.isfinite(d["min_abs_nonzero"]), d["min_abs_nonzero"], np.nan)
    dtype = [dts[i // 3].get((layer, role[kind])) for i, layer, kind in zip(item, layers, kind_of)]
    lo, blobs = zip(*pack_hists(d["hist"]))
    return [Rows.columns(LayerStatRow, step=step_of, layer_idx=layers, tensor=kind_of,
                         dtype=dtype, norm=d["norm"].tolist(), max_abs=d["max_abs"].tolist(),
                         min_abs_nonzero=mins.tolist(), **counts),
            Rows.columns(HistogramRow, step=step_of, layer_idx=layers, tensor=kind_of, lo=lo,
                         counts=blobs)]


_KIND = 1 << 32  # (kind, layer) -> one merge key
