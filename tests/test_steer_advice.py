"""The advice applied to a steerable job: ``mpviz.steer(run_dir, mpviz.advise(run))``, the
explorer's "Apply advice" button and ``python -m mpviz diagnose RUN_DIR --apply``.

The job is made to fail: a Linear (``fc``) whose output exceeds fp16's range under fp16 autocast
(every step skipped by the GradScaler, the loss NaN), a LayerNorm after it, and a rule the user set
(``head`` in bf16). The job trains in this process, step by step, so the step a request is picked
up at is exact; the checks read what the job itself recorded (``run.policy_changes``,
``run.dtypes``, ``run.overflows``, ``run.steps``) and fp16's largest value from NumPy.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import mpviz
from mpviz.__main__ import main as cli
from mpviz.diagnosis.advise import advice_rules, advice_target
from mpviz.mailbox import steer_requests
from waiting import wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP16_MAX = float(np.finfo(np.float16).max)


class FailingJob:
    """fp16 autocast + GradScaler training of a model whose ``fc`` overflows fp16 in forward."""

    def __init__(self, run_dir, steerable: bool = True) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(OrderedDict(
            embed=nn.Linear(16, 64), fc=nn.Linear(64, 64), norm=nn.LayerNorm(64),
            head=nn.Linear(64, 4)))
        with torch.no_grad():
            self.model.fc.weight.mul_(1e5)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.scaler = torch.amp.GradScaler("cpu")
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 16, generator=g)
        self.y = self.x[:, :4].argmax(1)
        self.run_dir = run_dir
        self.rec = mpviz.Recorder(self.model, optimizer=self.opt, scaler=self.scaler,
                                  run_dir=run_dir, every=2, flush_every_s=0.1,
                                  steerable=steerable, policy={"head": "bf16"})
        self.rec.attach()

    def steps(self, n: int) -> int:
        """Train ``n`` steps; returns the index of the last one."""
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(self.model(self.x).float(), self.y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            last = self.rec.step(loss=loss, samples=len(self.x))
        self.rec.flush()
        return last

    def fc_fp32_max(self) -> float:
        """fc's largest |output| computed in fp32 with the current weights (the reference)."""
        with torch.no_grad():
            return float(self.model.fc(self.model.embed(self.x)).abs().max())

    def close(self) -> None:
        self.rec.close()


def test_advice_steers_a_failing_job_through_the_api(tmp_path):
    d = tmp_path / "job"
    job = FailingJob(d)
    try:
        job.steps(6)
        run = mpviz.load_run(d)
        assert job.fc_fp32_max() > FP16_MAX                    # fp16 cannot hold fc's output
        assert run.steps["skipped"].all() and run.steps["loss"].isna().all()

        policy = mpviz.advise(run, target=advice_target(run))
        assert advice_target(run) == "fp16" and set(policy.reasons) == {"fc"}
        assert advice_rules(run, policy) == {"fc": "fp32"}     # not "*", and head's rule kept
        rid = mpviz.steer(d, policy)                          # posted before step 6's forward
        assert mpviz.steer_status(d, rid)["rules"] == {"fc": "fp32"}
        last = job.steps(14)

        st = mpviz.steer_status(d, rid)
        assert st["status"] == "applied" and st["step"] == 7   # picked up at the end of step 6
        n = st["step"]
        changes = run.policy_changes[["step", "layer", "precision", "rule"]].values.tolist()
        assert changes == [[0, "head", "bf16", "head"], [n, "fc", "fp32", "fc"]]
        dt = run.dtypes
        out = dt[(dt["tensor"] == "output")]
        fc_out = out[out["layer"] == "fc"]
        assert fc_out[fc_out["step"] < n]["dtype"].tolist()[-1] == "float16"
        assert fc_out[fc_out["step"] >= n]["dtype"].tolist() == ["float32"]
        assert set(out[out["layer"] == "head"]["dtype"]) == {"bfloat16"}   # the user's rule
        # After the change: no overflow in fc (nor anywhere), no skipped step, a finite loss,
        # while fc's output is still beyond fp16's range (kept in fp32, it needs to be).
        ov = run.overflows
        assert ov[ov["step"] >= n].empty and set(ov[ov["step"] < n]["step"]) == set(range(n))
        after = run.steps[run.steps["step"] >= n]
        assert len(after) == last - n + 1 and not after["skipped"].any()
        assert np.isfinite(after["loss"].to_numpy()).all()
        assert job.fc_fp32_max() > FP16_MAX
        st_fc = run.layer_stats
        st_fc = st_fc[(st_fc["layer"] == "fc") & (st_fc["tensor"] == "activation")
                      & (st_fc["step"] >= n)]
        assert len(st_fc) and (st_fc["max_abs"] > FP16_MAX).all()

        # The advice again: its layer already runs in fp32, nothing is sent.
        with pytest.raises(mpviz.SteerError, match=r"advice changes nothing.*fc \(fp32\)"):
            mpviz.steer(d, mpviz.advise(run))
        with pytest.raises(TypeError, match=r"policy\.rules"):
            mpviz.steer(d, mpviz.PrecisionPolicy({"fc": "fp32"}))   # not an advice
        assert len(run.steer_requests) == 1
    finally:
        job.close()


