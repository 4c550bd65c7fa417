"""``mpviz.advise(run, device=...)`` (#21): what the advice buys on a named GPU, priced from the
step counted with the run, checked against independent predictions: ``predict`` with every
layer's precision written out by hand, and ``mpviz.estimate`` of the model under the policy."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mpviz
from mpviz.cost import count, load_counts, predict, save_counts
from mpviz.cost.records import COUNTS_FILE
from mpviz.scenarios import overflow_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    return x, x[:, :4].argmax(1)


def _priced_batch():
    """The batch a GPU would train on: its step is counted on the meta device (shapes only)."""
    rows = 16384
    return torch.randn(rows, 16, device="meta"), torch.zeros(rows, dtype=torch.long, device="meta")


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """A real fp16 + GradScaler run of an MLP whose ``big`` overflows fp16 in the forward (every
    step skipped), with its counted step kept beside it."""
    d = tmp_path_factory.mktemp("advise") / "fp16"
    model = overflow_model(n_in=16, hidden=256, n_out=4, seed=0)
    x, y = _batch()
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu")
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=d, policy={"*": "fp16"},
                        every=2) as rec:
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss)
    assert mpviz.load_run(d).steps["skipped"].all()
    save_counts(count(model, _priced_batch()), d)
    return d, model


def test_the_advice_is_priced_against_fp32_on_the_gpu_named(fp16_run):
    d, model = fp16_run
    policy = mpviz.advise(d, device="h100")
    assert policy.rules == {"*": "fp16", "big": "fp32"}
    est = policy.estimate

    # Independent: every layer's precision written out (no inheritance), priced from the counts.
    counts = load_counts(d)
    by_hand = {name: ("fp32" if name == "big" else "fp16") for name, _ in model.named_modules()}
    advice, fp32 = predict(counts, by_hand, "h100"), predict(counts, "fp32", "h100")
    assert est["device"] == "h100" and est["fits"] is True
    assert est["step_time_s"] == advice.step_time_s and est["fp32_step_time_s"] == fp32.step_time_s
    assert est["speedup"] == pytest.approx(fp32.step_time_s / advice.step_time_s, rel=1e-12)
    assert est["memory_gb"] == advice.memory["total"] / 1e9
    assert est["fp32_memory_gb"] == fp32.memory["total"] / 1e9
    # And from the model itself: mpviz.estimate decides each layer's precision from the policy
    # the way apply_policy does, and counts the step again.
    assert est["speedup"] == pytest.approx(
        mpviz.estimate(model, _priced_batch()).step_time_s
        / mpviz.estimate(model, _priced_batch(), policy=policy).step_time_s, rel=1e-12)

    # What advise said before is still there, unchanged.
    plain = mpviz.advise(d).estimate
    assert set(plain) == {"time_share", "memory_share", "method"}
    assert {k: est[k] for k in plain} == plain
    # Another GPU, another optimizer: the same counts, priced again.
    a100 = mpviz.advise(d, device="A100").estimate
    assert a100["device"] == "a100" and a100["fp32_step_time_s"] > est["fp32_step_time_s"]
    sgd = mpviz.advise(d, device="h100", optimizer="sgd").estimate
    assert sgd["memory_gb"] < est["memory_gb"]  # no AdamW moments


def test_a_run_without_counts_or_an_unknown_gpu_is_refused_with_the_fix(fp16_run, tmp_path):
    d, _ = fp16_run
    bare = tmp_path / "no-counts"
    shutil.copytree(d, bare)
    (bare / COUNTS_FILE).unlink()
    with pytest.raises(ValueError) as e:
        mpviz.advise(bare, device="h100")
    msg = str(e.value)
    assert "holds no counted step (counts.json.gz)" in msg and str(bare) in msg
    assert f"mpviz.cost.save_counts(mpviz.cost.count(model, batch), {str(bare)!r})" in msg
    assert mpviz.advise(bare).rules == {"*": "fp16", "big": "fp32"}  # without device= it advises
    with pytest.raises(ValueError, match=r"Unknown device 'h10'.*Known GPUs: a100, h100"):
        mpviz.advise(d, device="h10")


def test_advise_still_imports_no_torch():
    code = ("import sys, mpviz.diagnosis.advise, mpviz.cost; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
