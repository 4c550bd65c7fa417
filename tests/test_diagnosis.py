"""mpviz.diagnose / headroom / advise and the recording-time diagnostics, on real training runs
made to fail, each checked against an independent reference (the test's own hooks, NumPy,
an fp32 run, a hand computation)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mpviz
from mpviz.__main__ import main as cli
from mpviz.demos import Trainer
from mpviz.scenarios import overflow_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F = nn.functional

g = torch.Generator().manual_seed(1)
X = torch.randn(30, 32, 16, generator=g)
Y = (X @ torch.randn(16, 4, generator=g)).argmax(-1)


def big_model() -> nn.Module:
    """An MLP whose layer `big` makes activations ~1e5, past fp16's 65504 (its weights x1e6);
    the LayerNorm after it (fp32 under autocast) brings them back (the lab's fp16-overflow
    scenario builds the same, for the demo MLP's data)."""
    return overflow_model(n_in=16, hidden=32, n_out=4, seed=0)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential()
    for name, mod in [("fc1", nn.Linear(16, 64)), ("act1", nn.ReLU()), ("fc2", nn.Linear(64, 64)),
                      ("act2", nn.ReLU()), ("head", nn.Linear(64, 4))]:
        m.add_module(name, mod)
    return m


def train(model, precision="fp32", scaler=False, run_dir=None, policy=None, steps=30, lr=1e-2,
          loss_weight=1.0, every=5, hooks=None, **rec_kwargs):
    """Adam on (X, Y) under fp16 autocast (or fp32); recorded when run_dir is given.
    Returns the losses; `hooks(model)` may watch the plain run."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sc = torch.amp.GradScaler("cpu", enabled=scaler)
    rec = (mpviz.Recorder(model, optimizer=opt, scaler=sc, run_dir=run_dir, every=every,
                          policy=policy, **rec_kwargs) if run_dir else None)
    losses = []
    if rec:
        rec.attach()
    try:
        for i in range(steps):
            with torch.autocast("cpu", dtype=torch.float16, enabled=precision == "fp16"):
                loss = loss_weight * F.cross_entropy(model(X[i % len(X)]).float(), Y[i % len(X)])
            sc.scale(loss).backward()
            if hooks:
                hooks(model, i)
            sc.step(opt)
            sc.update()
            opt.zero_grad()
            if rec:
                rec.step(loss=loss)
            losses.append(loss.item())
    finally:
        if rec:
            rec.close()
    return losses


# ------------------------------------------------------------------ the example
@pytest.fixture(scope="module")
def lr5_run(tmp_path_factory):
    """`python -m mpviz demo --task mlp --precision fp16 --lr 5`, 20 steps; the test's own hooks
    note, per step, the first module whose fp16 output held inf/nan."""
    d = tmp_path_factory.mktemp("lr5") / "run"
    t = Trainer(task="mlp", precision="fp16", lr=5, run_dir=str(d), every=5)
    first_bad: dict[int, str] = {}
    step = [0]

    def hook(name):
        def h(mod, args, out):
            if torch.is_grad_enabled() and step[0] not in first_bad and not torch.isfinite(out).all():
                first_bad[step[0]] = name
        return h

    hs = [m.register_forward_hook(hook(n)) for n, m in t.model.named_modules() if n]
    with t:
        for i in range(20):
            step[0] = i
            t.step()
    for h in hs:
        h.remove()
    return d, first_bad


def test_lr5_is_a_forward_overflow_in_fc3(lr5_run, capsys):
    d, first_bad = lr5_run
    diag = mpviz.diagnose(d)
    top = diag.findings[0]
    assert (top.kind, top.severity, top.layers) == ("forward_overflow", "error", ["fc3"])
    assert set(first_bad.values()) == {"fc3"}  # the test's own hooks agree
    assert top.steps == (min(first_bad), max(first_bad)) == (1, 19)
    assert "cannot fix a forward overflow" in top.message and "fp32" in top.suggestion
    # lr 5: Adam's first step moves every weight by ~5 (max |w| 0.12 -> 5.1 in fc3)
    assert "grew 41x from step 0 to step 5" in top.message
    assert top.suggestion.startswith("lower the learning rate")
    kinds = [f.kind for f in diag.findings]
    assert kinds.index("forward_overflow") < kinds.index("scale_collapse")
    assert "nonfinite_loss" in kinds
    # the timeline: every backoff annotated with its cause and layer
    tl = diag.timeline
    back = tl[tl["event"] == "backoff"]
    assert back["step"].tolist() == list(range(1, 20))
    assert set(back["cause"]) == {"forward_overflow"} and all(l == ["fc3"] for l in back["layers"])
    steps = mpviz.load_run(d).steps
    assert np.allclose(back["scale"], steps["loss_scale"].iloc[1:])
    # the CLI prints the same report, exit 0; a missing run exits 2 with a message
    assert cli(["diagnose", str(d)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == str(diag) and "forward_overflow" in out and "fc3" in out
    assert cli(["diagnose", str(d.parent / "nope")]) == 2
    assert "no run at" in capsys.readouterr().err


# ------------------------------------------------------------------ acceptance: forward overflow
@pytest.fixture(scope="module")
def big_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    ref = train(big_model())                                           # fp32, not recorded
    f16 = train(big_model(), "fp16", scaler=True, run_dir=root / "fp16")
    return root, ref, f16


def test_forward_overflow_diagnosed_and_advised(big_runs):
    root, ref, f16 = big_runs
    diag = mpviz.diagnose(root / "fp16")
    top = diag.findings[0]
    assert (top.kind, top.layers, top.steps) == ("forward_overflow", ["big"], (0, 29))
    # reference: big's own output, in fp16, overflows on the first batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        m = big_model()
        h = m.act1(m.fc1(X[0]))
        assert torch.isfinite(m.fc1(X[0])).all() and not torch.isfinite(m.big(h)).all()
    policy = mpviz.advise(root / "fp16")
    assert policy.rules == {"*": "fp16", "big": "fp32"}
    assert set(policy.reasons) == {"big"} and "forward" in policy.reasons["big"]
    # estimate: big's share of the leaf modules' parameters (hand count)
    n = {"fc1": 16 * 32 + 32, "big": 32 * 32 + 32, "norm": 64, "head": 32 * 4 + 4}
    assert policy.estimate["time_share"] == pytest.approx(n["big"] / sum(n.values()))
    assert 0 < policy.estimate["memory_share"] < 1
    # training under the advice: no skipped step, and fp32's loss (mean of the last 10 within
    # 5%); fp16 everywhere is NaN
    adv = train(big_model(), "fp16", scaler=True, run_dir=root / "advised", policy=policy)
    run = mpviz.load_run(root / "advised")
    assert not run.steps["skipped"].any()
    assert np.mean(adv[-10:]) == pytest.approx(np.mean(ref[-10:]), rel=0.05)
    assert all(math.isnan(l) for l in f16)
    assert mpviz.diagnose(run).ok


def test_advise_from_an_fp32_run_uses_headroom(tmp_path):
    train(big_model(), run_dir=tmp_path / "fp32", steps=6)
    policy = mpviz.advise(tmp_path / "fp32", target="fp16")
    assert policy.rules == {"*": "fp16", "big": "fp32"}
    assert "exceed fp16's largest value" in policy.reasons["big"]


# ------------------------------------------------------------------ acceptance: gradient underflow
def test_gradient_underflow_without_loss_scaling(tmp_path):
    """A loss weighted by 1e-5 (an auxiliary loss, say): in fp16 without GradScaler the weight
    gradients underflow. Reference: the fp32 run's own gradients, of which a good share lies
    below fp16's smallest subnormal (2^-24)."""
    below: dict[str, list[float]] = {}

    def watch(model, i):
        for name in ("fc1", "fc2", "head"):
            gr = np.abs(getattr(model, name).weight.grad.numpy())
            below.setdefault(name, []).append(float(((gr > 0) & (gr < 2.0 ** -24)).mean()))

    ref = train(small_model(), lr=1e-3, loss_weight=1e-5, steps=20, hooks=watch)
    f16 = train(small_model(), "fp16", lr=1e-3, loss_weight=1e-5, steps=20, run_dir=tmp_path / "u")
    expected = {n for n, v in below.items() if np.median(v) > 0.1}
    assert expected == {"fc1", "fc2", "head"}
    diag = mpviz.diagnose(tmp_path / "u")
    top = diag.findings[0]
    assert top.kind == "gradient_underflow" and set(top.layers) == expected
    assert top.steps[0] == 0 and "GradScaler" in top.suggestion
    assert np.mean(f16[-5:]) > np.mean(ref[-5:]) * 1.02  # fp16 without scaling trains worse
    # with GradScaler: no underflow, and fp32's loss
    scaled = train(small_model(), "fp16", scaler=True, lr=1e-3, loss_weight=1e-5, steps=20,
                   run_dir=tmp_path / "s")
    assert mpviz.diagnose(tmp_path / "s").ok
    assert np.mean(scaled[-5:]) == pytest.approx(np.mean(ref[-5:]), rel=0.01)


# ------------------------------------------------------------------ gradients that vanish entirely
def dead_model() -> nn.Module:
    """small_model with act2 dead for every input (fc2's bias -100): fc1's and fc2's gradients
    are zero in any precision."""
    m = small_model()
    with torch.no_grad():
        m.fc2.bias.fill_(-100.0)
    return m


@pytest.mark.parametrize("weight, make", [(1e-6, small_model), (3e-6, small_model),
                                          (3e-6, dead_model)])
def test_gradients_that_underflow_to_zero(tmp_path, weight, make):
    """fp16 autocast on the CPU without GradScaler, the loss x1e-6: every gradient underflows to
    exactly zero (x3e-6: fc1's and fc2's; head's sits at fp16's floor). Reference: on every
    step, the test computes the fp32 gradient of the run's very weights and batch (a hook-free
    copy); the layers named, and their steps, are exactly those where the run's gradient is
    all zero and the fp32 one is not. The dead model's zero gradients are zero in fp32 too:
    not named. The same model and data trained in fp32 has no gradient_underflow."""
    plain, seen = make(), {}

    def watch(model, i):
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        (weight * F.cross_entropy(plain(X[i % len(X)]), Y[i % len(X)])).backward()
        seen[i] = {n: tuple(max(float(p.grad.abs().max()) for p in getattr(m, n).parameters())
                            for m in (model, plain)) for n in ("fc1", "fc2", "head")}

    train(make(), "fp16", lr=1e-3, loss_weight=weight, steps=20, run_dir=tmp_path / "fp16",
          hooks=watch)
    run = mpviz.load_run(tmp_path / "fp16")
    stat = sorted(run.layer_stats["step"].unique())
    assert stat == [0, 5, 10, 15]
    expected = {n: [s for s in stat if seen[s][n][0] == 0 < seen[s][n][1]]
                for n in ("fc1", "fc2", "head")}
    expected = {n: v for n, v in expected.items() if v}
    g = run.layer_stats.query("tensor == 'grad'")  # the recorded max |g| is the hooks' one
    assert [(r.step, r.layer) for r in g.itertuples() if r.max_abs == 0] == sorted(
        ((s, n) for s in stat for n in ("fc1", "fc2", "head") if seen[s][n][0] == 0))
    (f,) = mpviz.diagnose(run).by_kind("gradient_underflow")
    assert f.severity == "error" and f.evidence["zero_steps"] == expected
    if make is dead_model:      # head's gradients at the floor; fc1's and fc2's legitimately 0
        assert expected == {} and f.layers == ["head"] and f.evidence["all_zero_steps"] == []
        assert all(seen[s][n] == (0.0, 0.0) for s in stat for n in ("fc1", "fc2"))
    elif weight == 1e-6:        # everything vanished, every step
        assert expected == {n: stat for n in ("fc1", "fc2", "head")}
        assert f.layers == ["fc1", "fc2", "head"] and f.evidence["all_zero_steps"] == stat
        assert f.message.startswith('the gradients of "fc1", "fc2", "head" were entirely zero '
                                    "on 4 of 4 statistics steps")
    else:                       # head's at the floor, fc1's and fc2's vanished
        assert expected == {"fc1": stat, "fc2": stat} and f.layers == ["head", "fc1", "fc2"]
    assert f.steps == (0, 15) and "GradScaler()" in f.suggestion
    # the same model and data in fp32: nonzero gradients, no finding
    train(make(), lr=1e-3, loss_weight=weight, steps=20, run_dir=tmp_path / "fp32")
    ref = mpviz.load_run(tmp_path / "fp32")
    g32 = ref.layer_stats.query("tensor == 'grad'")
    for n, steps in expected.items():
        assert (g32[g32.layer == n].set_index("step").loc[steps, "max_abs"] > 0).all()
    assert not mpviz.diagnose(ref).by_kind("gradient_underflow")


class RootWeight(nn.Sequential):
    """Children named "0", "1", "2", and a weight of the model itself (recorded as layer "")."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.out = nn.Parameter(torch.randn(4, 8) / 3)

    def forward(self, x):
        return F.linear(super().forward(x), self.out)


def test_messages_quote_layer_names_and_call_the_root_model(tmp_path):
    train(RootWeight(), "fp16", loss_weight=1e-6, steps=10, run_dir=tmp_path / "u")
    d = mpviz.diagnose(tmp_path / "u")
    (f,) = d.findings
    assert f.kind == "gradient_underflow" and f.layers == ["", "0", "2"]
    assert f.message.startswith('the gradients of (model), "0", "2" were entirely zero')
    assert '(steps 0-5 | (model), "0", "2")' in str(d)
    assert 'the output of "0": ' in d.notes[-1]
    train(RootWeight(), "fp16", scaler=True, steps=10, run_dir=tmp_path / "s")
    note = mpviz.diagnose(tmp_path / "s").notes[0]
    assert note.startswith("at step 5 (loss scale 65536) the scale can double")
    assert note.endswith(' before the gradients of "2" overflow fp16')


# ------------------------------------------------------------------ healthy runs
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_healthy_demo_runs_have_nothing_above_info(tmp_path, precision):
    with Trainer(task="mlp", precision=precision, run_dir=str(tmp_path / "r"), every=5) as t:
        for _ in range(30):
            t.step()
    diag = mpviz.diagnose(tmp_path / "r")
    assert diag.ok, str(diag)


# ------------------------------------------------------------------ headroom against NumPy
def test_headroom_matches_numpy(tmp_path):
    """One recorded fp16 step; the test keeps its own copies of fc2's output and weight
    gradient and computes the headroom with NumPy."""
    model = small_model()
    seen = {}
    model.fc2.register_forward_hook(lambda m, a, out: seen.__setitem__("act", out.detach().float().numpy().copy()))
    def keep(m, i):
        for name in ("fc1", "fc2", "head"):
            mod = getattr(m, name)
            seen[name] = np.concatenate([mod.weight.grad.numpy().ravel(), mod.bias.grad.numpy().ravel()])
        seen["grad"] = seen["fc2"]

    train(model, "fp16", scaler=True, run_dir=tmp_path / "h", steps=1, hooks=keep)
    run = mpviz.load_run(tmp_path / "h")
    scale = float(run.steps["loss_scale"].iloc[0])
    h = mpviz.headroom(run)
    from mpviz.formats import FORMATS
    # (the hook sees the scaled gradients; a layer's row is its weight and bias together)
    for tensor, x, s in [("activation", seen["act"], 1.0), ("grad", seen["grad"] / scale, scale)]:
        ax = np.abs(x.astype(np.float64)).ravel()
        for fmt in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"):
            row = h[(h.layer == "fc2") & (h.tensor == tensor) & (h.format == fmt)].iloc[0]
            f = FORMATS[fmt]
            over = math.log2(f.max / (s * ax.max()))
            low = np.percentile(ax[ax > 0], 1.0)
            under = math.log2(s * low / f.min_subnormal)
            assert row.bits_to_overflow == pytest.approx(over, abs=1e-5), (tensor, fmt)
            # binade resolution: the histogram's lower bin edge, so within one bit below
            assert under - 1 - 1e-9 <= row.bits_to_underflow <= under + 1e-9, (tensor, fmt)
    # in words: how many more times the scale can double before a gradient overflows fp16
    bits = {n: math.log2(65504 / np.abs(seen[n].astype(np.float64)).max()) for n in ("fc1", "fc2", "head")}
    worst = min(bits, key=bits.get)
    note = f'the scale can double {math.floor(bits[worst])} more times before the gradients of "{worst}"'
    assert any(note in n for n in mpviz.diagnose(run).notes), (note, mpviz.diagnose(run).notes)


# ------------------------------------------------------------------ percentiles of many histograms
def hist_percentile(counts, q):
    """The reference: one histogram at a time, as diagnose() read them before (#19)."""
    c = np.asarray(list(counts), dtype=np.float64)
    if len(c) < 257:
        c = np.pad(c, (0, 257 - len(c)))
    finite = c[1:256]
    total = finite.sum()
    if total <= 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(finite), q / 100.0 * total, side="left")) + 1
    k = min(max(k, 1), 255)
    return 2.0 ** -149 if k == 1 else 2.0 ** (k - 128)


