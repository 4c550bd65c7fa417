"""``mpviz.search`` (#21): short probes of each precision policy, their loss against fp32's and
their predicted speed and memory, and the Pareto front.

The model fails fp16 in one layer, ``big``: its weights share a large common value (1e4, spread
300), so its outputs carry a common offset of ~1.6e5, past fp16's largest value, that the
LayerNorm after it takes away. In fp32 ``big`` is exact and the net learns; bf16 rounds the
offset to 8 bits, which buries the part of the signal the LayerNorm keeps (the loss stays well
above fp32's); fp8 cannot hold the weights at all; fp16 overflows on every step. Keeping ``big``
in fp32 and the rest in fp16 (what ``advise`` says) trains like fp32 and is predicted faster on
an H100, for a batch of 16,384 rows priced on the meta device.

References: a plain training loop without mpviz (the fp32 probe's losses, bit for bit),
``predict`` with every layer's precision written out by hand, the probes' own recorded dtypes,
NumPy's fp16 range, the model's parameters and RNG state before and after.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mpviz
from mpviz.cost import count, load_counts, predict
from mpviz.searching import CANDIDATES, _pareto

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F = nn.functional
H, STEPS, LR = 256, 30, 1e-3
FP16_MAX = float(np.finfo(np.float16).max)


def offset_model(hidden: int = H) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        fc1=nn.Linear(16, hidden), act1=nn.ReLU(), fc2=nn.Linear(hidden, hidden), act2=nn.ReLU(),
        fc3=nn.Linear(hidden, hidden), act3=nn.ReLU(), big=nn.Linear(hidden, hidden),
        norm=nn.LayerNorm(hidden), act4=nn.ReLU(), head=nn.Linear(hidden, 4)))
    with torch.no_grad():
        m.big.weight.normal_(1e4, 300.0)
    return m


def make_batches(n: int = 8, rows: int = 64) -> list:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, rows, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return [(x[i], (x[i] @ w).argmax(1)) for i in range(n)]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def priced_batch():
    rows = 16384
    return torch.randn(rows, 16, device="meta"), torch.zeros(rows, dtype=torch.long, device="meta")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    model, batches = offset_model(), make_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    front = mpviz.search(model, batches, loss_fn=loss_fn, steps=STEPS, device="h100", lr=LR,
                         run_root=tmp_path_factory.mktemp("search"), priced_batch=priced_batch())
    return model, batches, front, before, torch.equal(torch.get_rng_state(), rng)


def test_the_advice_is_on_the_front_and_fp16_everywhere_off_it(searched):
    model, batches, front, _, _ = searched
    t = front.table.set_index("policy")
    assert list(t.index) == list(CANDIDATES)
    with torch.no_grad():  # fp16 cannot hold big's output, computed in fp32
        assert float(model[:7](batches[0][0]).abs().max()) > FP16_MAX
    assert math.isnan(t.loc["fp16", "loss"]) and t.loc["fp16", "diverged"]
    assert not t.loc["fp16", "on_front"] and "not finite" in t.loc["fp16", "note"]

    advised = front.policies["advised"]
    assert advised.rules == {"*": "fp16", "big": "fp32"}
    assert "overflowed float16 in the forward" in advised.reasons["big"]
    assert t.loc["advised", "on_front"] and not t.loc["advised", "diverged"]
    assert abs(t.loc["advised", "loss_gap"]) < 0.02      # trains like fp32
    assert t.loc["advised", "speedup"] > 1.2             # and is predicted faster on the H100
    assert t.loc["bf16", "loss_gap"] > 0.1               # why bf16 everywhere does not beat it
    assert t.loc["fp8 linears", "diverged"]              # stuck at chance: ln 4
    assert t.loc["fp8 linears", "loss"] == pytest.approx(math.log(4), abs=0.05)
    # The advice's own estimate (advise(run, device=...) on the fp16 probe) is the row's.
    assert advised.estimate["speedup"] == pytest.approx(t.loc["advised", "speedup"], rel=1e-12)
    assert t.loc["fp32", "loss_gap"] == 0 and t.loc["fp32", "speedup"] == 1
    assert front.notes == [] and "<- front" in repr(front)


def test_speedups_and_memory_are_predict_of_each_policy_by_hand(searched):
    model, _, front, _, _ = searched
    counts = count(model, priced_batch(), forward=loss_fn)
    names = [n for n, _ in model.named_modules()]
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_hand = {
        "fp32": dict.fromkeys(names, "fp32"),
        "bf16": dict.fromkeys(names, "bf16"),
        "fp16": dict.fromkeys(names, "fp16"),
        "advised": {n: "fp32" if n == "big" else "fp16" for n in names},
        "fp8 linears": {n: "fp8" if n in linears else "bf16" for n in names},
    }
    fp32 = predict(counts, by_hand["fp32"], "h100", "adamw").step_time_s
    for row in front.table.itertuples():
        est = predict(counts, by_hand[row.policy], "h100", "adamw")
        assert row.speedup == pytest.approx(fp32 / est.step_time_s, rel=1e-12), row.policy
        assert row.memory_gb == est.memory["total"] / 1e9
        assert row.step_time_s == est.step_time_s


def test_each_probe_is_a_recorded_run_from_the_same_start(searched):
    model, batches, front, _, _ = searched
    for row in front.table.itertuples():
        run = mpviz.load_run(row.run_dir)
        assert run.steps["step"].tolist() == list(range(STEPS)), row.policy
        assert run.meta["search"]["policy"] == row.policy and run.meta["status"] == "finished"
        recorded = run.steps["loss"].to_numpy(float)
        assert np.array_equal(recorded, front.losses[row.policy], equal_nan=True)
        assert load_counts(row.run_dir) is not None  # the explorer can price it
    # The policy was in force: the advised probe ran big in fp32 and the rest in fp16.
    dt = mpviz.load_run(front.table.set_index("policy").loc["advised", "run_dir"]).dtypes
    out = dt[(dt["tensor"] == "output") & (dt["step"] == 0)].set_index("layer")["dtype"]
    assert out["big"] == "float32" and out["fc2"] == out["head"] == "float16"

    # The fp32 probe is plain training: a copy trained without mpviz, seeded the same, loses
    # the same, bit for bit.
    torch.manual_seed(0)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(twin.parameters(), lr=LR)
    losses = []
    for i in range(STEPS):
        loss = loss_fn(twin, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses == front.losses["fp32"]


def test_the_users_model_and_rng_are_untouched(searched):
    model, _, _, before, rng_kept = searched
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)
                   for m in model.modules())
    assert rng_kept  # the caller's RNG state is as it was


def test_a_train_step_and_policies_of_ones_own(tmp_path):
    """train_step(model, batch, optimizer, scaler) trains as loss_fn does; the scaler is on only
    for a policy with fp16; a dict of one's own policies is probed beside fp32."""
    model, batches = offset_model(hidden=16), make_batches(n=2, rows=8)
    mine = {"half": {"*": "fp16", "big": "fp32"}, "brain": "bf16"}
    scalers = []

    def train_step(m, batch, opt, scaler):
        scalers.append(scaler.is_enabled())
        loss = loss_fn(m, batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return loss

    a = mpviz.search(model, batches, loss_fn=loss_fn, policies=mine, steps=3,
                     run_root=tmp_path / "a")
    b = mpviz.search(model, batches, train_step=train_step, policies=mine, steps=3,
                     run_root=tmp_path / "b", forward=loss_fn)
    assert a.table["policy"].tolist() == ["fp32", "half", "brain"]
    assert a.losses == b.losses
    assert scalers == [False] * 3 + [True] * 3 + [False] * 3
    pd.testing.assert_frame_equal(a.table.drop(columns="run_dir"), b.table.drop(columns="run_dir"))
    assert a.policies["half"].rules == {"*": "fp16", "big": "fp32"} and a.policies["fp32"] is None


def test_fp8_is_left_out_with_a_note_on_a_gpu_without_it(tmp_path, monkeypatch):
    model, batches = offset_model(hidden=16), make_batches(n=1, rows=8)
    monkeypatch.chdir(tmp_path)  # run_root by default: a new runs/search here
    front = mpviz.search(model, batches, loss_fn=loss_fn, policies=["fp8 linears", "fp32"],
                         steps=1, device="a100")
    assert front.table["policy"].tolist() == ["fp32"]
    assert front.notes == [
        "fp8 linears: left out: the NVIDIA A100 SXM 80GB has no fp8 tensor cores"]
    assert front.table["run_dir"].tolist() == [str(tmp_path / "runs" / "search" / "search-fp32")]
    # A policy of one's own with fp8 on that GPU is refused before anything trains.
    with pytest.raises(ValueError, match="no fp8 peak.*h100"):
        mpviz.search(model, batches, loss_fn=loss_fn, policies={"f8": {"fc1": "fp8_e4m3"}},
                     device="a100", run_root=tmp_path / "f8")
    assert not (tmp_path / "f8").exists()


def test_bad_input_is_refused_before_any_probe(tmp_path):
    model, batches = offset_model(hidden=16), make_batches(n=1, rows=8)
    root = tmp_path / "runs"

    def refused(exc, match, batches=batches, **kw):
        with pytest.raises(exc, match=match):
            mpviz.search(model, batches, **{"loss_fn": loss_fn, "run_root": root, **kw})

    refused(ValueError, r"Unknown device 'h10'.*Known GPUs: a100, h100", device="h10")
    refused(ValueError, "batches is empty", batches=[])
    refused(TypeError, r"one batch.*pass \[batch\]", batches=batches[0])
    refused(ValueError, "exactly one of loss_fn.*or train_step", loss_fn=None)
    refused(ValueError, "exactly one of loss_fn", train_step=lambda m, b, o, s: 0.0)
    refused(ValueError, r"Unknown candidate 'fp64'.*fp32, bf16, fp16, advised, fp8 linears",
            policies=["fp64"])
    refused(ValueError, "Policy rule 'bigg' is not a layer name.*'big'",
            policies={"x": {"bigg": "fp32"}})
    refused(ValueError, "Unknown optimizer 'adam_w'.*adamw", optimizer="adam_w")
    refused(ValueError, "Unknown optimizer None", optimizer=None)
    refused(ValueError, "steps must be at least 1", steps=0)
    assert not root.exists()  # nothing trained, nothing written


def test_the_front_by_hand():
    t = pd.DataFrame({
        "policy": ["fp32", "a", "b", "c", "d", "e"],
        "speedup": [1.0, 2.0, 2.0, 3.0, 5.0, 2.0],
        "loss_gap": [0.0, 0.01, 0.01, 0.2, 0.0, 0.01],
        "memory_gb": [1.0, 0.8, 0.9, 0.7, 0.5, 0.8],
        "diverged": [False, False, False, False, True, False],
    })
    # b: beaten by a (less memory); e ties a exactly, so neither beats the other; d diverged
    # (it would beat all), so it is neither on the front nor beats anyone.
    assert _pareto(t) == [True, True, False, True, False, True]
