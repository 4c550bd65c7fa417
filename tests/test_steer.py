"""Steering a job that runs elsewhere: ``Recorder(..., steerable=True)`` + ``mpviz.steer``.

The main test starts a training script the way users do (``python train.py``, fp16 autocast and a
GradScaler, a Recorder with steerable=True) and steers it from this process; the checks read what
the job itself recorded (``run.policy_changes``, ``run.dtypes``). Timing never decides an outcome:
the tests wait on conditions with deadlines, and a hold file stops the job between steps where a
request must stay pending.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import mpviz
from mpviz.mailbox import steer_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "train_script.py"
sys.path.insert(0, str(ROOT / "tests"))
from train_script import make_model  # noqa: E402


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = cond()
        except mpviz.RunStoreError:
            value = None   # the store is being created: its first commit is pending
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the training process exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_training(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), "--max-seconds", "90", *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def last_dtype_before(dtypes, layer: str, tensor: str, step: int) -> str:
    d = dtypes[(dtypes["layer"] == layer) & (dtypes["tensor"] == tensor) & (dtypes["step"] < step)]
    return d["dtype"].iloc[-1]


def test_steer_a_training_process(tmp_path):
    run_dir = tmp_path / "job"
    proc = start_training(run_dir)
    try:
        wait_for(lambda: mpviz.load_run(run_dir).last_step >= 3, 90, "the first steps", proc)
        run = mpviz.load_run(run_dir)
        assert run.meta["steerable"] is True and run.is_live

        head = mpviz.steer(run_dir, {"head": "fp32"})
        glob = mpviz.steer(run_dir, {"body.*": "bf16"})
        typo = mpviz.steer(run_dir, {"haed": "fp32"})
        fp64 = mpviz.steer(run_dir, {"head": "fp64"})
        gone = mpviz.steer(run_dir, {"body.norm": None})
        ids = [head, glob, typo, fp64, gone]
        assert ids == sorted(ids) and len(set(ids)) == 5

        # Each request is handled at a step boundary of the job: none stays pending.
        wait_for(lambda: "pending" not in set(run.steer_requests["status"]), 60,
                 "the job to pick the requests up", proc)
        st = {rid: mpviz.steer_status(run_dir, rid) for rid in ids}
        assert st[head]["status"] == "applied" and st[head]["reason"] is None
        assert st[glob]["status"] == "applied"
        n = st[head]["step"]
        assert n >= 4 and st[glob]["step"] >= n

        assert st[typo]["status"] == "refused"
        assert "'haed' is not a layer name" in st[typo]["reason"]
        assert "Close matches: 'head'" in st[typo]["reason"]
        assert st[fp64]["status"] == "refused" and "Unknown precision 'fp64'" in st[fp64]["reason"]
        assert st[gone]["status"] == "refused"
        assert "Cannot remove rule 'body.norm'" in st[gone]["reason"]
        reqs = run.steer_requests
        assert list(reqs.columns) == ["id", "time", "rules", "status", "step", "reason"]
        assert reqs.set_index("id").at[head, "rules"] == {"head": "fp32"}

        # What the job recorded: the change at the step it took effect, and the layer's dtypes
        # (seen by the recorder's own hooks) switching at exactly that step.
        # (run.db is committed by the job's writer thread every flush_every_s: wait for it)
        wait_for(lambda: set(run.policy_changes["step"]) >= {n, st[glob]["step"]}, 30,
                 "the changes in run.policy_changes", proc)
        changes = run.policy_changes
        assert changes[changes["layer"] == "head"][["step", "precision", "rule"]].values.tolist() \
            == [[n, "fp32", "head"]]
        m = st[glob]["step"]
        body = changes[changes["rule"] == "body.*"]
        assert sorted(body["layer"]) == ["body.act", "body.fc", "body.norm"]
        assert set(body["step"]) == {m} and set(body["precision"]) == {"bf16"}
        wait_for(lambda: (run.dtypes["step"] >= max(n, m)).any(), 30,
                 "the dtypes of the steered steps", proc)
        dtypes = run.dtypes
        at_n = dtypes[(dtypes["layer"] == "head") & (dtypes["step"] == n)]
        assert last_dtype_before(dtypes, "head", "output", n) == "float16"
        assert dict(zip(at_n["tensor"], at_n["dtype"]))["output"] == "float32"
        assert last_dtype_before(dtypes, "body.fc", "output", m) == "float16"
        at_m = dtypes[(dtypes["layer"] == "body.fc") & (dtypes["step"] == m)]
        assert dict(zip(at_m["tensor"], at_m["dtype"]))["output"] == "bfloat16"

        # The job keeps training with the change (the scaler and the steps go on).
        k = run.last_step
        wait_for(lambda: run.last_step > k + 3, 30, "more steps after steering", proc)

        # A job killed mid-run still says "running" on disk: steering it is refused, naming why.
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with pytest.raises(mpviz.SteerError, match=r"process \(pid \d+\) is gone.*steerable=True"):
            mpviz.steer(run_dir, {"head": "fp16"})
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _batch():
    torch.manual_seed(1)
    x = torch.randn(32, 16)
    return x, (x[:, :4].argmax(1)) % 4


# Not record_demo: train_script's model, one loop run plain, steerable and steered.
def _train(rec=None, steps=6, between=None):
    """Train make_model() for `steps` steps (fp16 autocast + GradScaler); `between(i)` runs before
    step i's forward. Returns the model."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batch()
    r = rec(model, opt, scaler) if rec else None
    with (r if r is not None else _null()):
        for i in range(steps):
            if between:
                between(i)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if r is not None:
                r.step(loss=loss, samples=len(x))
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return None