def test_percentiles_of_all_histograms_at_once_equal_one_at_a_time(lr5_run, tmp_path, monkeypatch):
    """hist_percentiles over recorded histograms (the lr5 run's inf/nan and zeros, a run whose
    gradients sit at fp16's floor) and edge cases equals the per-histogram reference, and so
    does headroom()'s low_abs, read in chunks of 7 histograms."""
    import importlib

    from mpviz.store import pack_hists, unpack_hist

    hr = importlib.import_module("mpviz.diagnosis.headroom")   # the module, not the function
    from mpviz import run as run_module

    train(small_model(), "fp16", loss_weight=3e-6, steps=10, every=1, run_dir=tmp_path / "u")
    recorded = []
    for d in (lr5_run[0], tmp_path / "u"):
        run = mpviz.load_run(d)
        recorded.append(run.query("SELECT lo, counts FROM histograms ORDER BY step, layer_idx, tensor"))
        run.close()
    rec = pd.concat(recorded, ignore_index=True)
    assert len(rec) > 150
    edge = np.zeros((9, 257), dtype=np.int64)      # row 0: empty (all zero)
    edge[1, 0] = 5                                # zeros only
    edge[2, 256] = 3                              # inf/nan only
    edge[3, 1] = 2                                # fp32 subnormals only
    edge[4, 255] = 1                              # one bin, the top finite one
    edge[5, 100] = 7                              # one bin
    edge[6, 1:101] = 1                            # 1% and 50% of the total end a bin
    edge[7, [0, 90, 91, 200, 256]] = [4, 1, 98, 1, 2]
    edge[8] = np.random.default_rng(0).integers(0, 3, 257)
    packed = pack_hists(edge)
    assert packed[0] == (0, b"") and len(packed[5][1]) == 8   # empty; one bin
    los = rec["lo"].tolist() + [lo for lo, _ in packed]
    blobs = rec["counts"].tolist() + [b for _, b in packed]
    counts = run_module.hist_counts(los, blobs)
    assert counts.shape == (len(blobs), 257)
    for q in (0.0, 0.5, 1.0, 50.0, 99.0, 100.0):
        want = [hist_percentile(unpack_hist(lo, b), q) for lo, b in zip(los, blobs)]
        np.testing.assert_array_equal(hr.hist_percentiles(counts, q), want, err_msg=str(q))
    assert np.isnan(hr.hist_percentiles(counts[-9:-6], 1.0)).all()  # no finite nonzero value
    # headroom()'s low_abs, in several chunks, row by row against the reference
    monkeypatch.setattr(run_module, "CHUNK_ROWS", 7)
    run = mpviz.load_run(lr5_run[0])
    h = mpviz.headroom(run, formats=["fp16"])
    ref = run.query("SELECT s.step, l.layer, s.tensor, h.lo, h.counts FROM layer_stats s "
                    "JOIN layers l ON l.idx = s.layer_idx LEFT JOIN histograms h ON h.step = s.step "
                    "AND h.layer_idx = s.layer_idx AND h.tensor = s.tensor "
                    "WHERE s.tensor IN ('activation', 'grad') ORDER BY s.step, s.layer_idx")
    run.close()
    assert len(h) == len(ref) > 2 * 7 and h["step"].tolist() == ref["step"].tolist()
    want = [hist_percentile(unpack_hist(int(lo), b), 1.0) if b is not None else np.nan
            for lo, b in zip(ref["lo"].fillna(0), ref["counts"])]
    np.testing.assert_array_equal(h["low_abs"].to_numpy(), want)


