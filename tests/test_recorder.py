"""The recorder's promises, each checked against an independent reference on real training steps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mpviz
from helpers.training import optimizer_step
from mpviz.stats import SAMPLE_CAP

F = nn.functional


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return x, y



class Net(nn.Module):
    """A small real classifier for the digits, with named layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(self.norm(self.act(self.fc1(x))))))


def batches(x, y, n, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        yield x[idx], y[idx]


# Not record_demo: the user's own AMP loop, on this file's models, with a hook after unscale_.
def train(model, data, rec, opt, scaler=None, dtype=None, on_grads=None):
    """A plain AMP loop with the recorder's one added line; ``on_grads`` sees unscaled grads."""
    losses = []
    for x, y in data:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if on_grads:
                on_grads()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if on_grads:
                on_grads()
            opt.step()
        opt.zero_grad()
        rec.step(loss=loss, samples=len(x))
        losses.append(loss.item())
    return losses


def test_steps_loss_and_learning(digits, tmp_path):
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=5) as rec:
        losses = train(model, batches(*digits, 40), rec, opt)
    run = mpviz.load_run(tmp_path / "r")
    steps = run.steps
    assert list(steps["step"]) == list(range(40))
    assert steps["loss"].tolist() == pytest.approx(losses, rel=1e-6)
    assert steps["loss"].iloc[-5:].mean() < 0.6 * steps["loss"].iloc[:5].mean()  # it learned
    assert (steps["samples"] == 64).all() and (steps["step_time_s"] > 0).all()
    assert steps["samples_per_s"].tolist() == pytest.approx((64 / steps["step_time_s"]).tolist())
    assert not steps["skipped"].any()
    # per-layer statistics only every 5th step; everything else every step
    assert sorted(run.layer_stats["step"].unique()) == list(range(0, 40, 5))
    layers = run.layers.set_index("layer")
    assert layers.loc["fc1", "n_params"] == 64 * 64 + 64
    assert layers.loc["head", "type"] == "Linear" and layers.loc["head", "param_dtype"] == "float32"
    meta = run.meta
    assert meta["status"] == "finished" and meta["model"] == "Net" and meta["every"] == 5
    assert meta["torch_version"] == torch.__version__ and meta["autocast_dtype"] is None


def test_grad_stats_are_unscaled_and_match_reference(digits, tmp_path):
    """fp16 + GradScaler: recorded gradient norms are of the unscaled gradient."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref = []

    def grab():  # after unscale_: the true gradients, computed by hand
        ref.append({n: (p.grad.norm().item(), p.grad.abs().max().item())
                    for n, p in model.named_parameters()})

    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r", every=1) as rec:
        train(model, batches(*digits, 4), rec, opt, scaler, torch.float16, on_grads=grab)
    stats = mpviz.load_run(tmp_path / "r").layer_stats
    grads = stats[stats.tensor == "grad"]
    assert len(grads) == 4 * 4  # four layers with parameters, every step
    for step, r in enumerate(ref):
        for layer in ("fc1", "norm", "fc2", "head"):
            row = grads[(grads.step == step) & (grads.layer == layer)].iloc[0]
            want = math.sqrt(r[f"{layer}.weight"][0] ** 2 + r[f"{layer}.bias"][0] ** 2)
            assert row["norm"] == pytest.approx(want, rel=1e-4)
            assert row["max_abs"] == pytest.approx(max(r[f"{layer}.weight"][1],
                                                       r[f"{layer}.bias"][1]), rel=1e-5)
            assert row["dtype"] == "float32"
    # the scaled gradient would be 4096x larger: make sure that is not what we have
    assert grads["norm"].max() < 100


def test_fused_optimizer_keeps_grads_scaled_but_stats_are_unscaled(digits, tmp_path):
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref = []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r", every=1) as rec:
        for x, y in batches(*digits, 3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            ref.append(model.head.weight.grad.norm().item() / scale)
            ref[-1] = math.hypot(ref[-1], model.head.bias.grad.norm().item() / scale)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    g = mpviz.load_run(tmp_path / "r").layer_stats
    got = g[(g.tensor == "grad") & (g.layer == "head")].sort_values("step")["norm"].tolist()
    assert got == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_recorded_dtypes_are_what_ran(digits, tmp_path, dtype):
    model = Net()
    seen = {}
    mine = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0].dtype, o.dtype)))
            for n, m in model.named_modules()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r") as rec:
        train(model, batches(*digits, 2), rec, opt, None, dtype)
    for h in mine:
        h.remove()
    dmap = mpviz.load_run(tmp_path / "r").dtype_map()
    for name, (i_dt, o_dt) in seen.items():
        assert dmap.loc[name, "input"] == str(i_dt).replace("torch.", "")
        assert dmap.loc[name, "output"] == str(o_dt).replace("torch.", "")
    low = str(dtype or torch.float32).replace("torch.", "")
    assert dmap.loc["fc1", "output"] == low  # a Linear under autocast runs in the low dtype
    assert dmap.loc["fc1", "weight"] == "float32" and dmap.loc["fc1", "grad"] == "float32"


class Boom(nn.Module):
    """A named layer whose output we can push past fp16's max on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.gain = 1.0

    def forward(self, x):
        return self.lin(x) * self.gain


class BoomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.boom = Boom()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(F.relu(self.boom(F.relu(self.fc1(x)))))


def test_forward_overflow_names_the_layer_and_the_step_is_skipped(digits, tmp_path):
    torch.manual_seed(0)
    model = BoomNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r") as rec:
        for step, (x, y) in enumerate(batches(*digits, 6)):
            model.boom.gain = 1e6 if step == 3 else 1.0
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    run = mpviz.load_run(tmp_path / "r")
    steps = run.steps.set_index("step")
    assert steps["skipped"].tolist() == [False, False, False, True, False, False]
    assert steps.loc[3, "loss_scale_after"] == steps.loc[3, "loss_scale"] / 2
    ov = run.overflows
    assert set(ov["step"]) == {3}
    fwd = ov[ov.phase == "forward"]
    first = fwd[fwd["first"]]
    assert first["layer"].tolist() == ["boom"] and first["skipped"].all()
    assert "fc1" not in set(fwd["layer"]) and "boom.lin" not in set(fwd["layer"])


def test_backward_overflow_names_first_layer_in_backward_order(digits, tmp_path):
    """A huge loss scale overflows fp16 gradients; compare with a hand check of every grad."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    bad_by_step = []

    def check():  # independent: which layers have non-finite gradients (inf survives unscale)
        bad_by_step.append({n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                            if not torch.isfinite(p.grad).all()})

    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r") as rec:
        train(model, batches(*digits, 6), rec, opt, scaler, torch.float16, on_grads=check)
    run = mpviz.load_run(tmp_path / "r")
    steps = run.steps
    skipped = steps[steps.skipped]["step"].tolist()
    assert skipped == [s for s, b in enumerate(bad_by_step) if b] and skipped
    ov = run.overflows
    for s in skipped:
        back = ov[(ov.step == s) & (ov.phase == "backward")]
        assert set(back["layer"]) == bad_by_step[s]
        assert back[back["first"]]["layer"].tolist() == ["head"]  # last in forward = first back
    # the scale backs off at every skipped step
    used, after = steps["loss_scale"].tolist(), steps["loss_scale_after"].tolist()
    assert used[0] == 2.0**40 and after[0] == 2.0**39


def test_loss_scale_history_matches_the_scaler(digits, tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
    used, after = [], []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r") as rec:
        for step, (x, y) in enumerate(batches(*digits, 12)):
            if step == 7:
                x = x.clone()
                x[0, 0] = float("inf")  # backoff
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            used.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            after.append(scaler.get_scale())
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    steps = mpviz.load_run(tmp_path / "r").steps
    assert steps["loss_scale"].tolist() == used
    assert steps["loss_scale_after"].tolist() == after
    assert max(after) > used[0] and min(after[7:]) < max(after)  # growth and backoff both seen
    assert steps["skipped"].tolist() == [a < u for u, a in zip(used, after)]


def test_model_is_exactly_restored_after_normal_exit_and_exception(digits, tmp_path):
    model = Net()
    x = digits[0][:16]
    before = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ZeroDivisionError):
        with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "a") as rec:
            train(model, batches(*digits, 2), rec, opt)
            1 / 0
    assert torch.equal(model(x), before)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    run = mpviz.load_run(tmp_path / "a")
    assert run.meta["status"] == "failed" and "ZeroDivisionError" in run.meta["error"]
    assert run.last_step == 1  # what was recorded before the error is kept


def test_activation_stats_match_reference(digits, tmp_path):
    model = Net()
    outs = {}
    h = model.fc2.register_forward_hook(lambda m, a, o: outs.__setitem__("fc2", o.detach().float()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        train(model, batches(*digits, 1), rec, opt, None, torch.bfloat16)
    h.remove()
    st = mpviz.load_run(tmp_path / "r").layer_stats
    row = st[(st.layer == "fc2") & (st.tensor == "activation")].iloc[0]
    o = outs["fc2"]
    assert row["dtype"] == "bfloat16"
    assert row["norm"] == pytest.approx(o.norm().item(), rel=1e-5)
    assert row["max_abs"] == pytest.approx(o.abs().max().item())
    assert row["zero_frac"] == pytest.approx((o == 0).float().mean().item())
    assert row["numel"] == o.numel() and row["nonfinite"] == 0


def test_live_run_reads_while_training(digits, tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r") as rec:
        train(model, batches(*digits, 3), rec, opt)
        assert rec.run.last_step == 2 and rec.run.is_live
        train(model, batches(*digits, 2), rec, opt)
        assert len(rec.run.steps_since(2)) == 2


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="every must be >= 1"):
        mpviz.Recorder(Net(), every=0)
    with pytest.raises(TypeError, match="nn.Module"):
        mpviz.Recorder("not a model")
    rec = mpviz.Recorder(Net(), run_dir=tmp_path / "r")
    with pytest.raises(RuntimeError, match="with rec:"):
        rec.step(loss=1.0)
    with rec:
        pass
    with pytest.raises(mpviz.RunStoreError, match="already holds a run"):
        mpviz.Recorder(Net(), run_dir=tmp_path / "r").attach()


def test_log2_histogram_matches_frexp_reference(digits, tmp_path):
    model = Net()
    outs = {}
    h = model.fc1.register_forward_hook(lambda m, a, o: outs.__setitem__("fc1", o.detach().float()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        # 16 x 64 outputs: within SAMPLE_CAP, so every element is counted (no sampling)
        train(model, batches(*digits, 1, bs=16), rec, opt, None, torch.float16)
    h.remove()
    assert outs["fc1"].numel() <= SAMPLE_CAP
    hist = mpviz.load_run(tmp_path / "r").histogram("fc1", "activation", step=0)
    o = outs["fc1"].abs().flatten()
    nz = o[o > 0]
    _, exp = torch.frexp(nz)  # nz = m * 2**exp with 0.5 <= m < 1, so 2**(exp-1) <= nz < 2**exp
    want = {(2.0 ** (e - 1), 2.0 ** e): c
            for e, c in zip(*(v.tolist() for v in torch.unique(exp, return_counts=True)))}
    got = {(r.lo, r.hi): int(r.count) for r in hist.itertuples() if r.hi > 0}
    assert got == want
    zeros = hist[(hist.lo == 0) & (hist.hi == 0)]["count"].sum()
    assert zeros == int((o == 0).sum())


def test_reading_runs_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys, mpviz; mpviz.load_run; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_accepts_a_python_float_loss_or_none(tmp_path):
    model = Net()
    with mpviz.Recorder(model, run_dir=tmp_path / "r", every=1) as rec:
        rec.step(loss=0.5, samples=3)
        rec.step()
    steps = mpviz.load_run(tmp_path / "r").steps
    assert steps["loss"].iloc[0] == 0.5 and steps["loss"].isna().iloc[1]


def test_policy_changes_are_recorded_at_the_step_they_take_effect(digits, tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    policy = mpviz.PrecisionPolicy({"*": "fp16", "norm": "fp32"})
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r",
                        policy=policy) as rec:
        for step, (x, y) in enumerate(batches(*digits, 6)):
            if step == 3:
                rec.set_precision({"head": "bf16"})  # takes effect at the next forward
            loss = F.cross_entropy(model(x), y)  # no outer autocast: the policy decides
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    for m in model.modules():  # the policy went with the recorder
        assert not m._forward_hooks and not m._forward_pre_hooks
    run = mpviz.load_run(tmp_path / "r")
    pc = run.policy_changes
    initial = pc[pc.step == 0].set_index("layer")
    assert initial.loc["", "precision"] == "fp16" and initial.loc["norm", "precision"] == "fp32"
    later = pc[pc.step > 0]
    assert later[["step", "layer", "precision"]].values.tolist() == [[3, "head", "bf16"]]
    d = run.dtypes
    head_out = d[(d.layer == "head") & (d.tensor == "output")][["step", "dtype"]].values.tolist()
    assert head_out == [[0, "float16"], [3, "bfloat16"]]
    norm_out = d[(d.layer == "norm") & (d.tensor == "output")]["dtype"].tolist()
    assert norm_out == ["float32"]


class SqrtNet(nn.Module):
    """sqrt(z**2) at z == 0: a finite forward, but inf * 0 = NaN in the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        self.register_buffer("gate", (torch.arange(32) % 2).float())

    def forward(self, x):
        return self.head(torch.sqrt((self.fc1(x) * self.gate) ** 2))


