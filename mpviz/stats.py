"""Tensor statistics for many tensors at once: norm, max |x|, smallest nonzero |x| and a log2
histogram (one ``bincount`` of the float32 exponent bits), from which the zero / underflow /
overflow / non-finite counts are read. On an accelerator a fixed handful of kernels whatever the
number of tensors (:func:`tensor_stats_device`); on the CPU, where torch's per-op dispatch would
dominate, a copy of each tensor's (sampled) elements that numpy finishes on another thread
(:class:`HostSample`).

The histogram has ``N_BINS`` bins per tensor, one per float32 exponent (zeros, subnormals, each
binade, inf/nan: the layout is :mod:`mpviz.formats`'s).
The underflow / overflow counts say how many values a cast to fp16 or bf16 (round to nearest
even, as ``t.to(torch.float16)``) would turn into 0 or inf. Read from the histogram, their
thresholds are powers of two, so they are exact except in the bands named here:
    fp16 underflow: 0 < |x| < 2**-25 (half fp16's smallest subnormal 2**-24; from just above
        2**-25 values round up to 2**-24). Exactly 2**-25, a tie that rounds to 0, is not counted.
    fp16 overflow: finite |x| >= 2**16. Values from 65520 (halfway between fp16's max 65504 and
        2**16) round to inf too, but share their binade with 65504: not counted.
    bf16 underflow: 0 < |x| < 2**-126 (fp32's subnormals: bf16 has fp32's exponent range). An
        upper bound: a cast keeps subnormals down to 2**-133 and rounds only |x| <= 2**-134 to 0.
    bf16 overflow: always 0. Only finite fp32 values within 0.2% of fp32's max (|x| >= (2 -
        2**-8) * 2**127) round to inf in bf16; their binade holds bf16's max too.
Values already inf or nan are counted as non-finite, not as overflow.

Norm and max |x| are always over every element. Tensors above ``SAMPLE_CAP`` elements have
their histogram (so zero, underflow, overflow and non-finite counts) and smallest nonzero |x| taken
from a fixed number of evenly strided elements, starting one element further each step: those
fractions are estimates (a non-finite norm with no inf/nan in the sample is reported as one
non-finite value). The overflow events (mpviz.overflow) are exact.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from .formats import N_BINS, NONFINITE_BIN, SUBNORMAL_BIN, ZERO_BIN, bin_of

SAMPLE_CAP = 1 << 12
# per-tensor row: norm, max_abs, min_abs_nonzero, numel, sampled, then the histogram
N_HEAD = 5
ROW = N_HEAD + N_BINS

_FP16_UNDER = (SUBNORMAL_BIN, bin_of(-25))  # upper edge <= 2**-25: a cast to fp16 rounds them to 0
_FP16_OVER = (bin_of(16), NONFINITE_BIN)    # bins with lower edge >= 2**16
_BF16_UNDER = (SUBNORMAL_BIN, SUBNORMAL_BIN + 1)


def tensor_stats(tensors: list[torch.Tensor], scaled: tuple[int, int, Any] | None = None,
                 backend: str | None = None, offset: int = 0) -> "torch.Tensor | np.ndarray":
    """Statistics of each tensor: ``[len(tensors), ROW]``, one row per tensor.

    CPU tensors are measured with numpy (a float64 array, see :class:`HostSample`: numpy's
    segment reductions cost a fraction of torch's per-op dispatch); tensors on an accelerator
    on their device (a float32 tensor there; :func:`tensor_stats_device`).
    ``backend="numpy"`` / ``"torch"`` forces one (tests compare the two on the CPU).

    ``scaled=(i, j, scale)``: tensors ``i..j-1`` are multiplied by ``scale`` (GradScaler's loss
    scale: a float or a 0-d tensor) and are measured divided by it, i.e. unscaled.
    ``offset``: where the samples of big tensors start (the recorder passes the step).
    """
    if backend is None:
        backend = "numpy" if tensors[0].device.type == "cpu" else "torch"
    if backend == "numpy":
        return HostSample.take(tensors, scaled, offset=offset).rows()
    return tensor_stats_device(tensors, scaled, offset)


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def _strided(flat: Any, k: int, offset: int) -> Any:
    """Every stride-th of a big tensor's ``k`` elements from ``offset % stride``, a fixed number
    of them (numpy array or torch tensor): successive steps see different elements."""
    stride = -(-k // SAMPLE_CAP)
    return flat[offset % stride::stride][: k // stride]


def _host_views(t: torch.Tensor, offset: int = 0,
                flat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Numpy views of a CPU tensor: its (sampled) elements, and, for a sampled float32 tensor,
    all of them (to measure its norm and max exactly). float16/32/64 are not copied (``flat``:
    the flat view, if known); other dtypes, which numpy lacks, are converted, sample only.

    ``offset``: see :func:`_strided`."""
    k = t.numel()
    if t.dtype not in _NUMPY_DTYPES:
        t = t.detach().reshape(-1)
        return (_strided(t, k, offset) if k > SAMPLE_CAP else t).float().numpy(), None
    a = t.detach().numpy().reshape(-1) if flat is None else flat
    if k <= SAMPLE_CAP:
        return a, None
    return _strided(a, k, offset), (a if a.dtype == np.float32 else None)


class HostSample:
    """What statistics of CPU tensors need, taken at once: a copy of their (sampled) elements,
    one concatenation per dtype, and the exact norm and max |x| of the sampled ones.
    :meth:`rows` computes the rest (segment reductions and one ``bincount``) on any thread."""

    def __init__(self, numel: list[int], keep: list[int], lengths: tuple[int, ...],
                 groups: list[tuple[list[int], np.ndarray]], scaled: dict[int, float],
                 exact: dict[int, tuple[float, float]]) -> None:
        self.numel, self.keep, self.lengths = numel, keep, lengths
        self.groups = groups  # (kept rows, their samples concatenated) per dtype
        self.scaled = scaled  # kept row -> the scale it is to be measured divided by
        self.exact = exact  # kept row -> (norm, max |x|) over every element

    @classmethod
    def take(cls, tensors: list[torch.Tensor], scaled: tuple[int, int, Any] | None = None,
             cache: dict | None = None, stable_from: int | None = None,
             offset: int = 0) -> "HostSample":
        """Tensors from ``stable_from`` on (parameters) keep their flat numpy views in
        ``cache``; ``offset`` (the step) moves the samples of big tensors along."""
        numel = [t.numel() for t in tensors]
        keep = [k for k in range(len(tensors)) if numel[k]]
        if cache is None or stable_from is None:
            stable_from = len(tensors)
        views = []
        used = {}
        for k in keep:
            t = tensors[k]
            if k < stable_from or t.dtype not in _NUMPY_DTYPES:
                views.append(_host_views(t, offset))
                continue
            key = (id(t), t.data_ptr(), t.dtype, t.shape)  # a parameter given new data: anew
            flat = cache.get(key)  # type: ignore[union-attr]
            if flat is None:
                flat = t.detach().numpy().reshape(-1)
            used[key] = flat
            views.append(_host_views(t, offset, flat))
        if cache is not None and stable_from < len(tensors):
            cache.clear()  # views of replaced parameter data would keep that memory alive
            cache.update(used)
        lengths = tuple(v[0].shape[0] for v in views)
        # One copy per dtype (numpy's float16 -> float32 conversion is slow: rows() does it)
        by_dtype: dict[Any, list[int]] = {}
        for r, v in enumerate(views):
            by_dtype.setdefault(v[0].dtype, []).append(r)
        groups = [(rows, np.concatenate([views[r][0] for r in rows]))
                  for rows in by_dtype.values()]
        div = [1.0] * len(keep)
        if scaled is not None:
            i, j, scale = scaled
            for r, k in enumerate(keep):
                if i <= k < j:
                    div[r] = float(scale)
        exact = _exact_host(tensors, keep, numel, views, div)
        return cls(numel, keep, lengths, groups, {r: d for r, d in enumerate(div) if d != 1.0},
                   exact)

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for _, buf in self.groups)

    def rows(self) -> np.ndarray:
        """Float64 ``[n, ROW]``, as :func:`tensor_stats`."""
        keep, lengths = self.keep, self.lengths
        out = np.zeros((len(self.numel), ROW))
        out[:, 3] = self.numel
        out[:, 2] = np.inf
        if not keep:
            return out
        pieces: list[Any] = [None] * len(keep)
        for rows, buf in self.groups:
            at = 0
            for r in rows:
                pieces[r] = buf[at:at + lengths[r]]
                at += lengths[r]
        x = np.concatenate(pieces, dtype=np.float32)
        np.abs(x, out=x)
        starts, key_base = _host_layout(lengths)
        with np.errstate(divide="ignore", invalid="ignore"):  # a scale of 0: nan, as GradScaler
            for r, scale in self.scaled.items():
                x[starts[r]:starts[r] + lengths[r]] /= np.float32(scale)
        bits = x.view(np.int32)
        # bin 0: zeros, 1: fp32 subnormals, e + 1: biased exponent e (255: inf/nan);
        # intp keys, as bincount wants them
        key = np.right_shift(bits, 23, out=np.empty(len(bits), np.intp))
        key += bits != 0
        key += key_base
        # numpy, not torch: a torch op on a second thread starts a second OpenMP team, whose
        # spinning workers slow the training thread's ops
        hist = np.bincount(key, minlength=len(keep) * N_BINS)
        norms = np.sqrt(np.add.reduceat(np.square(x, dtype=np.float64), starts))
        maxes = np.maximum.reduceat(x, starts).astype(np.float64)
        # On the int32 bits (ordered like magnitudes), x - 1 sends zero to the largest int32.
        mins = ((np.minimum.reduceat((bits - 1) & 0x7FFFFFFF, starts) + 1)
                .astype(np.int32).view(np.float32).astype(np.float64))
        mins[~np.isfinite(mins) | (mins <= 0)] = np.inf
        for r, (nm, mx) in self.exact.items():
            norms[r], maxes[r] = nm, mx
        rows = np.asarray(keep)
        out[rows, 0], out[rows, 1], out[rows, 2] = norms, maxes, mins
        out[rows, 4] = lengths
        out[rows, N_HEAD:] = hist.reshape(len(keep), N_BINS)
        return out