def test_advise_takes_the_diagnosis_it_is_given(lr5_run, tmp_path, monkeypatch):
    """advise(run, diagnosis=d) does not diagnose again and advises as advise(run) does; a
    diagnosis of another run is refused."""
    import sys

    d, _ = lr5_run
    run = mpviz.load_run(d)
    diag, policy = mpviz.diagnose(run), mpviz.advise(run)

    def no(*_):
        raise AssertionError("diagnosed again")

    monkeypatch.setattr(sys.modules["mpviz.diagnosis.advise"], "diagnose", no)
    given = mpviz.advise(run, diagnosis=diag)
    assert given.rules == policy.rules == {"*": "fp16", "fc3": "fp32"}
    assert given.reasons == policy.reasons and given.estimate == policy.estimate
    train(small_model(), steps=2, run_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="diagnosis is of"):
        mpviz.advise(tmp_path / "other", diagnosis=diag)
    run.close()


# ------------------------------------------------------------------ lost updates (bf16 weights)
def test_lost_updates_match_a_hand_computation(tmp_path):
    """model.to(bfloat16), plain SGD: an element's update is lost when bf16(p - lr*g), computed
    in float64 here, rounds back to p. Recorded on statistics steps (every 2)."""
    def run(run_dir=None):
        model = small_model().to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=2e-3)
        rec = mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=2).attach() if run_dir else None
        expect: dict[int, dict[str, float]] = {}
        for i in range(6):
            loss = F.cross_entropy(model(X[i].bfloat16()).float(), Y[i])
            loss.backward()
            if i % 2 == 0:
                expect[i] = {}
                for name in ("fc1", "fc2", "head"):
                    lost = eligible = 0
                    for p in getattr(model, name).parameters():
                        p64, g64 = p.detach().double(), p.grad.double()
                        new = (p64 - 2e-3 * g64).to(torch.bfloat16)
                        nz = g64 != 0
                        lost += int((nz & (new == p.detach())).sum())
                        eligible += int(nz.sum())
                    expect[i][name] = lost / eligible
            opt.step()
            opt.zero_grad()
            if rec:
                rec.step(loss=loss)
        if rec:
            rec.close()
        return model, expect

    plain, _ = run()
    model, expect = run(tmp_path / "bf16")
    for a, b in zip(plain.parameters(), model.parameters()):  # recording changed nothing
        assert torch.equal(a, b)
    lu = mpviz.load_run(tmp_path / "bf16").lost_updates()
    assert sorted(lu["step"].unique()) == [0, 2, 4]
    for st, per in expect.items():
        for name, frac in per.items():
            got = lu[(lu.step == st) & (lu.layer == name)]["lost_frac"].iloc[0]
            assert got == pytest.approx(frac, abs=2e-3), (st, name)
    assert max(f for per in expect.values() for f in per.values()) > 0.5
    diag = mpviz.diagnose(tmp_path / "bf16")
    found = diag.by_kind("lost_updates")
    assert found and found[0].severity in ("warning", "error")
    assert set(found[0].layers) == {n for n in ("fc1", "fc2", "head")
                                    if np.median([expect[s][n] for s in expect]) >= 0.25}


