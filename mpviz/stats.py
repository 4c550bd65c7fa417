"""Tensor statistics, computed on the tensors' device for many tensors at once.

One recorded step costs a fixed handful of kernels whatever the number of tensors: multi-tensor
(``torch._foreach_*``) norms and maxima on the full tensors, and one ``bincount`` of the float32
exponent bits for a log2 histogram per tensor, from which the zero / underflow / overflow /
non-finite counts are read. The result is one small tensor per call; the recorder copies all of a
step's results to the host in one transfer.

The histogram has ``N_BINS`` bins per tensor:
    bin 0: exact zeros
    bin 1: fp32 subnormals, 0 < |x| < 2**-126
    bin k (2..255): 2**(k-128) <= |x| < 2**(k-127)
    bin 256: inf or nan
Thresholds read from it are powers of two: fp16 underflow is 0 < |x| < 2**-24 (exact: fp16's
smallest subnormal), fp16 overflow is |x| >= 2**16 (fp16's max is 65504 and values from 65520 up
round to inf, so a band of 16 units under 2**16 is not counted), bf16 underflow is 0 < |x| < 2**-126
(bf16 subnormals, down to 2**-133, are counted as underflowing: fp32 holds them only as subnormals
too), bf16 overflow is |x| >= 2**128, i.e. never for a finite fp32 value.

Tensors above ``SAMPLE_CAP`` elements have their histogram (and so their fractions) taken from
evenly strided elements; norm, max and min are always over every element.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .formats import N_BINS

SAMPLE_CAP = 1 << 15
# per-tensor row: norm, max_abs, min_abs_nonzero, numel, sampled, then the histogram
N_HEAD = 5
ROW = N_HEAD + N_BINS

_FP16_UNDER = (1, 104)    # bins with upper edge <= 2**-24
_FP16_OVER = (144, 256)   # bins with lower edge >= 2**16
_BF16_UNDER = (1, 2)


def tensor_stats(tensors: list[torch.Tensor],
                 scaled: tuple[int, int, torch.Tensor] | None = None) -> torch.Tensor:
    """Statistics of each tensor: float32 ``[len(tensors), ROW]`` on the tensors' device.

    ``scaled=(i, j, scale)``: tensors ``i..j-1`` are multiplied by ``scale`` (a 0-d device
    tensor: GradScaler's loss scale) and are measured divided by it, i.e. unscaled.
    """
    device = tensors[0].device
    flat = [t.detach().reshape(-1) for t in tensors]
    numel = [f.numel() for f in flat]
    samples = [f if n <= SAMPLE_CAP else f[:: -(-n // SAMPLE_CAP)] for f, n in zip(flat, numel)]
    lengths = [s.numel() for s in samples]
    # The exponent histogram needs float32 bits; sampled elements only.
    a = torch.cat(samples).float().abs_()
    if scaled is not None:
        i, j, scale = scaled
        a[sum(lengths[:i]):sum(lengths[:j])] /= scale
    bits = a.view(torch.int32)
    key = bits >> 23
    key -= (bits == 0).to(torch.int32)
    key += _bin_base(tuple(lengths), device)
    hist = torch.bincount(key, minlength=len(tensors) * N_BINS).view(len(tensors), N_BINS)
    # Norms and maxima over every element (fp32 accumulation, no copy of the data).
    norms = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float32))
    maxes = torch.stack(torch._foreach_max(torch._foreach_abs(flat))).float()
    # Smallest nonzero magnitude, on the int32 bits (same order as the magnitudes): x - 1 sends
    # zero to the largest int32, so the minimum skips zeros.
    m = (bits - 1) & 0x7FFFFFFF
    mins = -torch.stack(torch._foreach_max(torch._foreach_neg(list(m.split(lengths)))))
    for k, (f, n) in enumerate(zip(flat, numel)):
        if n > SAMPLE_CAP:  # the sample may miss the smallest value: take it over every element
            full = f.float().abs()
            if scaled is not None and scaled[0] <= k < scaled[1]:
                full /= scaled[2]
            mins[k] = ((full.view(torch.int32) - 1) & 0x7FFFFFFF).amin()
    mins = (mins + 1).view(torch.float32)
    mins = torch.where((mins > 0) & torch.isfinite(mins), mins, float("inf"))
    if scaled is not None:
        norms[i:j] /= scale
        maxes[i:j] /= scale
    head = torch.stack([norms, maxes, mins, _const(tuple(numel), device),
                        _const(tuple(lengths), device)], dim=1)
    return torch.cat([head, hist.float()], dim=1)


@functools.lru_cache(maxsize=64)
def _bin_base(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Per element, the offset of its tensor's histogram in the flat bincount (+1, see bins)."""
    starts = torch.arange(len(lengths), dtype=torch.int32) * N_BINS + 1
    return torch.repeat_interleave(starts, torch.tensor(lengths)).to(device)


@functools.lru_cache(maxsize=64)
def _const(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def by_layer(block: np.ndarray, owners: list[int]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Merge host-side rows of :func:`tensor_stats` per layer (a layer's weight and bias are
    adjacent rows with the same owner). Counts are scaled up from samples.

    Returns the layers and, per quantity, an array with one value per layer; ``hist`` is
    ``[n_layers, N_BINS]``.
    """
    owners_a = np.asarray(owners)
    starts = np.flatnonzero(np.r_[True, owners_a[1:] != owners_a[:-1]])
    layers = owners_a[starts].tolist()
    scale = np.divide(block[:, 3], block[:, 4], out=np.zeros(len(block)), where=block[:, 4] > 0)
    hist = np.rint(np.add.reduceat(block[:, N_HEAD:] * scale[:, None], starts, axis=0))
    mins = np.where(block[:, 2] > 0, block[:, 2], np.inf)
    out = {
        "norm": np.sqrt(np.add.reduceat(block[:, 0] ** 2, starts)),
        "max_abs": np.maximum.reduceat(block[:, 1], starts),
        "min_abs_nonzero": np.minimum.reduceat(mins, starts),
        "numel": np.add.reduceat(block[:, 3], starts),
        "zeros": hist[:, 0], "nonfinite": hist[:, 256],
        "underflow_fp16": hist[:, slice(*_FP16_UNDER)].sum(1),
        "overflow_fp16": hist[:, slice(*_FP16_OVER)].sum(1),
        "underflow_bf16": hist[:, slice(*_BF16_UNDER)].sum(1),
        "overflow_bf16": np.zeros(len(starts)),
        "hist": hist,
    }
    return layers, out
