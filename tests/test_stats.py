"""Tensor statistics: the numpy path (CPU) and the torch path (accelerators) agree, and both
match plain per-tensor references on awkward values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpviz.stats import N_HEAD, ROW, SAMPLE_CAP, tensor_stats

INF, NAN = float("inf"), float("nan")


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(100, generator=g),
        torch.zeros(10),
        torch.tensor([0.0, 1e-40, 3.0, INF, NAN, -2.0]),  # zero, fp32 subnormal, inf, nan
        torch.randn(5 * SAMPLE_CAP, generator=g) * 1e-6,  # sampled
        torch.randn(20 * SAMPLE_CAP, generator=g).half(),  # sampled, fp16
        torch.randn(300, generator=g).bfloat16(),
        torch.randn(7, 9, generator=g).t(),  # not contiguous
        torch.randn(3, generator=g, requires_grad=True),
        torch.empty(0),
    ]


@pytest.mark.parametrize("scaled", [None, (3, 6, 1024.0)])
def test_numpy_and_torch_paths_agree(tensors, scaled):
    a = tensor_stats(tensors, scaled, backend="numpy")
    b = tensor_stats(tensors, scaled, backend="torch").double().numpy()
    assert a.shape == b.shape == (len(tensors), ROW)
    np.testing.assert_allclose(a, b, rtol=1e-5, equal_nan=True)


def test_rows_match_per_tensor_references(tensors):
    rows = tensor_stats(tensors, (3, 4, 1024.0))
    for k, t in enumerate(tensors):
        row, x = rows[k], t.detach().double().flatten().abs()
        if k == 3:
            x = x / 1024.0  # measured unscaled
        assert row[3] == x.numel()
        if x.numel() == 0:
            continue
        finite = torch.isfinite(x).all()
        assert math.isnan(row[0]) if x.isnan().any() else row[0] == pytest.approx(
            x.norm().item(), rel=1e-5)
        if finite:
            assert row[1] == pytest.approx(x.max().item(), rel=1e-6)
        if x.numel() <= SAMPLE_CAP:  # every element counted
            hist = row[N_HEAD:]
            assert hist.sum() == x.numel()
            assert hist[0] == (x == 0).sum().item()
            assert hist[-1] == (~torch.isfinite(x)).sum().item()
            nz = x[(x > 0) & torch.isfinite(x)]
            assert row[2] == (pytest.approx(nz.min().item(), rel=1e-6) if nz.numel() else INF)
        else:  # the histogram counts a strided sample of about SAMPLE_CAP elements
            assert SAMPLE_CAP // 2 <= row[4] <= SAMPLE_CAP and row[N_HEAD:].sum() == row[4]


def test_samples_of_a_big_tensor_move_along_with_the_step():
    """Every element of a sampled tensor is seen over `stride` steps, not the same ones each time."""
    k = 3 * SAMPLE_CAP
    x = torch.zeros(k)
    x[1::3] = 1.0  # only elements at positions 1 mod 3 are nonzero
    zeros = [tensor_stats([x], offset=step)[0, N_HEAD] for step in range(3)]
    lengths = [tensor_stats([x], offset=step)[0, 4] for step in range(3)]
    assert lengths == [SAMPLE_CAP] * 3
    assert zeros == [SAMPLE_CAP, 0, SAMPLE_CAP]  # offset 1 sees only the ones
    for step in range(3):  # the accelerator path samples the same elements
        dev = tensor_stats([x], offset=step, backend="torch")
        assert dev[0, N_HEAD].item() == zeros[step]