def test_cli_diagnose_apply(tmp_path, capsys):
    d = tmp_path / "job"
    job = FailingJob(d)
    try:
        job.steps(3)
        assert cli(["diagnose", str(d), "--apply"]) == 0
        out = capsys.readouterr().out
        assert "forward_overflow" in out and "steering request #1" in out
        assert "fc -> fp32: output overflowed float16 in the forward" in out
        assert steer_requests(d)["rules"].tolist() == [{"fc": "fp32"}]
        n = job.steps(1) + 1
        assert mpviz.steer_status(d, 1)["step"] == n
        assert cli(["diagnose", str(d), "--apply"]) == 2       # nothing left to change
        assert "advice changes nothing" in capsys.readouterr().err
    finally:
        job.close()
    plain = FailingJob(tmp_path / "plain", steerable=False)
    try:
        plain.steps(1)
        assert cli(["diagnose", str(tmp_path / "plain"), "--apply"]) == 2
        assert "not steerable" in capsys.readouterr().err
    finally:
        plain.close()


def test_explorer_apply_advice_sends_the_same_request(dash_runs):
    """The explorer's button, driven from Python (the widgets themselves, no browser)."""
    from mpviz.dashboard import explorer_app

    old = FailingJob(dash_runs / "old", steerable=False)
    old.steps(2)
    old.close()
    job = FailingJob(dash_runs / "live")
    ex = None
    try:
        job.steps(4)
        run = mpviz.load_run(dash_runs / "live")
        expected = advice_rules(run, mpviz.advise(run, target=advice_target(run)))
        assert expected == {"fc": "fp32"}
        ex = explorer_app(run_dir=dash_runs / "live", follow=False)
        panel, btn = ex.diagnosis, ex.diagnosis.apply_btn
        assert wait_for(lambda: panel.diagnosis is not None)   # diagnosed after the plots
        assert not btn.disabled and "fc → fp32" in btn.tooltip

        btn.click()                                            # what clicking it in the page does
        reqs = run.steer_requests
        assert reqs["rules"].tolist() == [expected] and reqs["status"].tolist() == ["pending"]
        text = panel.advice.value
        assert "request #1" in text and "pending" in text and "<code>fc</code> → fp32" in text
        assert "output overflowed float16 in the forward" in text   # the reason
        btn.click()                                            # still pending: not sent twice
        assert len(run.steer_requests) == 1

        n = job.steps(1) + 1   # picked up at the end of step 4: in force from step 5
        ex.refresh()
        assert f"applied at step {n}" in panel.advice.value
        panel.refresh(ex.run, force=True)                      # step 5 not recorded yet
        assert btn.disabled and f"applies from step {n}: waiting" in btn.tooltip
        job.steps(1)
        ex.refresh()
        assert f"applied at step {n}" in panel.advice.value
        assert run.policy_changes[run.policy_changes["step"] > 0][["step", "layer", "precision"]] \
            .values.tolist() == [[n, "fc", "fp32"]]
        panel.refresh(ex.run, force=True)
        assert btn.disabled and "the advice changes nothing: fc already run in fp32" in btn.tooltip
        assert "changes nothing" in panel.offer_note.value

        ex.open(dash_runs / "old")                             # not steerable: not offered
        assert wait_for(lambda: panel.diagnosis is not None)
        assert btn.disabled and "steerable=True" in btn.tooltip and panel.advice.value == ""
        job.close()
        ex.open(dash_runs / "live")                            # finished now: not offered
        assert wait_for(lambda: panel.diagnosis is not None)
        assert btn.disabled and "the run is finished" in btn.tooltip
    finally:
        job.close()
        if ex is not None:
            ex.close()


def test_the_explorer_diagnoses_a_steerable_run_once_for_the_panel_and_its_advice(dash_runs, monkeypatch):
    """The Diagnosis panel's findings and the advice it offers come from one diagnosis."""
    import sys

    from mpviz.dashboard import explorer_app

    real, calls = mpviz.diagnose, []

    def counted(run):
        calls.append(run)
        return real(run)

    job = FailingJob(dash_runs / "live")
    ex = None
    try:
        job.steps(4)
        ex = explorer_app(run_dir=dash_runs / "live", follow=False)
        panel, btn = ex.diagnosis, ex.diagnosis.apply_btn
        assert wait_for(lambda: panel.diagnosis is not None)
        monkeypatch.setattr(mpviz, "diagnose", counted)
        monkeypatch.setattr(sys.modules["mpviz.diagnosis.advise"], "diagnose", counted)
        job.steps(1)
        assert panel.refresh(ex.run, force=True)
        assert len(calls) == 1
        assert not btn.disabled and "fc → fp32" in btn.tooltip          # the advice was made
        assert panel.diagnosis.by_kind("forward_overflow")
    finally:
        job.close()
        if ex is not None:
            ex.close()
