"""Tensor statistics, computed on the tensors' device for many tensors at once.

A recorded step costs a fixed handful of kernels whatever the number of tensors: the tensors'
elements are laid out as rows of one zero-padded matrix, and norm, max, smallest nonzero and a
log2 histogram (one ``bincount`` of the float32 exponent bits) are row-wise reductions. The
zero / underflow / overflow / non-finite counts are read from the histogram. The result is one
small tensor per call; the recorder copies all of a step's results to the host in one transfer.

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

Norm and max |x| are always over every element. Tensors above ``SAMPLE_CAP`` elements have
their histogram (so zero, underflow, overflow and non-finite counts) and smallest nonzero |x| taken
from evenly strided elements: those fractions are estimates (a non-finite norm with no inf/nan in
the sample is reported as one non-finite value). The overflow events (mpviz.overflow) are exact.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .formats import N_BINS

SAMPLE_CAP = 1 << 12
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

    How: each tensor's (sampled) elements become one zero-padded row of a matrix, so every
    statistic is one row-wise reduction for all tensors together. A per-tensor loop, which is
    what ``torch._foreach_*`` is on the CPU, costs microseconds of dispatch per tensor and
    operation; only tensors above ``SAMPLE_CAP`` get two per-tensor reductions (norm, max).
    Zero padding changes no statistic; its count is taken out of the zero bin.
    """
    device = tensors[0].device
    n = len(tensors)
    flat = [t.detach().reshape(-1) for t in tensors]
    numel = tuple(f.numel() for f in flat)
    samples = [f if k <= SAMPLE_CAP else f[:: -(-k // SAMPLE_CAP)] for f, k in zip(flat, numel)]
    lengths = tuple(s.numel() for s in samples)
    width = max(lengths)
    m = torch.zeros(n * width, device=device)
    m[_row_slots(lengths, width, device)] = torch.cat(samples).float()
    m = m.abs_().view(n, width)
    if scaled is not None:
        i, j, scale = scaled
        m[i:j] /= scale
    bits = m.view(torch.int32)
    key = bits >> 23  # biased exponent: 0 for zeros and fp32 subnormals, 255 for inf/nan
    key += _row_base(n, device)  # exponent e -> bin e + 1 of its row
    hist = torch.bincount(key.view(-1), minlength=n * N_BINS).view(n, N_BINS).float()
    zeros = width - torch.count_nonzero(m, 1)  # padding included
    hist[:, 1] -= zeros
    hist[:, 0] = zeros - (width - _const(lengths, device))
    # On the int32 bits (ordered like the magnitudes), x - 1 sends zero to the largest int32,
    # so the minimum skips zeros.
    mins = (((bits - 1) & 0x7FFFFFFF).amin(1) + 1).view(torch.float32)
    mins = torch.where((mins > 0) & torch.isfinite(mins), mins, float("inf"))
    norms = (m * m).sum(1).sqrt_()
    maxes = m.amax(1)
    big = [k for k in range(n) if numel[k] > SAMPLE_CAP]
    if big:  # norm and max over every element, not the sample (fp32 accumulation)
        full = [flat[k] for k in big]
        idx = torch.tensor(big, device=device)
        big_norms = torch.stack(torch._foreach_norm(full, 2, dtype=torch.float32))
        # (an inf-norm is ~20x slower than aminmax on the CPU)
        big_maxes = torch.stack([torch.stack(torch.aminmax(f)) for f in full]).float().abs().amax(1)
        if scaled is not None:
            d = torch.where((idx >= i) & (idx < j), scale, 1.0)
            big_norms, big_maxes = big_norms / d, big_maxes / d
        norms[idx], maxes[idx] = big_norms, big_maxes
    head = torch.stack([norms, maxes, mins, _const(numel, device), _const(lengths, device)], dim=1)
    return torch.cat([head, hist], dim=1)


@functools.lru_cache(maxsize=64)
def _row_slots(lengths: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """Where each element of the concatenated tensors goes in the zero-padded matrix."""
    starts = torch.arange(len(lengths)) * width
    rows = torch.repeat_interleave(starts, torch.tensor(lengths))
    first = torch.repeat_interleave(torch.tensor((0,) + lengths[:-1]).cumsum(0), torch.tensor(lengths))
    return (rows + torch.arange(len(rows)) - first).to(device)


@functools.lru_cache(maxsize=64)
def _row_base(rows: int, device: torch.device) -> torch.Tensor:
    """Per row, the offset of its histogram in the flat bincount (+1: exponent e -> bin e+1)."""
    return (torch.arange(rows, dtype=torch.int32) * N_BINS + 1).view(rows, 1).to(device)


@functools.lru_cache(maxsize=256)
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
    hist = block[:, N_HEAD:] * scale[:, None]
    # a non-finite norm proves at least one inf/nan even if the sample missed it
    hist[:, 256] = np.where(np.isfinite(block[:, 0]), hist[:, 256], np.maximum(hist[:, 256], 1))
    hist = np.rint(np.add.reduceat(hist, starts, axis=0))
    out = {
        "norm": np.sqrt(np.add.reduceat(block[:, 0] ** 2, starts)),
        "max_abs": np.maximum.reduceat(block[:, 1], starts),
        "min_abs_nonzero": np.minimum.reduceat(block[:, 2], starts),
        "numel": np.add.reduceat(block[:, 3], starts),
        "zeros": hist[:, 0], "nonfinite": hist[:, 256],
        "underflow_fp16": hist[:, slice(*_FP16_UNDER)].sum(1),
        "overflow_fp16": hist[:, slice(*_FP16_OVER)].sum(1),
        "underflow_bf16": hist[:, slice(*_BF16_UNDER)].sum(1),
        "overflow_bf16": np.zeros(len(starts)),
        "hist": hist,
    }
    return layers, out