# ------------------------------------------------------------------ fp32 shadow
def shadow_model() -> nn.Module:
    torch.manual_seed(0)
    m = small_model()
    m.add_module("block", nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)))
    return m


def test_shadow_error_zero_for_fp32_layers_positive_for_low_precision(tmp_path):
    """Reference: on shadow steps the test's own hooks keep each Linear's input, weights, output
    and the upstream gradient of its output, and its weight gradients of that backward; rerun
    in float64 here, the relative error ||y - ref|| / ||ref|| and the SQNR 10 log10(||ref||^2 /
    ||y - ref||^2), of the output and of the weight gradients (weight and bias together), match
    the recorded ones."""
    policy = mpviz.PrecisionPolicy({"*": "fp16", "fc1": "fp32", "block": "fp32", "head": "bf16"})
    kept: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    step = [0]

    def keep(name):
        def hook(m, args, out):
            if step[0] % 3 == 0:  # a shadow step (shadow_every=3)
                k = kept[(step[0], name)] = {"x": args[0], "w": m.weight, "b": m.bias, "y": out}
                k.update({n: t.detach().double() for n, t in k.items()})  # copies
                out.register_hook(lambda g: k.__setitem__("g", g.double()))
        return hook

    def run(run_dir=None):
        model = shadow_model()
        if run_dir:
            for name in ("fc1", "fc2", "head"):
                getattr(model, name).register_forward_hook(keep(name))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sc = torch.amp.GradScaler("cpu")
        rec = (mpviz.Recorder(model, optimizer=opt, scaler=sc, run_dir=run_dir, every=5,
                              policy=policy, shadow=["fc*", "head", "block"], shadow_every=3).attach()
               if run_dir else mpviz.apply_policy(model, policy))
        torch.manual_seed(1)
        for i in range(7):
            step[0] = i
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(X[i]).float()[:, :4], Y[i])
            sc.scale(loss).backward()
            for (st, name), k in kept.items():
                if st == i:  # this backward's (scaled) weight gradients, as the upstream one is
                    mod = getattr(model, name)
                    k["gw"], k["gb"] = mod.weight.grad.double(), mod.bias.grad.double()
            sc.step(opt)
            sc.update()
            opt.zero_grad()
            if run_dir:
                rec.step(loss=loss)
        rec.close() if run_dir else rec.remove()
        return model

    plain = run()
    model = run(tmp_path / "s")
    for a, b in zip(plain.parameters(), model.parameters()):  # bit-identical, dropout included
        assert torch.equal(a, b)
    run_ = mpviz.load_run(tmp_path / "s")
    assert not run_.meta.get("recorder_errors")
    sh = run_.shadow()
    assert sorted(sh["step"].unique()) == [0, 3, 6]
    err = sh.groupby("layer")["rel_err"].max()
    assert err["fc1"] == 0 and err["block"] == 0  # fp32 layers (block with its dropout mask)
    assert 1e-5 < err["fc2"] < 1e-2      # fp16: ~2^-11 relative rounding
    assert err["fc2"] < err["head"] < 5e-2  # bf16: ~2^-8
    assert (sh[sh.layer == "fc1"]["sqnr_db"] == np.inf).all()
    # the recorded errors against the test's own float64 reruns
    assert sorted(kept) == [(s, n) for s in (0, 3, 6) for n in ("fc1", "fc2", "head")]
    for (st, name), k in kept.items():
        row = sh[(sh.step == st) & (sh.layer == name)].iloc[0]
        ref = k["x"] @ k["w"].T + k["b"]
        grads = [(k["gw"], k["g"].T @ k["x"]), (k["gb"], k["g"].sum(0))]
        for got, want, rel, sqnr in [([k["y"]], [ref], row.rel_err, row.sqnr_db),
                                     ([a for a, _ in grads], [b for _, b in grads],
                                      row.grad_rel_err, row.grad_sqnr_db)]:
            err2 = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, want))
            ref2 = sum(float((b ** 2).sum()) for b in want)
            if name == "fc1":  # fp32: exactly 0 against the fp32 rerun; fp32 rounding here
                assert rel == 0 and math.sqrt(err2 / ref2) < 1e-6
            else:
                assert rel == pytest.approx(math.sqrt(err2 / ref2), rel=1e-4), (st, name)
                assert sqnr == pytest.approx(10 * math.log10(ref2 / err2), abs=1e-3), (st, name)
    # backward: weight gradients from the same upstream gradient, against the fp32 copy's
    gerr = sh.groupby("layer")["grad_rel_err"].max()
    assert gerr["fc1"] == 0 and gerr["block"] == 0
    assert 1e-5 < gerr["fc2"] < 5e-2 and 1e-4 < gerr["head"] < 1e-1
    # advise keeps the layers whose shadow error is over the threshold (bf16 head: ~2^-9)
    assert mpviz.advise(run_, shadow_threshold=1e-3).rules == {"*": "fp16", "head": "fp32"}
    with pytest.raises(ValueError, match="close matches: 'fc1'"):
        mpviz.Recorder(shadow_model(), run_dir=tmp_path / "bad", shadow=["fc11"]).attach()