def _exact_host(tensors: list[torch.Tensor], keep: list[int], numel: list[int], views: list[Any],
                div: list[float]) -> dict[int, tuple[float, float]]:
    """Sampled tensors' norm and max |x| over every element, taken now (the tensors change after
    the optimizer step): float32 with numpy (BLAS dot, SIMD max/min), other dtypes with torch
    (numpy's float16 math is slow)."""
    exact: dict[int, tuple[float, float]] = {}
    in_torch = []
    for r, k in enumerate(keep):
        if numel[k] > SAMPLE_CAP:
            full = views[r][1]
            if full is None:
                in_torch.append(r)
            else:
                top = max(float(full.max()), -float(full.min()))
                # float32 squares vanish below ~1e-19 and overflow above ~1e19
                sq = float(np.dot(full, full)) if _squares_fit(top) else \
                    float(np.dot(full.astype(np.float64), full.astype(np.float64)))
                exact[r] = (math.sqrt(sq) / div[r], top / div[r])
    if in_torch:
        norms, maxes = _norm_max([tensors[keep[r]].detach() for r in in_torch])
        for r, nm, mx in zip(in_torch, norms.tolist(), maxes.tolist()):
            exact[r] = (nm / div[r], mx / div[r])
    return exact


def _squares_fit(top: float) -> bool:
    """Whether float32 squares of values up to ``top`` neither vanish nor overflow (inf and nan
    come out right either way)."""
    return not (0 < top < 2.0 ** -30 or 2.0 ** 50 < top < math.inf)


