"""mpviz only observes: the recipes and models that used to crash the recorder or change the
training it watched (issue 8), each on real training steps."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import mpviz
from helpers.hooks import hooks_of

F = nn.functional


def state_of(model, opt=None, scaler=None) -> dict[str, torch.Tensor]:
    """Every tensor training leaves behind: parameters, buffers, optimizer and scaler state."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    if opt is not None:
        for pid, st in opt.state_dict()["state"].items():
            out.update({f"opt.{pid}.{k}": torch.as_tensor(v) for k, v in st.items()})
    if scaler is not None:
        out.update({f"scaler.{k}": torch.as_tensor(v) for k, v in scaler.state_dict().items()})
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        same = torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                     and torch.equal(x.nan_to_num(), y.nan_to_num()))
        assert same, f"{k} differs"


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.fc(x))))


def layer_grad_norm(layer: nn.Module) -> float:
    """The norm of a layer's gradients, weight and bias together (float64): what a layer's
    gradient norm covers. Call it once GradScaler has unscaled them."""
    return sum(p.grad.double().pow(2).sum().item() for p in layer.parameters()) ** 0.5


def data(n, seed=0, bs=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 8, generator=g), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


# Not record_demo: a BatchNorm model whose head overflows once, with and without mpviz.
def train_bn(record: bool, tmp_path, blow_up_at: int = 1, **rec_kw):
    """fp16 + GradScaler; at ``blow_up_at`` the head's weights are huge for one step, so its
    fp16 output overflows: a skipped step whose forward mpviz replays."""
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r", every=1,
                         **rec_kw) if record else None
    if rec:
        rec.attach()
    for i, (x, y) in enumerate(data(4)):
        saved = model.head.weight.detach().clone()
        if i == blow_up_at:
            with torch.no_grad():
                model.head.weight.mul_(1e6)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if rec:
            rec.step(loss=loss, samples=len(x))
        if i == blow_up_at:
            with torch.no_grad():
                model.head.weight.copy_(saved)
    if rec:
        rec.close()
    return model, opt, scaler


def test_a_replayed_overflow_step_leaves_batchnorm_buffers_as_without_mpviz(tmp_path):
    plain = state_of(*train_bn(False, tmp_path))
    recorded = state_of(*train_bn(True, tmp_path))
    assert_identical(plain, recorded)
    run = mpviz.load_run(tmp_path / "r")
    assert run.steps["skipped"].tolist() == [False, True, False, False]
    fwd = run.overflows[(run.overflows.phase == "forward") & run.overflows["first"].astype(bool)]
    assert fwd["layer"].tolist() == ["head"] and fwd["step"].tolist() == [1]


def test_pytorchs_amp_off_recipe_records_with_a_disabled_scaler(tmp_path):
    """`GradScaler("cpu", enabled=use_amp)` with use_amp=False used to crash attach()."""
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r", every=1) as rec:
        for x, y in data(3):
            with torch.autocast("cpu", dtype=torch.float16, enabled=False):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    run = mpviz.load_run(tmp_path / "r")
    assert run.meta["scaler"] == {"enabled": False}
    assert run.steps["skipped"].tolist() == [False] * 3 and run.steps["loss_scale"].isna().all()
    assert (run.layer_stats.tensor == "grad").sum() > 0


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: int = 0


class DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return Out(self.fc(x))


def test_a_model_returning_a_dataclass_gets_gradient_stats_and_dtypes(tmp_path):
    torch.manual_seed(0)
    model = DataclassNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    grads = []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r", every=1) as rec:
        for x, y in data(2):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x).logits.float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grads.append(layer_grad_norm(model.fc))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    run = mpviz.load_run(tmp_path / "r")
    g = run.layer_stats[(run.layer_stats.layer == "fc") & (run.layer_stats.tensor == "grad")]
    assert len(g) == 2  # weight and bias merged per layer, one row per step
    assert g.sort_values("step")["norm"].tolist() == pytest.approx(grads, rel=1e-5)
    d = run.dtypes
    assert d[(d.layer == "") & (d.tensor == "output")]["dtype"].tolist() == ["float16"]
    assert d[(d.layer == "fc") & (d.tensor == "grad")]["dtype"].tolist() == ["float32"]


def test_a_refused_recorder_leaves_nothing_behind(tmp_path):
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no.such.layer.*Close matches|not a layer name"):
        mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "a",
                       policy={"no.such.layer": "fp16"}).attach()
    assert hooks_of(model, opt) == (0, 0)
    assert not (tmp_path / "a" / "run.db").exists()  # refused before the store was created


