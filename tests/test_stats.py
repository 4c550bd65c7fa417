"""Tensor statistics: the numpy path (CPU) and the torch path (accelerators) agree, and both
match plain per-tensor references on awkward values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpviz.stats import N_HEAD, ROW, SAMPLE_CAP, by_layer, tensor_stats

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


# ------------------------------------------------------------------ underflow / overflow vs a cast
# The recorded counts answer "how many values would a cast to fp16 / bf16 turn into 0 / inf?".
# The reference is the cast itself (torch's and numpy's), not another mpviz code path. Where the
# log2 histogram cannot see the answer the counts are off by exactly the bands mpviz.stats names.

F16_TIE = 2.0 ** -25  # rounds to 0 (a tie, to even) but shares its binade with values that do not
F16_BAND = (65520.0, 65536.0)  # round to inf, but share their binade with fp16's max 65504
BF16_TINY = 2.0 ** -126  # bf16's smallest normal; a cast zeroes only |x| <= 2**-134
BF16_INF = (2 - 2.0 ** -8) * 2.0 ** 127  # from here on a cast to bf16 gives inf


def cast_counts(t: torch.Tensor) -> dict[str, int]:
    """What a real cast does: nonzero values that become 0, finite values that become inf."""
    t = t.detach().float().flatten()
    nz, fin = t != 0, torch.isfinite(t)
    h, b = t.to(torch.float16), t.to(torch.bfloat16)
    out = {"underflow_fp16": int((nz & (h == 0)).sum()), "overflow_fp16": int((fin & h.isinf()).sum()),
           "underflow_bf16": int((nz & (b == 0)).sum()), "overflow_bf16": int((fin & b.isinf()).sum())}
    with np.errstate(over="ignore"):  # numpy's fp16 cast agrees with torch's
        a = t.numpy()
        n16 = a.astype(np.float16)
    assert out["underflow_fp16"] == int(((a != 0) & (n16 == 0)).sum())
    assert out["overflow_fp16"] == int((np.isfinite(a) & np.isinf(n16)).sum())
    return out


def expected_recorded(t: torch.Tensor) -> dict[str, int]:
    """The cast counts, corrected by the bands of the documented definition."""
    x = t.detach().float().flatten().abs()
    c = cast_counts(t)
    bf16_zero_band = int(((x > 2.0 ** -134) & (x < BF16_TINY)).sum())  # kept as bf16 subnormals
    assert c["underflow_bf16"] == int(((x > 0) & (x <= 2.0 ** -134)).sum())
    assert c["overflow_bf16"] == int((torch.isfinite(x) & (x >= BF16_INF)).sum())
    return {"underflow_fp16": c["underflow_fp16"] - int((x == F16_TIE).sum()),
            "overflow_fp16": c["overflow_fp16"] - int(((x >= F16_BAND[0]) & (x < F16_BAND[1])).sum()),
            "underflow_bf16": c["underflow_bf16"] + bf16_zero_band,
            "overflow_bf16": 0}


def recorded(t: torch.Tensor, backend: str) -> dict[str, int]:
    rows = tensor_stats([t], backend=backend)
    rows = rows if isinstance(rows, np.ndarray) else rows.double().numpy()
    _, out = by_layer(rows, [0])
    return {k: int(out[k][0]) for k in ("underflow_fp16", "overflow_fp16", "underflow_bf16",
                                        "overflow_bf16")}


def around(*xs: float) -> list[float]:
    """Each float32 value and its two neighbours."""
    out = []
    with np.errstate(over="ignore"):  # past float32's max: inf
        for x in xs:
            f = np.float32(x)
            out += [np.nextafter(f, np.float32(0)), f, np.nextafter(f, np.float32(np.inf))]
    return [float(v) for v in out]


STRADDLE = around(2.0 ** -24, 1.5 * 2.0 ** -25, 2.0 ** -25, 2.0 ** -26, 65504, 65520, 2.0 ** 16,
                  2.0 ** -126, 2.0 ** -133, 1.5 * 2.0 ** -134, 2.0 ** -134, 2.0 ** -149,
                  torch.finfo(torch.bfloat16).max, BF16_INF, torch.finfo(torch.float32).max)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_underflow_and_overflow_counts_follow_what_a_cast_does(backend):
    t = torch.tensor(STRADDLE + [-v for v in STRADDLE] + [0.0, 1.0, INF, -INF, NAN])
    got, want = recorded(t, backend), expected_recorded(t)
    assert got == want
    # the cast itself, for the record: what each threshold value becomes
    assert torch.tensor([2.0 ** -25, 1.0001 * 2.0 ** -25]).half().tolist() == [0.0, 2.0 ** -24]
    assert torch.tensor([65519.99, 65520.0]).half().tolist() == [65504.0, INF]
    assert torch.tensor([2.0 ** -133, 2.0 ** -134]).bfloat16().float().tolist() == [2.0 ** -133, 0.0]

    # away from the bands the counts are the cast's exactly: log-uniform magnitudes over the
    # whole float32 range, random signs
    g = torch.Generator().manual_seed(0)
    e = torch.empty(SAMPLE_CAP, dtype=torch.float64).uniform_(-149, 128, generator=g)
    x = (2.0 ** e * torch.where(torch.rand(SAMPLE_CAP, generator=g) < 0.5, -1.0, 1.0)).float()
    x = x[torch.isfinite(x) & (x.abs() != F16_TIE) & ((x.abs() < F16_BAND[0]) | (x.abs() >= F16_BAND[1]))
          & ((x.abs() >= BF16_TINY) | (x.abs() <= 2.0 ** -134)) & (x.abs() < BF16_INF)]
    got, cast = recorded(x, backend), cast_counts(x)
    assert got == cast and min(cast.values()) == 0 < cast["underflow_fp16"]
    assert cast["overflow_fp16"] > 0 and cast["underflow_bf16"] > 0


def test_recorded_gradient_fractions_match_a_cast_of_the_same_gradients(tmp_path):
    """Real gradients of a small model, captured with our own hooks, cast to fp16 and bf16.

    The loss is multiplied by a different power of two each step (as a loss scale would do),
    which moves the real gradient distribution across each threshold in turn."""
    import mpviz
    from mpviz.demos import get_task

    task = get_task("mlp")
    model = task.model(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    grads: dict[tuple[int, str], list[torch.Tensor]] = {}
    step = [0]
    hooks = [p.register_post_accumulate_grad_hook(
        lambda p, name=name: grads.setdefault((step[0], name), []).append(p.grad.detach().clone()))
        for name, m in model.named_modules() for p in m.parameters(recurse=False)]
    factors = [2.0 ** -20, 2.0 ** 22, 2.0 ** -120, 1.0]  # fp16 underflow, fp16 overflow, bf16 underflow
    batches = task.batches(seed=0)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        for step[0], f in enumerate(factors):
            x, y = next(batches)
            loss = task.loss_fn(model(x), y)
            (loss * f).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    for h in hooks:
        h.remove()
    stats = mpviz.load_run(tmp_path / "r").layer_stats
    rows = stats[stats["tensor"] == "grad"]
    assert sorted(set(zip(rows["step"], rows["layer"]))) == sorted(grads)
    totals = dict.fromkeys(["underflow_fp16", "overflow_fp16", "underflow_bf16"], 0)
    for r in rows.itertuples():
        g = torch.cat([t.flatten() for t in grads[(r.step, r.layer)]])
        assert r.numel == g.numel() <= 2 * SAMPLE_CAP  # every element counted (no sampling)
        want = expected_recorded(g)
        for col, n in want.items():
            assert getattr(r, col) * r.numel == pytest.approx(n, abs=1e-6), (r.step, r.layer, col)
        cast = cast_counts(g)
        for col in totals:
            totals[col] += cast[col]
    # each threshold was really straddled by real gradients
    assert all(n > 0 for n in totals.values()), totals


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_norms_of_tiny_and_huge_tensors_match_float64(backend):
    """Norms whose float32 squares would vanish (values near 1e-30, fp32 subnormals) or overflow
    (near 1e25), below and above SAMPLE_CAP, in float32 and bf16, against numpy in float64.
    (The accelerator path's rows are float32: a norm itself above float32's max would be inf.)"""
    g = torch.Generator().manual_seed(1)
    tensors = []
    for scale in (1e-30, 1e-42, 1e25, 1e35):
        for n in (100, 3 * SAMPLE_CAP):
            tensors.append(torch.randn(n, generator=g) * scale)
    tensors += [torch.randn(200, generator=g).bfloat16() * 1e-25,
                (torch.randn(3 * SAMPLE_CAP, generator=g) * 1e30).bfloat16()]
    rows = tensor_stats(tensors, backend=backend)
    rows = rows if isinstance(rows, np.ndarray) else rows.double().numpy()
    for row, t in zip(rows, tensors):
        a = t.float().numpy().astype(np.float64)
        assert np.isfinite(np.linalg.norm(a)) and np.linalg.norm(a) > 0
        assert row[0] == pytest.approx(np.linalg.norm(a), rel=1e-5), (t.dtype, t.numel(), a.max())
        assert row[1] == pytest.approx(np.abs(a).max(), rel=1e-6)
    # scaled (a loss scale): measured divided by it, still in range
    rows = tensor_stats(tensors[:2], (0, 2, 2.0 ** 16), backend=backend)
    rows = rows if isinstance(rows, np.ndarray) else rows.double().numpy()
    for row, t in zip(rows, tensors[:2]):
        a = t.numpy().astype(np.float64) / 2.0 ** 16
        assert row[0] == pytest.approx(np.linalg.norm(a), rel=1e-5)