def test_nan_gradients_with_a_finite_loss_are_found_without_a_scaler(digits, tmp_path):
    torch.manual_seed(0)
    model = SqrtNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: every step is bad
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=100) as rec:
        x, y = next(batches(*digits, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        bad = {n.rsplit(".", 1)[0] for n, p in model.named_parameters()
               if not torch.isfinite(p.grad).all()}
        opt.step()
        opt.zero_grad()
        rec.step(loss=loss, samples=len(x))
    assert torch.isfinite(loss) and bad == {"fc1"}  # the reference, by hand
    run = mpviz.load_run(tmp_path / "r")
    steps = run.steps
    assert steps["nonfinite_grads"].tolist() == [True] and steps["skipped"].tolist() == [False]
    ov = run.overflows
    assert ov[["layer", "phase", "first"]].values.tolist() == [["fc1", "backward", True]]


def test_dtype_change_from_autocast_is_seen_between_statistics_steps(digits, tmp_path):
    """Per-layer hooks are off between statistics steps; an autocast change must still show."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    mine = model.fc1.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=100) as rec:
        for step, (x, y) in enumerate(batches(*digits, 6)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step >= 3):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
        # between changes the per-module hooks are gone again
        assert not any(m._forward_hooks for m in model.modules() if m is not model
                       and m is not model.fc1)
    mine.remove()
    d = mpviz.load_run(tmp_path / "r").dtypes
    fc1 = d[(d.layer == "fc1") & (d.tensor == "output")][["step", "dtype"]].values.tolist()
    assert fc1 == [[0, "float32"], [3, "bfloat16"]]
    assert [str(t).replace("torch.", "") for t in seen] == ["float32"] * 3 + ["bfloat16"] * 3


def test_the_models_output_that_is_its_last_childs_tensor_is_not_repeated(digits, tmp_path):
    """The model's own output is its head's very tensor: recorded once, under the head (a row
    for the model would only repeat it, and messages would blame the model)."""
    model = Net()
    heads = []  # the head's outputs, by our own hook
    h = model.head.register_forward_hook(lambda m, a, o: heads.append(o.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        train(model, batches(*digits, 2), rec, opt)
    h.remove()
    run = mpviz.load_run(tmp_path / "r")
    st = run.layer_stats
    act = st[st.tensor == "activation"].set_index(["step", "layer"])
    for step in (0, 1):
        assert (step, "") not in act.index
        ref = heads[step].double()
        assert act.loc[(step, "head"), "norm"] == pytest.approx(float(ref.norm()), rel=1e-6)
        assert act.loc[(step, "head"), "max_abs"] == pytest.approx(float(ref.abs().max()), rel=1e-6)
    assert act.loc[(0, "fc1"), "norm"] != act.loc[(0, "head"), "norm"]


def test_an_output_changed_in_place_later_is_measured_as_the_module_returned_it(digits, tmp_path):
    """ReLU(inplace=True) after a Linear (as in torchvision's ResNets) rewrites the Linear's
    output: its statistics must be of what the Linear returned, not of the ReLU's result."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))
    before = []  # the Linear's output as it returned it, copied by hand
    h = model[0].register_forward_hook(lambda m, a, o: before.append(o.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        train(model, batches(*digits, 3), rec, opt)
    h.remove()
    st = mpviz.load_run(tmp_path / "r").layer_stats
    fc = st[(st.layer == "0") & (st.tensor == "activation")].set_index("step")
    # step 0 shows the in-place change (no row rather than a wrong one); later steps copy it
    assert 0 not in fc.index and list(fc.index) == [1, 2]
    for step in (1, 2):
        o = before[step]
        assert (o < 0).any()  # the ReLU would have zeroed these
        assert fc.loc[step, "norm"] == pytest.approx(o.norm().item(), rel=1e-5)
        assert fc.loc[step, "zero_frac"] == pytest.approx((o == 0).float().mean().item())
        assert fc.loc[step, "min_abs_nonzero"] == pytest.approx(o.abs()[o != 0].min().item())


def test_the_accelerator_path_records_what_the_cpu_path_records(digits, tmp_path):
    """On a GPU, statistics are device kernels and one host copy per step; here the same code
    runs on CPU tensors and must give the CPU path's numbers (fp16 + GradScaler, unscaled)."""
    runs = {}
    for on_host in (True, False):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / str(on_host),
                             every=2)
        with rec:
            rec._grads.on_host = on_host
            train(model, batches(*digits, 4), rec, opt, scaler, torch.float16)
        runs[on_host] = mpviz.load_run(tmp_path / str(on_host))
    host, device = runs[True], runs[False]
    cols = ["step", "loss", "loss_scale", "loss_scale_after", "skipped"]
    assert host.steps[cols].values.tolist() == device.steps[cols].values.tolist()
    a = host.layer_stats.sort_values(["step", "layer", "tensor"]).reset_index(drop=True)
    b = device.layer_stats.sort_values(["step", "layer", "tensor"]).reset_index(drop=True)
    assert len(a) == len(b) > 0 and sorted(set(a.step)) == [0, 2]
    assert a[["step", "layer", "tensor", "dtype"]].equals(b[["step", "layer", "tensor", "dtype"]])
    for c in ("norm", "max_abs", "min_abs_nonzero", "zero_frac", "underflow_fp16", "numel"):
        np.testing.assert_allclose(a[c], b[c], rtol=1e-5, err_msg=c)


def test_an_optimizer_step_with_a_closure_records_the_closures_gradients(digits, tmp_path):
    """LBFGS computes the gradients inside step(closure): they are read after it."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    x, y = next(batches(*digits, 1))
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(math.hypot(model.head.weight.grad.norm().item(),
                               model.head.bias.grad.norm().item()))
        return loss

    last = []  # the gradient norm of each step's last closure call
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        for _ in range(2):
            loss = opt.step(closure)
            last.append(seen[-1])
            rec.step(loss=loss, samples=len(x))
    st = mpviz.load_run(tmp_path / "r").layer_stats
    head = st[(st.layer == "head") & (st.tensor == "grad")].sort_values("step")
    assert len(seen) > 2 and head["norm"].tolist() == pytest.approx(last, rel=1e-5)


def test_steps_after_a_bad_step_are_clean_again_without_a_scaler(digits, tmp_path):
    """The inf/nan flag of one step does not leak into the next ones."""
    import copy

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    good = copy.deepcopy(model.state_dict())
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=100) as rec:
        for step, (x, y) in enumerate(batches(*digits, 3)):
            loss = F.cross_entropy(model(x) * (float("nan") if step == 0 else 1.0), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 0:
                model.load_state_dict(good)  # undo the non-finite update
            rec.step(loss=loss, samples=len(x))
    assert mpviz.load_run(tmp_path / "r").steps["nonfinite_grads"].tolist() == [True, False, False]


def test_a_forward_after_the_backward_leaves_the_steps_statistics_as_they_were(digits, tmp_path):
    """A loop that runs the model again with grad on after backward (a metric, an evaluation
    without no_grad) on a statistics step: the step keeps the statistics of its backward."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grad_norms = []  # the head's gradient norm of each step, by hand
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        for x, y in batches(*digits, 3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grad_norms.append(math.hypot(model.head.weight.grad.norm().item(),
                                         model.head.bias.grad.norm().item()))
            opt.step()
            opt.zero_grad()
            model(x)  # with grad on, after the backward
            rec.step(loss=loss, samples=len(x))
    run = mpviz.load_run(tmp_path / "r")
    assert "recorder_errors" not in run.meta
    st = run.layer_stats
    head = st[(st.layer == "head") & (st.tensor == "grad")].sort_values("step")
    assert head["step"].tolist() == [0, 1, 2]
    assert head["norm"].tolist() == pytest.approx(grad_norms, rel=1e-5)


class Wrapper(nn.Module):
    """Holds the network as a child, as a LightningModule or a GAN's container does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()


def test_a_loop_that_calls_a_child_module_is_recorded_like_one_that_calls_the_model(digits, tmp_path):
    """The loop calls ``model.net(x)``, never the model itself: per-layer dtypes and activations
    are recorded as our own hooks saw them, from the first step, under bf16 autocast."""
    torch.manual_seed(0)
    model = Wrapper()
    seen: list[dict[str, tuple[str, float]]] = []

    def hook(name):
        def h(m, a, out):
            seen[-1][name] = (str(out.dtype).replace("torch.", ""), float(out.detach().abs().max()))
        return h

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1) as rec:
        for x, y in batches(*digits, 3):
            seen.append({})
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model.net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
    for h in handles:
        h.remove()
    run = mpviz.load_run(tmp_path / "r")
    assert run.meta["autocast_dtype"] == "bfloat16"
    d = run.dtypes[run.dtypes.tensor == "output"].groupby("layer")["dtype"].last().to_dict()
    assert d == {name: v[0] for name, v in seen[-1].items()}
    assert d["net.fc1"] == d["net.head"] == "bfloat16"
    acts = run.layer_stats[run.layer_stats.tensor == "activation"]
    for step, ref in enumerate(seen):
        got = acts[acts.step == step].set_index("layer")["max_abs"].to_dict()
        assert got == pytest.approx({n: v[1] for n, v in ref.items()}, rel=1e-6)


def test_gradients_are_recorded_before_the_loops_clipping(digits, tmp_path):
    """The recorded gradient is the one backward produced: the total norm clip_grad_norm_
    returns (before it clips), with or without a GradScaler (unscaled either way)."""
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        totals = []
        run_dir = tmp_path / ("fp16" if scaler else "bf16")
        dtype = torch.float16 if scaler else torch.bfloat16
        with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=run_dir, every=1) as rec:
            for x, y in batches(*digits, 4):
                with torch.autocast("cpu", dtype=dtype):
                    loss = F.cross_entropy(model(x), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)))
                optimizer_step(opt, scaler)
                rec.step(loss=loss)
        g = mpviz.load_run(run_dir).layer_stats.query("tensor == 'grad'")
        recorded = g.groupby("step")["norm"].apply(lambda n: float(np.sqrt((n ** 2).sum())))
        assert min(totals) > 0.1  # clipping to 0.01 changed every step's gradients
        assert recorded.tolist() == pytest.approx(totals, rel=1e-5)


def test_a_loss_scale_that_reached_zero_loses_no_step(digits, tmp_path):
    """A GradScaler whose scale collapsed to 0 backs off to 0 again at every skipped step:
    every step the loop makes is recorded, skipped or not (as the optimizer's own step hook
    tells), with its scale. (With a scale of 0 the gradients unscale to nan, which GradScaler
    does not see: that step is taken, the weights go nan, and later steps are skipped.)"""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, backoff_factor=0.0)
    stepped: list[int] = []
    h = opt.register_step_post_hook(lambda *a: stepped.append(1))
    skipped = []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r") as rec:
        for step, (x, y) in enumerate(batches(*digits, 12)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y) * (1e9 if step == 2 else 1.0)
            scaler.scale(loss).backward()
            n = len(stepped)
            scaler.step(opt)
            scaler.update()
            skipped.append(len(stepped) == n)
            opt.zero_grad()
            rec.step(loss=loss)
    h.remove()
    assert scaler.get_scale() == 0.0 and sum(skipped) >= 8
    steps = mpviz.load_run(tmp_path / "r").steps
    assert steps["step"].tolist() == list(range(12))
    assert steps["skipped"].tolist() == skipped
    assert steps["loss_scale"].tolist()[3:] == [0.0] * 9