def _norm_max(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm and max |x| of each tensor over every element: float32 tensors on their device.
    The squares are summed in float64 where float32 ones would vanish or overflow: on the CPU
    only for tensors whose max |x| says so (reading it is no sync), elsewhere for all (one fused
    pass)."""
    # (an inf-norm is ~20x slower than aminmax on the CPU)
    maxes = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors]).float().abs().amax(1)
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).float(), maxes
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    for r, top in enumerate(maxes.tolist()):
        if not _squares_fit(top):
            norms[r] = torch.linalg.vector_norm(tensors[r], dtype=torch.float64).float()
    return norms, maxes


@functools.lru_cache(maxsize=8)
def _host_layout(lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Segment starts, and each element's histogram offset (its row times N_BINS)."""
    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.intp)
    base = np.repeat(np.arange(len(lengths), dtype=np.intp) * N_BINS, lengths)
    return starts, base


def tensor_stats_device(tensors: list[torch.Tensor], scaled: tuple[int, int, Any] | None = None,
                        offset: int = 0) -> torch.Tensor:
    """Statistics of each tensor: float32 ``[len(tensors), ROW]`` on the tensors' device.

    ``scaled=(i, j, scale)``: as :func:`tensor_stats` (``scale`` a 0-d device tensor, read
    there without a sync, or a float). ``offset``: see :func:`_strided`.

    How: each tensor's (sampled) elements become one zero-padded row of a matrix, so every
    statistic is one row-wise reduction for all tensors together. A per-tensor loop, which is
    what ``torch._foreach_*`` is on the CPU, costs microseconds of dispatch per tensor and
    operation; only tensors above ``SAMPLE_CAP`` get two per-tensor reductions (norm, max).
    Zero padding changes no statistic; its count is taken out of the zero bin.
    """
    device = tensors[0].device
    if scaled is not None and not isinstance(scaled[2], torch.Tensor):
        scaled = (scaled[0], scaled[1], torch.tensor(float(scaled[2]), device=device))
    n = len(tensors)
    flat = [t.detach().reshape(-1) for t in tensors]
    numel = tuple(f.numel() for f in flat)
    samples = [f if k <= SAMPLE_CAP else _strided(f, k, offset) for f, k in zip(flat, numel)]
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
    if device.type == "cpu":
        hist = torch.bincount(key.view(-1), minlength=n * N_BINS).view(n, N_BINS).float()
    else:  # bincount on an accelerator reads min and max back to the host: two syncs
        hist = torch.zeros(n * N_BINS, device=device).index_add_(
            0, key.view(-1), torch.ones(key.numel(), device=device)).view(n, N_BINS)
    zeros = width - torch.count_nonzero(m, 1)  # padding included
    hist[:, SUBNORMAL_BIN] -= zeros
    hist[:, ZERO_BIN] = zeros - (width - _const(lengths, device))
    # On the int32 bits (ordered like the magnitudes), x - 1 sends zero to the largest int32,
    # so the minimum skips zeros.
    mins = (((bits - 1) & 0x7FFFFFFF).amin(1) + 1).view(torch.float32)
    mins = torch.where((mins > 0) & torch.isfinite(mins), mins, float("inf"))
    maxes = m.amax(1)
    # Each row divided by its max |x| before squaring: float32 squares of values below ~1e-19
    # would vanish and above ~1e19 overflow (inf and nan rows keep their inf/nan norm).
    unit = torch.where((maxes > 0) & torch.isfinite(maxes), maxes, 1.0)
    norms = (m / unit[:, None]).square_().sum(1).sqrt_().mul_(unit)
    _exact_big(norms, maxes, flat, numel, scaled)
    head = torch.stack([norms, maxes, mins, _const(numel, device), _const(lengths, device)], dim=1)
    return torch.cat([head, hist], dim=1)