# ------------------------------------------------------------------ the explained scale timeline
def test_backoffs_annotated_with_the_layers_whose_gradients_overflowed(tmp_path):
    """GradScaler(init_scale=2^40): its warm-up backs off until the scaled gradients fit fp16.
    Reference: the test's own look at the scaled .grad of each layer before scaler.step."""
    bad: dict[int, set[str]] = {}

    def watch(model, i):
        for name in ("fc1", "fc2", "head"):
            if not all(torch.isfinite(p.grad).all() for p in getattr(model, name).parameters()):
                bad.setdefault(i, set()).add(name)

    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    with mpviz.Recorder(model, optimizer=opt, scaler=sc, run_dir=tmp_path / "r", every=5) as rec:
        for i in range(30):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(X[i]).float(), Y[i])
            sc.scale(loss).backward()
            watch(model, i)
            sc.step(opt)
            sc.update()
            opt.zero_grad()
            rec.step(loss=loss)
    diag = mpviz.diagnose(tmp_path / "r")
    back = diag.timeline[diag.timeline["event"] == "backoff"]
    assert back["step"].tolist() == sorted(bad) and len(bad) >= 3
    for st, layers in zip(back["step"], back["layers"]):
        assert set(layers) == bad[st] and set(back["cause"]) == {"gradient_overflow"}
    f = diag.by_kind("gradient_overflow")[0]
    assert f.severity == "info" and f.steps == (min(bad), max(bad))  # the warm-up: expected
    assert diag.ok
    settled = mpviz.load_run(tmp_path / "r").steps["loss_scale"].iloc[len(bad)]
    assert diag.scale_advice["init_scale"] == settled  # start where the warm-up ended
    assert "init_scale" in str(diag)