def test_attach_failing_halfway_unwinds_and_marks_the_run_failed(tmp_path, monkeypatch):
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def refuse(*a, **k):
        raise RuntimeError("no more hooks")

    # The second hook the recorder puts on the model fails: the first must come off again.
    monkeypatch.setattr(model, "register_forward_hook", refuse)
    with pytest.raises(RuntimeError, match="no more hooks"):
        mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "b",
                       policy={"*": "bf16"}).attach()
    monkeypatch.undo()
    assert hooks_of(model, opt) == (0, 0)
    meta = mpviz.load_run(tmp_path / "b").meta
    assert meta["status"] == "failed" and "no more hooks" in meta["error"]


def test_close_puts_back_what_attach_changed_on_a_model_compiled_in_place(tmp_path):
    """``model.compile()`` before attach: the recorder wraps its compiled call to see the
    forward from outside, and close puts the original back, with no hook left."""
    model = BNNet()
    model.compile()
    original = model._compiled_call_impl
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r"):
        assert model._compiled_call_impl is not original
    assert model._compiled_call_impl is original
    assert hooks_of(model, opt) == (0, 0)


def test_an_optimizer_that_is_not_one_is_refused():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        mpviz.Recorder(BNNet(), ...)


def test_an_error_inside_mpviz_is_recorded_once_and_training_is_unchanged(tmp_path, monkeypatch):
    """A fault in a hook (statistics of the gradients) and one on the writer thread (rows):
    each is recorded once with one warning, that part stops, training is bit-identical."""
    plain = state_of(*train_bn(False, tmp_path, blow_up_at=-1))

    import mpviz.recording.gradients as gradients
    import mpviz.recording.recorder as recorder

    calls = {"take": 0}

    def broken_take(*a, **k):
        calls["take"] += 1
        raise ZeroDivisionError("injected fault in statistics")

    def broken_rows(items):
        raise KeyError("injected fault on the writer thread")

    monkeypatch.setattr(gradients.HostSample, "take", broken_take)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded = state_of(*train_bn(True, tmp_path, blow_up_at=-1))
    assert_identical(plain, recorded)
    assert calls["take"] == 1  # the part stopped after its first error
    run = mpviz.load_run(tmp_path / "r")
    errors = run.meta["recorder_errors"]
    assert [e["part"] for e in errors] == ["gradients"] and "injected" in errors[0]["error"]
    assert len([w for w in caught if "mpviz: recording" in str(w.message)]) == 1
    assert len(run.steps) == 4 and run.meta["status"] == "finished"

    monkeypatch.undo()
    monkeypatch.setattr(recorder, "stat_rows", broken_rows)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        recorded = state_of(*train_bn(True, tmp_path / "w", blow_up_at=-1))
    assert_identical(plain, recorded)
    run = mpviz.load_run(tmp_path / "w" / "r")
    assert [e["part"] for e in run.meta["recorder_errors"]] == ["statistics"]
    assert len(run.steps) == 4 and run.layer_stats.empty


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fp16+GradScaler"])
def test_gradient_accumulation_records_one_step_per_optimizer_step(tmp_path, scaled):
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)
    losses, accumulated = [], []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r", every=1) as rec:
        for i, (x, y) in enumerate(data(6)):
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaled):
                loss = F.cross_entropy(model(x), y) / 2
            scaler.scale(loss).backward()
            losses.append(loss.item())
            if i % 2 == 1:
                scaler.unscale_(opt)
                accumulated.append(layer_grad_norm(model.head))
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    run = mpviz.load_run(tmp_path / "r")
    st = run.steps
    assert st["step"].tolist() == [0, 1, 2] and st["skipped"].tolist() == [False] * 3
    assert st["samples"].tolist() == [16, 16, 16]
    assert st["loss"].tolist() == pytest.approx(
        [(losses[i] + losses[i + 1]) / 2 for i in (0, 2, 4)], rel=1e-6)
    g = run.layer_stats[(run.layer_stats.layer == "head") & (run.layer_stats.tensor == "grad")]
    # the statistics are those of the accumulated gradient (both micro-batches), weight and bias
    assert g.sort_values("step")["norm"].tolist() == pytest.approx(accumulated, rel=1e-5)
    assert len(g) == 3


def test_a_fused_optimizer_step_that_gradscaler_skipped_is_recorded_as_skipped(tmp_path):
    """GradScaler calls a fused optimizer's step even on inf/nan (the kernel skips the update)."""
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow at first
    scales = []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=tmp_path / "r") as rec:
        for x, y in data(3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale() < before)
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    assert any(scales)
    run = mpviz.load_run(tmp_path / "r")
    assert run.steps["skipped"].tolist() == scales
    assert run.meta["scaler"] == {"enabled": True, "init_scale": 2.0**40, "growth_factor": 2.0,
                                  "backoff_factor": 0.5, "growth_interval": 2000}
