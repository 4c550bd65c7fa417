"""mpviz.formats, the one table of precisions: it agrees with torch, and everything uses it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mpviz import stats
from mpviz.formats import (ALIASES, DTYPE_PRECISION, FORMATS, NONFINITE_BIN, PRECISIONS, SUBNORMAL_BIN,
                           ZERO_BIN, bin_edges, bin_of, canonical, did_you_mean)
from mpviz.precision import supported_precisions, torch_dtype


def test_formats_imports_no_torch():
    code = "import mpviz.formats, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", PRECISIONS)
def test_each_precision_is_its_torch_dtype(name):
    f = FORMATS[name]
    dtype = getattr(torch, f.dtype, None)
    if dtype is None:
        pytest.skip(f"this torch has no torch.{f.dtype}")
    assert str(dtype) == f"torch.{f.dtype}" and torch_dtype(name) is dtype
    assert canonical(dtype) == canonical(f.dtype) == DTYPE_PRECISION[f.dtype] == name
    info = torch.finfo(dtype)
    assert (f.max, f.min_normal) == (info.max, info.smallest_normal)
    assert f.mantissa_bits == -torch.tensor(info.eps).log2().item()
    # the smallest subnormal survives a cast; half of it (a tie, rounded to even) is 0
    assert f.min_subnormal == info.smallest_normal * info.eps
    assert torch.tensor([f.min_subnormal, f.min_subnormal / 2]).to(dtype).tolist() == [f.min_subnormal, 0.0]


def test_aliases():
    assert all(ALIASES[p] == p for p in PRECISIONS)
    assert {canonical(a) for a in ("float", "half", "mixed_float16", "mixed_bfloat16", "float8_e4m3")} \
        == {"fp32", "fp16", "bf16", "fp8_e4m3"}
    with pytest.raises(ValueError, match="Unknown precision 'fp12'. Use one of fp32, fp16, bf16"):
        canonical("fp12")


def test_did_you_mean():
    assert did_you_mean("hed", ["", "head", "body"]) == "close matches: 'head'"
    assert did_you_mean("blocks.0.atn", ["blocks.1.attn", "blocks.0.attn", "head"]) \
        == "close matches: 'blocks.0.attn', 'blocks.1.attn'"   # the closest first
    assert did_you_mean("mlpp", ["digits", "text", "mlp"], ask=True) == "did you mean mlp?"
    assert did_you_mean("xyz", ["digits", "text", "mlp"]) == ""


def test_one_order_of_precisions():
    from mpviz import __main__, precision
    from mpviz.dashboard import plots, queries
    from mpviz.dashboard.steer_panel import INHERIT, SteerPanel

    assert PRECISIONS == ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
    assert precision.PRECISIONS is queries.PRECISIONS is __main__.PRECISIONS is PRECISIONS
    assert supported_precisions("cpu") == tuple(p for p in PRECISIONS if p in supported_precisions("cpu"))
    assert SteerPanel().rule_precision.options == PRECISIONS + (INHERIT,)
    # the dtype map's colour k is the k-th precision's
    assert [c for _, c in plots.DTYPE_COLORSCALE[:-2:2]] == [plots.DTYPE_COLORS[p] for p in PRECISIONS]


def test_histogram_bins_are_the_ones_stats_counts():
    x = torch.tensor([0.0, 1e-40, 1.0, 1.5, 3.0, 2.0**-20, float("inf"), float("nan")])
    hist = stats.tensor_stats([x], backend="numpy")[0, stats.N_HEAD:]
    assert {k: int(c) for k, c in enumerate(hist) if c} == {
        ZERO_BIN: 1, SUBNORMAL_BIN: 1, bin_of(0): 2, bin_of(1): 1, bin_of(-20): 1, NONFINITE_BIN: 2}
    assert bin_edges(bin_of(-20)) == (2.0**-20, 2.0**-19)
    assert bin_edges(SUBNORMAL_BIN) == (0.0, FORMATS["fp32"].min_normal)