def test_runs_recorded_before_the_diagnostics_table_still_diagnose(lr5_run, tmp_path):
    import shutil
    import sqlite3

    d, _ = lr5_run
    old = tmp_path / "old"
    shutil.copytree(d, old)
    con = sqlite3.connect(old / "run.db")
    con.execute("DROP TABLE diagnostics")
    con.commit()
    con.close()
    run = mpviz.load_run(old)
    assert run.diagnostics.empty and run.lost_updates().empty and run.shadow().empty
    assert [f.kind for f in mpviz.diagnose(run).findings] == [f.kind for f in mpviz.diagnose(d).findings]


def test_a_failing_shadow_is_contained(tmp_path):
    """A layer that cannot be copied (it keeps a non-leaf tensor, which deepcopy refuses): the
    shadow stops with one warning and a recorder error; training goes on and the rest is recorded."""
    model = small_model()
    model.fc2.cache = model.fc1.weight * 2  # non-leaf: copy.deepcopy raises
    with pytest.warns(RuntimeWarning, match="'shadow' stopped"):
        losses = train(model, run_dir=tmp_path / "r", steps=4, shadow=["fc2"], shadow_every=1)
    run = mpviz.load_run(tmp_path / "r")
    assert [e["part"] for e in run.meta["recorder_errors"]] == ["shadow"]
    assert len(run.steps) == 4 and all(math.isfinite(l) for l in losses) and run.shadow().empty
