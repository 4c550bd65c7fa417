"""Rows of per-layer statistics, made on the writer thread from the numbers a step handed over."""
from __future__ import annotations

import numpy as np

from ..stats import HostSample, by_layer
from ..store import pack_hists


def stat_rows(items: list[tuple]) -> list[tuple[str, list[tuple]]]:
    """``layer_stats`` and ``histograms`` rows of many steps, from their statistics (run on the
    writer thread: the training thread only hands over the numbers). Each item is
    ``(step, statistics, owners, act_rows, dtypes)``; one merge per layer for all of them."""
    kinds = ("activation", "grad", "weight")
    role = {"activation": "output", "grad": "grad", "weight": "weight"}
    blocks, keys, steps, dts = [], [], [], []
    for n, (step, stats, owners, act_rows, dtypes) in enumerate(items):
        if isinstance(stats, HostSample):
            stats = stats.rows()
        n_act = max(act_rows, default=-1) + 1
        # activations of a tensor shared by several modules: the same row for each
        blocks += [stats[:n_act][act_rows], stats[n_act:]]
        # a (step, kind, layer)'s rows share a key: one merge for everything
        keys += [(n * 3 + k) * _KIND + layer for k, kind in enumerate(kinds)
                 for layer in owners[kind]]
        steps.append(step)
        dts.append(dtypes)
    if not keys:
        return []
    merged, d = by_layer(np.concatenate(blocks), keys)
    item, layers = [key // _KIND for key in merged], [key % _KIND for key in merged]
    step_of = [steps[i // 3] for i in item]
    kind_of = [kinds[i % 3] for i in item]
    ints = [d[c].astype(np.int64).tolist() for c in (
        "zeros", "nonfinite", "underflow_fp16", "overflow_fp16", "underflow_bf16",
        "overflow_bf16", "numel")]
    mins = np.where(np.isfinite(d["min_abs_nonzero"]), d["min_abs_nonzero"], np.nan)
    rows = list(zip(step_of, layers, kind_of,
                    [dts[i // 3].get((layer, role[kind]))
                     for i, layer, kind in zip(item, layers, kind_of)],
                    d["norm"].tolist(), d["max_abs"].tolist(), mins.tolist(), *ints))
    hists = [(st, layer, kind, lo, blob)
             for st, layer, kind, (lo, blob) in zip(step_of, layers, kind_of, pack_hists(d["hist"]))]
    return [("layer_stats", rows), ("histograms", hists)]


_KIND = 1 << 32  # (kind, layer) -> one merge key