def _exact_big(norms: torch.Tensor, maxes: torch.Tensor, flat: list[torch.Tensor],
               numel: tuple[int, ...], scaled: tuple[int, int, Any] | None) -> None:
    """Norm and max of sampled tensors over every element, not the sample (fp32 accumulation)."""
    big = [k for k in range(len(flat)) if numel[k] > SAMPLE_CAP]
    if not big:
        return
    idx = _index(tuple(big), norms.device)   # cached: a fresh host -> device copy blocks
    big_norms, big_maxes = _norm_max([flat[k] for k in big])
    if scaled is not None:
        i, j, scale = scaled
        d = torch.where((idx >= i) & (idx < j), scale, 1.0)
        big_norms, big_maxes = big_norms / d, big_maxes / d
    norms[idx], maxes[idx] = big_norms, big_maxes


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


@functools.lru_cache(maxsize=64)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)


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
    nonfinite = hist[:, NONFINITE_BIN]
    hist[:, NONFINITE_BIN] = np.where(np.isfinite(block[:, 0]), nonfinite, np.maximum(nonfinite, 1))
    hist = np.rint(np.add.reduceat(hist, starts, axis=0))
    out = {
        "norm": np.sqrt(np.add.reduceat(block[:, 0] ** 2, starts)),
        "max_abs": np.maximum.reduceat(block[:, 1], starts),
        "min_abs_nonzero": np.minimum.reduceat(block[:, 2], starts),
        "numel": np.add.reduceat(block[:, 3], starts),
        "zeros": hist[:, ZERO_BIN], "nonfinite": hist[:, NONFINITE_BIN],
        "underflow_fp16": hist[:, slice(*_FP16_UNDER)].sum(1),
        "overflow_fp16": hist[:, slice(*_FP16_OVER)].sum(1),
        "underflow_bf16": hist[:, slice(*_BF16_UNDER)].sum(1),
        "overflow_bf16": np.zeros(len(starts)),
        "hist": hist,
    }
    return layers, out