def test_a_steerable_recorder_changes_nothing_until_steered(tmp_path):
    plain = _train()
    steerable = _train(lambda m, o, s: mpviz.Recorder(m, optimizer=o, scaler=s, steerable=True,
                                                      run_dir=tmp_path / "r"))
    for (name, a), (_, b) in zip(plain.state_dict().items(), steerable.state_dict().items()):
        assert torch.equal(a, b), name
    run = mpviz.load_run(tmp_path / "r")
    assert run.meta["steerable"] is True and run.policy_changes.empty and run.steer_requests.empty


def test_request_applies_from_the_next_step_and_matches_a_live_update(tmp_path):
    """In one process the step is exact: a request posted during step 2 applies from step 3, and
    training is bit-identical to calling rec.policy.update at the same point."""
    d = tmp_path / "steered"
    ids = {}

    def post(i):
        if i == 2:
            ids["head"] = mpviz.steer(d, {"head": "fp32"})

    def live(rec_holder):
        def between(i):
            if i == 3:
                rec_holder[0].policy.update({"head": "fp32"})
        return between

    holder: list = []

    def make(path):
        def build(m, o, s):
            holder[:] = [mpviz.Recorder(m, optimizer=o, scaler=s, steerable=True, run_dir=path)]
            return holder[0]
        return build

    steered = _train(make(d), between=post)
    live_model = _train(make(tmp_path / "live"), between=live(holder))
    for (name, a), (_, b) in zip(steered.state_dict().items(), live_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert mpviz.steer_status(d, ids["head"])["step"] == 3
    changes = mpviz.load_run(d).policy_changes[["step", "layer", "precision", "rule"]]
    assert changes.values.tolist() == [[3, "head", "fp32", "head"]]
    live_changes = mpviz.load_run(tmp_path / "live").policy_changes[["step", "layer", "precision", "rule"]]
    assert live_changes.values.tolist() == [[3, "head", "fp32", "head"]]


def test_a_request_no_step_boundary_reaches_is_refused_when_the_run_ends(tmp_path):
    d = tmp_path / "r"
    torch.manual_seed(0)
    model = make_model()
    with mpviz.Recorder(model, run_dir=d, steerable=True) as rec:
        model(torch.randn(4, 16)).sum().backward()
        rec.step()
        rid = mpviz.steer(d, {"head": "bf16"})
    st = mpviz.steer_status(d, rid)
    assert st["status"] == "refused" and "the run ended" in st["reason"]


def test_steer_says_what_is_wrong_and_the_fix(tmp_path):
    with pytest.raises(mpviz.SteerError, match=r"no mpviz run.*steerable=True"):
        mpviz.steer(tmp_path / "nothing", {"head": "fp32"})
    model = make_model()
    with mpviz.Recorder(model, run_dir=tmp_path / "plain") as rec:
        with pytest.raises(mpviz.SteerError, match=r"not steerable.*Recorder\(\.\.\., steerable=True\)"):
            mpviz.steer(tmp_path / "plain", {"head": "fp32"})
        rec.step()
    assert not steer_path(tmp_path / "plain").exists()   # a refused steer leaves nothing behind
    with mpviz.Recorder(model, run_dir=tmp_path / "done", steerable=True):
        with pytest.raises(TypeError, match="non-empty dict"):
            mpviz.steer(tmp_path / "done", {})
        with pytest.raises(TypeError, match="precision name"):
            mpviz.steer(tmp_path / "done", {"head": torch.float32})
    with pytest.raises(mpviz.SteerError, match=r"is finished.*steerable=True"):
        mpviz.steer(tmp_path / "done", {"head": "fp32"})
    with pytest.raises(KeyError, match="no steering request 7"):
        mpviz.steer_status(tmp_path / "done", 7)


def test_mailbox_and_run_reading_never_import_torch(tmp_path):
    code = ("import sys, mpviz; mpviz.steer_status; import mpviz.mailbox, mpviz.run; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_explorer_panel_steers_a_live_run(dash_runs):
    """The explorer's menu (no browser: the widgets themselves) on a run this process records."""
    from mpviz.dashboard import explorer_app

    torch.manual_seed(0)
    model = make_model()
    x, y = _batch()

    def step(rec):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return rec.step(loss=loss)

    finished = mpviz.Recorder(make_model(), run_dir=dash_runs / "old")
    with finished:
        pass
    with mpviz.Recorder(model, run_dir=dash_runs / "live", steerable=True, flush_every_s=0.1) as rec:
        step(rec)
        ex = explorer_app(run_dir=dash_runs / "live", follow=False)
        panel = ex.steer
        assert panel.widget.layout.display != "none" and "head" in panel._rows
        cell, menu = panel._rows["head"]
        menu.value = "fp32"                                    # what picking it in the page does
        assert "pending" in cell.value and "pending" in panel.requests.value
        n = step(rec) + 1                                      # the job reaches a step boundary
        step(rec)
        rec.flush()
        ex.refresh()
        assert f"applied at step {n}" in cell.value and "<b>fp32</b>" in cell.value
        assert ex.fig.trace("marks", 0).x.tolist() == [n]      # the ★ on the loss curve
        panel.rule.value, panel.rule_precision.value = "body.*", "bf16"
        panel._send_rule()
        menu.value = "(policy)"                               # removes head's rule again
        panel.rule.value = "haed"
        panel._send_rule()
        step(rec)
        rec.flush()
        ex.refresh()
        reqs = rec.run.steer_requests
        assert reqs["status"].tolist() == ["applied", "applied", "applied", "refused"]
        assert "refused: Policy rule &#x27;haed&#x27; is not a layer name" in panel.requests.value
        assert "autocast" in cell.value   # head follows the outer autocast again
        ex.open(dash_runs / "old")        # a finished run: no menu
        assert panel.widget.layout.display == "none"
        ex.close()
