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
from typing import Any

import numpy as np
import torch

from .formats import N_BINS

SAMPLE_CAP = 1 << 10
# per-tensor row: norm, max_abs, min_abs_nonzero, numel, sampled, then the histogram
N_HEAD = 5
ROW = N_HEAD + N_BINS

_FP16_UNDER = (1, 104)    # bins with upper edge <= 2**-24
_FP16_OVER = (144, 256)   # bins with lower edge >= 2**16
_BF16_UNDER = (1, 2)


def tensor_stats(tensors: list[torch.Tensor], scaled: tuple[int, int, Any] | None = None,
                 backend: str | None = None) -> "torch.Tensor | np.ndarray":
    """Statistics of each tensor: ``[len(tensors), ROW]``, one row per tensor.

    CPU tensors are measured with numpy (a float64 array; their memory is shared, not copied,
    and numpy's segment reductions cost a fraction of torch's per-op dispatch); tensors on an
    accelerator on their device (a float32 tensor there; :func:`tensor_stats_device`).
    ``backend="numpy"`` / ``"torch"`` forces one (tests compare the two on the CPU).

    ``scaled=(i, j, scale)``: tensors ``i..j-1`` are multiplied by ``scale`` (GradScaler's loss
    scale: a float or a 0-d tensor) and are measured divided by it, i.e. unscaled.
    """
    if backend is None:
        backend = "numpy" if tensors[0].device.type == "cpu" else "torch"
    if backend == "numpy":
        return tensor_stats_host(tensors, scaled)
    if scaled is not None and not isinstance(scaled[2], torch.Tensor):
        scaled = (scaled[0], scaled[1], torch.tensor(float(scaled[2]), device=tensors[0].device))
    return tensor_stats_device(tensors, scaled)


def _host_array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor's (sampled) elements; float16/32/64 are not copied."""
    t = t.detach()
    k = t.numel()
    if t.dtype not in (torch.float32, torch.float16, torch.float64):
        t = t.reshape(-1)[:: -(-k // SAMPLE_CAP)] if k > SAMPLE_CAP else t
        return t.float().numpy().reshape(-1)  # bfloat16, fp8: numpy has no such dtype
    a = t.numpy().reshape(-1)
    return a[:: -(-k // SAMPLE_CAP)] if k > SAMPLE_CAP else a


def tensor_stats_host(tensors: list[torch.Tensor],
                      scaled: tuple[int, int, Any] | None = None) -> np.ndarray:
    """:func:`tensor_stats` for CPU tensors, with numpy: float64 ``[n, ROW]``.

    The (sampled) elements of all tensors are concatenated once; norm, max and smallest nonzero
    are segment reductions (``reduceat``), the histograms one ``bincount`` of exponent bits.
    """
    n = len(tensors)
    out = np.zeros((n, ROW))
    numel = [t.numel() for t in tensors]
    out[:, 3] = numel
    out[:, 2] = np.inf
    keep = [k for k in range(n) if numel[k]]
    if not keep:
        return out
    arrays = [_host_array(tensors[k]) for k in keep]
    lengths = tuple(a.shape[0] for a in arrays)
    x = np.concatenate(arrays, dtype=np.float32)
    np.abs(x, out=x)
    starts, key_base = _host_layout(lengths)
    if scaled is not None:
        i, j, scale = scaled
        rows = [r for r, k in enumerate(keep) if i <= k < j]
        if rows:
            lo = starts[rows[0]]
            hi = starts[rows[-1]] + lengths[rows[-1]]
            x[lo:hi] /= np.float32(float(scale))
    bits = x.view(np.int32)
    # bin 0: zeros, 1: fp32 subnormals, e + 1: biased exponent e (255: inf/nan)
    key = bits >> 23
    key += bits != 0
    key += key_base
    # (torch's bincount takes the int32 keys as they are; numpy's converts them first)
    hist = torch.bincount(torch.from_numpy(key), minlength=len(keep) * N_BINS).numpy()
    hist = hist.reshape(len(keep), N_BINS)
    norms = np.sqrt(np.add.reduceat(np.square(x, dtype=np.float64), starts))
    maxes = np.maximum.reduceat(x, starts)
    # On the int32 bits (ordered like magnitudes), x - 1 sends zero to the largest int32.
    mins = ((np.minimum.reduceat((bits - 1) & 0x7FFFFFFF, starts) + 1)
            .astype(np.int32).view(np.float32).astype(np.float64))
    mins[~np.isfinite(mins) | (mins <= 0)] = np.inf
    rows = np.asarray(keep)
    out[rows, 0], out[rows, 1], out[rows, 2] = norms, maxes, mins
    out[rows, 4] = lengths
    out[rows, N_HEAD:] = hist
    big = [r for r, k in enumerate(keep) if numel[k] > SAMPLE_CAP]
    if big:  # norm and max over every element, not the sample
        full = [tensors[keep[r]].detach() for r in big]
        div = [float(scaled[2]) if scaled is not None and scaled[0] <= keep[r] < scaled[1] else 1.0
               for r in big]
        big_norms = torch.stack(torch._foreach_norm(full, 2, dtype=torch.float32)).double()
        big_maxes = torch.stack([torch.stack(torch.aminmax(f)) for f in full]).double().abs().amax(1)
        d = np.asarray(div)
        out[rows[big], 0] = big_norms.numpy() / d
        out[rows[big], 1] = big_maxes.numpy() / d
    return out


@functools.lru_cache(maxsize=64)
def _host_layout(lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Segment starts, and each element's histogram offset (its row times N_BINS)."""
    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.intp)
    base = np.repeat(np.arange(len(lengths), dtype=np.int32) * N_BINS, lengths)
    return starts, base


def tensor_stats_device(tensors: list[torch.Tensor],
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
