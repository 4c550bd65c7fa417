"""The Diagnosis panel in the explorer and the lab, on real runs: one made to fail (the issue's
`demo --task mlp --precision fp16 --lr 5`) and one healthy; the lab's "Apply advice" checked
against the policy changes the run itself recorded, and the fp16 output dtypes it recorded."""
from __future__ import annotations

import pytest

import mpviz
from mpviz.dashboard import explorer_app, lab_app
from mpviz.dashboard.diagnosis_panel import DiagnosisPanel
from mpviz.demos import Trainer, demo_parts
from waiting import wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def record(run_dir, steps=20, **kw):
    t = Trainer(task="mlp", precision="fp16", run_dir=str(run_dir), every=5, **kw)
    with t:
        for _ in range(steps):
            t.step()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag_runs")
    return root, record(root / "lr5", lr=5), record(root / "healthy")


def test_explorer_panel_names_the_forward_overflow_and_its_layer(runs):
    root, bad, _ = runs
    ex = explorer_app(run_dir=bad, runs_dir=root, follow=False)
    try:
        d = ex.diagnosis.diagnosis
        assert d is not None and d.findings[0].kind == "forward_overflow"
        text = ex.diagnosis.html.value
        first = text.index('class="mpviz-finding')   # the first finding drawn is the worst one
        assert text.index("forward_overflow") > first
        assert text.index("forward_overflow") < text.index("scale_collapse")
        assert 'data-kind="forward_overflow"' in text and "<code>fc3</code>" in text
        assert "mpviz-sev-error" in text and "cannot fix a forward overflow" in text
        # The timeline: the last 5 of the 19 backoffs, each caused by fc3's forward overflow.
        assert "last 5 of 19" in text
        table = text[text.index("mpviz-backoffs"):]
        assert table.count("forward_overflow") == 5 and table.count("<code>fc3</code>") == 5
        # Same run again, nothing new: no second diagnosis (rate limit and run key).
        assert not ex.diagnosis.refresh(ex.run) and not ex.diagnosis.refresh(ex.run, force=True)
    finally:
        ex.close()


def test_explorer_panel_on_a_healthy_run_says_nothing_above_info(runs):
    root, _, good = runs
    ex = explorer_app(run_dir=good, runs_dir=root, follow=False)
    try:
        d = ex.diagnosis.diagnosis
        assert d is not None and d.ok and d.n_steps == 20
        text = ex.diagnosis.html.value
        assert "mpviz-sev-error" not in text and "mpviz-sev-warning" not in text
        assert text.startswith("<b>Diagnosis</b>")
        # Switching to the failing run re-diagnoses it at once.
        ex.open(runs[1])
        assert "mpviz-sev-error" in ex.diagnosis.html.value
    finally:
        ex.close()


def test_panel_shows_a_broken_run_as_one_line_and_does_not_raise(tmp_path):
    class Broken:
        run_dir, rank, last_step = tmp_path, None, 3

    p = DiagnosisPanel()
    assert p.refresh(Broken())   # diagnose() fails on it: the panel says so
    assert "unavailable" in p.html.value and p.diagnosis is None


def test_lab_apply_advice_keeps_the_overflowing_layer_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("MPVIZ_RUNS_DIR", str(tmp_path))
    parts = demo_parts("mlp", lr=5)
    lab = lab_app(model=parts["model"], optimizer=parts["optimizer"], loss_fn=parts["loss_fn"],
                  data=parts["data"], precision="fp16", every=5, name="mlp-lr5")
    try:
        lab.start(max_steps=16, pause_at=8)
        assert wait_for(lambda: lab.worker.state == "paused")
        assert wait_for(lambda: lab.diagnosis.diagnosis is not None
                        and lab.diagnosis.diagnosis.by_kind("forward_overflow"))
        reasons = lab.diagnosis.apply()   # the button
        assert list(reasons) == ["fc3"] and "overflowed" in reasons["fc3"]
        assert "<code>fc3</code> → fp32" in lab.diagnosis.advice.value
        assert lab.overrides() == {"fc3": "fp32"}
        lab.toggle_pause()
        lab.worker.join(120)
        run = mpviz.load_run(lab.trainers[0].recorder.run_dir)
        try:
            ch = run.policy_changes
            fc3 = ch[(ch["layer"] == "fc3") & (ch["precision"] == "fp32")]
            assert fc3["step"].tolist() == [8]        # applied at the next step
            dts = run.dtypes
            out = dts[(dts["layer"] == "fc3") & (dts["tensor"] == "output")]
            assert out["dtype"].iloc[0].endswith("float16") and out["dtype"].iloc[-1].endswith("float32")
            others = dts[(dts["layer"] == "fc1") & (dts["tensor"] == "output")]
            assert others["dtype"].iloc[-1].endswith("float16")   # only fc3 was kept
        finally:
            run.close()
    finally:
        lab.close()
