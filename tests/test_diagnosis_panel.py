"""The Diagnosis panel in the explorer and the lab, on real runs: one made to fail (the issue's
`demo --task mlp --precision fp16 --lr 5`) and one healthy; the lab's "Apply advice" checked
against the policy changes the run itself recorded, and the fp16 output dtypes it recorded."""
from __future__ import annotations

import math
import threading

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


def test_explorer_draws_its_plots_before_the_diagnosis(runs, monkeypatch):
    """The explorer's first draw does not wait for mpviz.diagnose (held here until the test
    lets it go): the plots are drawn, the panel says it is diagnosing; then the diagnosis,
    made on another thread, is shown."""
    root, bad, _ = runs
    real, go, called = mpviz.diagnose, threading.Event(), []

    def held(run):
        called.append(threading.current_thread())
        go.wait(60)
        return real(run)

    monkeypatch.setattr(mpviz, "diagnose", held)
    ex = explorer_app(run_dir=bad, runs_dir=root, follow=False)
    try:
        assert not go.is_set() and ex.diagnosis.diagnosis is None
        assert list(ex.fig.trace("loss", 0).x) == list(range(20))   # the plots are drawn
        assert "diagnosing" in ex.diagnosis.html.value and "mpviz-finding" not in ex.diagnosis.html.value
        go.set()
        assert wait_for(lambda: ex.diagnosis.diagnosis is not None)
        assert called and threading.current_thread() not in called
        assert ex.diagnosis.diagnosis.findings[0].kind == "forward_overflow"
        assert wait_for(lambda: 'data-kind="forward_overflow"' in ex.diagnosis.html.value)
    finally:
        go.set()
        ex.close()


def test_explorer_panel_names_the_forward_overflow_and_its_layer(runs):
    root, bad, _ = runs
    ex = explorer_app(run_dir=bad, runs_dir=root, follow=False)
    try:
        assert wait_for(lambda: ex.diagnosis.diagnosis is not None)   # drawn after the plots
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
        assert wait_for(lambda: ex.diagnosis.diagnosis is not None)
        d = ex.diagnosis.diagnosis
        assert d is not None and d.ok and d.n_steps == 20
        text = ex.diagnosis.html.value
        assert "mpviz-sev-error" not in text and "mpviz-sev-warning" not in text
        assert text.startswith("<b>Diagnosis</b>")
        # Switching to the failing run re-diagnoses it.
        ex.open(runs[1])
        assert wait_for(lambda: "mpviz-sev-error" in ex.diagnosis.html.value)
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


def _bin(lo: float, hi: float) -> int:
    """The stats bin of a run.histogram row (0 zeros, 1 fp32 subnormals, 256 inf/nan)."""
    if lo == hi:
        return 0 if lo == 0 else 256
    return 1 if lo == 0 else int(math.log2(lo)) + 128


def test_explorer_exponent_view_matches_run_histogram(runs):
    root, bad, _ = runs
    ex = explorer_app(run_dir=bad, runs_dir=root, follow=False)
    try:
        ex.layer.value = "fc3"     # the drill-down: redrawn at once (not following)
        spec = ex.exponents.outputs[0]["data"]["application/vnd.plotly.v1+json"]
        heat = {t["name"]: t for t in spec["data"] if t["type"] == "heatmap"}
        meta = spec["layout"]["meta"]
        assert set(heat) == {"activation", "grad"}
        run = mpviz.load_run(bad)
        try:
            for tensor in ("activation", "grad"):
                steps, bins = meta[tensor]["steps"], meta[tensor]["bins"]
                assert steps == list(range(0, 20, 5)) and heat[tensor]["x"] == steps
                z = heat[tensor]["z"]
                for j, step in enumerate(steps):
                    h = run.histogram("fc3", tensor, step=step)
                    want = {_bin(lo, hi): c / h["count"].sum()
                            for lo, hi, c in zip(h["lo"], h["hi"], h["count"])}
                    got = {k: row[j] for k, row in zip(bins, z) if row[j] is not None}
                    assert got.keys() == want.keys() and all(
                        got[k] == pytest.approx(want[k]) for k in want), (tensor, step)
            # fc3's activations went inf/nan from step 1 (the forward overflow): an inf/nan row
            assert 256 in meta["activation"]["bins"]
        finally:
            run.close()
        # fp16's largest value and smallest subnormal are drawn as lines
        lines = {(s["line"]["color"], round(s["y0"], 3)) for s in spec["layout"]["shapes"]}
        assert ("#c62828", round(math.log2(65504), 3)) in lines and ("#c62828", -24.0) in lines
    finally:
        ex.close()
