"""Per-layer tensor statistics computed on the tensors' device, all layers at once.

The tensors of all layers are flattened into one vector and reduced per segment (one segment per
layer), so a recorded step costs a fixed handful of kernels whatever the number of layers, and the
result is a single small tensor that the recorder copies to the host once per step.
"""
from __future__ import annotations

import torch

from .formats import FORMATS

# Columns of the [n_segments, N_COLS] result.
COLS = ("sumsq", "max_abs", "min_abs_nonzero", "zeros", "underflow_bf16_only",
        "underflow_fp16_only", "normal", "overflow_fp16_only", "overflow_bf16", "nonfinite")
N_COLS = len(COLS)
_N_BUCKETS = 7  # zeros, <bf16 subnormal, <fp16 subnormal, normal, >fp16 max, >bf16 max, non-finite

# Magnitude bucket edges (right-closed on the left: edges[i-1] <= |x| < edges[i]).
# "Underflow" = nonzero but below the format's smallest subnormal; "overflow" = above its max.
_EDGES = (
    FORMATS["fp32"].min_subnormal,
    FORMATS["bf16"].min_subnormal,
    FORMATS["fp16"].min_subnormal,
    float(torch.nextafter(torch.tensor(FORMATS["fp16"].max), torch.tensor(float("inf")))),
    float(torch.nextafter(torch.tensor(FORMATS["bf16"].max, dtype=torch.float32),
                          torch.tensor(float("inf")))),
)


def segment_stats(tensors: list[torch.Tensor], segments: list[int], n_segments: int,
                  divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Statistics of ``tensors`` grouped into segments.

    ``segments[i]`` is the segment (0..n_segments-1) of ``tensors[i]``; tensors of one segment
    must be adjacent. ``divisor`` (a 0-d device tensor, e.g. the loss scale) divides the
    magnitudes first, so scaled gradients are measured unscaled. Returns float32
    ``[n_segments, N_COLS]`` on the tensors' device; segments with no elements get zeros
    (min_abs_nonzero = inf).
    """
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).float()
    lengths = torch.zeros(n_segments, dtype=torch.long)
    for t, s in zip(tensors, segments):
        lengths[s] += t.numel()
    lengths = lengths.to(device, non_blocking=True)
    a = flat.abs_()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, 0.0)
    if divisor is not None:
        a = a / divisor
    out = torch.zeros(n_segments, N_COLS, device=device)
    out[:, 0] = torch.segment_reduce(a * a, "sum", lengths=lengths, unsafe=True)
    out[:, 1] = torch.segment_reduce(a, "max", lengths=lengths, unsafe=True, initial=0.0)
    out[:, 2] = torch.segment_reduce(torch.where(a > 0, a, float("inf")), "min", lengths=lengths,
                                     unsafe=True, initial=float("inf"))
    edges = torch.tensor(_EDGES, device=device, dtype=torch.float32)
    bucket = torch.bucketize(a, edges, right=True)
    bucket = torch.where(finite, bucket, _N_BUCKETS - 1)
    seg = torch.repeat_interleave(torch.arange(n_segments, device=device), lengths,
                                  output_size=flat.numel())
    counts = torch.bincount(seg * _N_BUCKETS + bucket, minlength=n_segments * _N_BUCKETS)
    out[:, 3:] = counts.view(n_segments, _N_BUCKETS).float()
    return out


def summarize(row: list[float]) -> dict[str, float]:
    """Turn one host-side row of :func:`segment_stats` into the recorded quantities."""
    sumsq, max_abs, min_nz, zeros, uf_bf16, uf_fp16, normal, of_fp16, of_bf16, nonfinite = row
    return {
        "norm": sumsq ** 0.5,
        "max_abs": max_abs,
        "min_abs_nonzero": None if min_nz == float("inf") else min_nz,
        "zeros": int(zeros),
        "nonfinite": int(nonfinite),
        "underflow_fp16": int(uf_bf16 + uf_fp16),
        "overflow_fp16": int(of_fp16 + of_bf16),
        "underflow_bf16": int(uf_bf16),
        "overflow_bf16": int(of_bf16),
        "numel": int(zeros + uf_bf16 + uf_fp16 + normal + of_fp16 + of_bf16 + nonfinite),
    }
