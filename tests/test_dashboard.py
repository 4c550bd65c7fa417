"""The dashboard apps' logic, without a browser: real training, real runs, real widgets.

References are independent of the code under test: the run store read back with plain pandas,
a Trainer stepped by hand, GradScaler's own scale, log2 computed by numpy.
"""

from __future__ import annotations

import ast
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mpviz
from mpviz.dashboard import compare_app, explorer_app, lab_app, queries
from mpviz.dashboard.compare import differences

ROOT = Path(__file__).resolve().parents[1]


from helpers.training import demo_process, record_demo
from waiting import wait_for as _wait


def _rounds_seen_by_the_loop(worker, turns: int = 3) -> list[int]:
    """``worker.rounds`` as seen from inside the worker's loop by ``turns`` functions posted to
    its mailbox, each only once the previous one has run (so on a later turn of the loop): a
    paused worker must show the same number each time, however slow the machine."""
    seen: list[int] = []
    for n in range(1, turns + 1):
        worker.post(lambda: seen.append(worker.rounds))
        assert _wait(lambda: len(seen) >= n), "the worker's loop stopped going round"
    return seen


# --------------------------------------------------------------------------- no torch
def test_dashboard_package_never_imports_torch():
    for path in sorted((ROOT / "mpviz" / "dashboard").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), (path, names)
    # Importing the apps (and reading runs) must not pull torch in either.
    code = "import sys, mpviz.dashboard; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- the lab
def test_lab_trains_in_a_thread_and_shows_every_step_and_a_toggle(dash_runs):
    lab = lab_app(task="digits", precision="fp16", every=2)
    try:
        assert "head" in lab.live.table.rows and "conv1" in lab.live.table.rows
        # The worker pauses itself after 12 steps, whatever the machine's speed; the toggle is
        # made while it waits, and must take effect at the next step, 12.
        lab.start(max_steps=40, pause_at=12)
        # Paused, and drawn so (the buttons follow at the tick right after the pause).
        assert _wait(lambda: lab.worker.state == "paused" and lab.bar.pause.description == "Resume")
        assert lab.worker.rounds == 12
        lab.set_layer_precision("head", "fp32")
        # still paused: the worker's loop goes round without a step
        assert _rounds_seen_by_the_loop(lab.worker) == [12, 12, 12]
        assert lab.worker.rounds == 12 and lab.worker.state == "paused"
        lab.toggle_pause()                        # the Resume button
        lab.worker.join(120)
        assert lab.worker.state == "done" and lab.worker.reason == "step limit"
        assert not lab.worker.alive
        run_dir = lab.trainers[0].run_dir

        run = mpviz.load_run(run_dir)
        steps = run.steps
        assert run.meta["status"] == "finished" and len(steps) == 40
        # The loss curve is exactly the recorded losses (40 points: no decimation).
        loss = lab.live.fig.trace("loss", 0)
        np.testing.assert_array_equal(np.asarray(loss.x), steps["step"].to_numpy(dtype=float))
        np.testing.assert_allclose(np.asarray(loss.y), steps["loss"].to_numpy(dtype=float))
        # The toggle took effect at a later step, and is marked there on the curve.
        changes = run.policy_changes
        head = changes[(changes["layer"] == "head") & (changes["precision"] == "fp32")]
        assert len(head) == 1 and int(head["step"].iloc[0]) == 12
        marks = lab.live.fig.trace("marks", 0)
        k = int(head["step"].iloc[0])
        assert k in [int(x) for x in marks.x]
        i = [int(x) for x in marks.x].index(k)
        assert "head → fp32" in marks.hovertext[i]
        assert marks.y[i] == pytest.approx(float(steps.loc[steps["step"] == k, "loss"].iloc[0]))
        # The layer table shows the new precision for head, the base one elsewhere.
        assert "<b>fp32</b>" in lab.live.table.rows["head"][0].value
        assert "<b>fp16</b>" in lab.live.table.rows["conv1"][0].value
        # ... and head really ran in fp32 after the change (recorded output dtype).
        dts = run.dtypes
        out = dts[(dts["layer"] == "head") & (dts["tensor"] == "output")]
        assert out["dtype"].iloc[-1].endswith("float32") and out["dtype"].iloc[0].endswith("float16")
        # Loss scale trace = log2 of the scaler's values recorded each step.
        np.testing.assert_allclose(np.asarray(lab.live.fig.trace("scale", 0).y),
                                   np.log2(steps["loss_scale"].to_numpy(float)))
        # Heatmap: one row per layer with grads, log2 of the recorded grad norm.
        heat = lab.live.fig.trace("grads")
        stats = run.layer_stats
        g = stats[(stats["tensor"] == "grad") & (stats["layer"] == "conv1") & (stats["step"] == 0)]
        row = list(heat.y).index("conv1")
        assert heat.z[row][0] == pytest.approx(math.log2(float(g["norm"].iloc[0])), abs=0.01)
        run.close()
    finally:
        lab.close()


def test_lab_race_trains_the_same_data_interleaved(dash_runs):
    from mpviz.demos import Trainer

    lab = lab_app(task="mlp", precision="bf16")
    try:
        lab.alongside.value = ("fp32", "fp16")
        lab.start(max_steps=8)
        lab.worker.join(120)
        assert [t.precision for t in lab.trainers] == ["bf16", "fp32", "fp16"]
        runs = [mpviz.load_run(t.run_dir) for t in lab.trainers]
        assert [r.last_step for r in runs] == [7, 7, 7]
        # Same model, seed and data as a plain fp32 Trainer stepped by hand (no recorder, no UI).
        ref = Trainer(task="mlp", precision="fp32", seed=0, record=False)
        ref_loss = [ref.step()["loss"] for _ in range(8)]
        ref.close()
        np.testing.assert_allclose(runs[1].steps["loss"].to_numpy(float), ref_loss, rtol=1e-6)
        # Three overlaid curves, one per policy.
        for slot in range(3):
            assert len(lab.live.fig.trace("loss", slot).x) == 8 and lab.live.fig.trace("loss", slot).visible
            assert len(lab.live.fig.trace("speed", slot).y) == 8
        for r in runs:
            r.close()
    finally:
        lab.close()


def test_lab_shows_the_predicted_speed_beside_the_measured_one(dash_runs):
    """The estimate panel: this machine's measured speed, labelled so, and an estimate for the GPU
    picked of the policy in force and of fp32: `mpviz.cost.predict` over the counts saved with
    the run, for the policy written out by hand. The layer table shows each layer's share of it."""
    from mpviz.cost import load_counts, predict
    from mpviz.dashboard.estimate_panel import share_html, step_time

    lab = lab_app(task="text", precision="fp32", every=5)
    try:
        lab.batch.value = 128              # big enough that an A100 and an H100 differ
        assert "Press Start" in lab.live.estimate.text.value
        assert lab.add_rule("head", "bf16")
        lab.alongside.value = ("bf16",)     # a race lane: its predicted speed against fp32
        lab.start(max_steps=4)
        lab.worker.join(300)
        assert lab.worker.reason == "step limit"
        run_dir = lab.trainers[0].run_dir
        counts = load_counts(run_dir)
        policy = {"": "fp32", "head": "bf16"}
        steps = mpviz.load_run(run_dir).steps
        here = f"measured here (CPU)</b>: <span class=\"mpviz-measured\">{step_time(steps['step_time_s'].median())}/step"
        shown = {}
        for gpu, title in (("h100", "NVIDIA H100 SXM 80GB"), ("a100", "NVIDIA A100 SXM 80GB")):
            lab.set_gpu(gpu)
            text = lab.live.estimate.text.value
            est, fp32 = predict(counts, policy, gpu), predict(counts, "fp32", gpu)
            assert here in text and f"<b>estimate for {title}</b>" in text
            assert f"policy in force (mixed) <span class=\"mpviz-predicted\">{step_time(est.step_time_s)}/step" in text
            assert f"fp32 <span class=\"mpviz-predicted-fp32\">{step_time(fp32.step_time_s)}/step" in text
            assert f"{fp32.step_time_s / est.step_time_s:.2f}× the speed of fp32" in text
            lane = predict(counts, "bf16", gpu)
            assert f"race, predicted speed vs fp32: bf16 (alongside) {fp32.step_time_s / lane.step_time_s:.2f}×" in text
            shown[gpu] = est
            rows = est.layers.set_index("layer")
            for name, (cell, _) in lab.live.table.rows.items():
                bound = rows.loc[name, "bound"]
                share = share_html(rows.loc[name, "time_s"] / est.step_time_s,
                                   bound if isinstance(bound, str) else None)
                assert cell.value.endswith(share) if share else "mpviz-share" not in cell.value
        assert shown["a100"].step_time_s > shown["h100"].step_time_s
        assert "<b>bf16</b>" in lab.live.table.rows["head"][0].value
    finally:
        lab.close()


def test_lab_draws_the_trade_off_front_of_its_probes(dash_runs):
    """The front panel's button probes each policy (`mpviz.search`, through the session) with
    Start held back meanwhile; the scatter has one labelled point per policy, at its predicted
    speedup and loss gap, the front apart; the probes are runs the explorer lists."""
    lab = lab_app(task="mlp", precision="fp32")
    try:
        lab.front.button.click()
        assert lab.front.busy and lab.bar.start.disabled and lab.front.button.disabled
        front = lab.front.future.result(300)
        assert _wait(lambda: "probe steps each" in lab.front.status.value)
        assert not lab.bar.start.disabled and not lab.front.button.disabled
        fig = lab.front.out.outputs[0]["data"]["application/vnd.plotly.v1+json"]
        t = front.table.set_index("policy")
        drawn = {}
        for trace in fig["data"]:
            for x, y, label in zip(trace["x"], trace["y"], trace["text"]):
                for name in label.split(", "):   # policies on the same point share it
                    drawn[name] = (trace["meta"], x, y)
        assert set(drawn) == set(t.index)
        for name, (group, x, y) in drawn.items():
            assert x == pytest.approx(t.loc[name, "speedup"])
            if not t.loc[name, "diverged"]:
                assert y == pytest.approx(100 * t.loc[name, "loss_gap"])   # in %
            want = ("front:diverged" if t.loc[name, "diverged"] else
                    "front:on the front" if t.loc[name, "on_front"] else "front:off the front")
            assert group == want
        assert drawn["fp32"] == ("front:on the front", 1.0, 0.0)
        assert "estimate for NVIDIA H100 SXM 80GB" in lab.front.status.value
        ex = explorer_app(follow=False)
        try:
            listed = {Path(v).name for _, v in ex.picker.options}
            assert {Path(r).name for r in t["run_dir"]} <= listed
        finally:
            ex.close()
    finally:
        lab.close()


def test_lab_pause_stop_and_time_limit_end_the_thread(dash_runs):
    lab = lab_app(task="mlp", precision="fp32")
    try:
        lab.start(max_steps=1_000_000, max_seconds=3600)
        assert _wait(lambda: lab.worker.rounds >= 3)
        lab.toggle_pause()
        assert _wait(lambda: lab.worker.state == "paused")
        # the step under way when Pause was pressed ends; then no training while paused
        seen = _rounds_seen_by_the_loop(lab.worker)
        paused_at = seen[0]
        assert seen == [paused_at] * 3 and lab.worker.rounds == paused_at
        lab.toggle_pause()
        assert _wait(lambda: lab.worker.rounds > paused_at)
        lab.stop()
        assert not lab.worker.alive and lab.worker.reason == "stopped"
        assert mpviz.load_run(lab.trainers[0].run_dir).meta["status"] == "finished"
        # A time limit ends a session even when nobody presses anything (or the tab is gone).
        lab.start(max_steps=1_000_000, max_seconds=1)
        lab.worker.join(60)
        assert not lab.worker.alive and lab.worker.reason == "time limit"
    finally:
        lab.close()


def test_lab_claims_its_run_at_start_not_at_page_load(dash_runs):
    """Opening the page (building the lab), changing its settings and Reset record nothing;
    Start claims exactly one run directory. The layer table is there before it, and lists the
    layers the run then records; the plots say "press Start" until then."""
    from mpviz.demos import model_layers

    lab = lab_app(task="mlp", precision="fp32")
    try:
        assert list(dash_runs.iterdir()) == []
        assert "fc1" in lab.live.table.rows and lab.trainers == [] and lab.model is not None
        assert "Start" in lab.live.fig.placeholder and lab.live.fig.figure.layout.xaxis.visible is False
        assert lab.add_rule("fc3", "bf16")        # rules are checked against the model already
        lab.task.value = "digits"                 # a config change builds a new model ...
        assert "conv1" in lab.live.table.rows and list(dash_runs.iterdir()) == []   # ... and records nothing
        lab.task.value = "mlp"
        lab.start(max_steps=3)
        claimed = list(dash_runs.iterdir())
        assert claimed == [Path(lab.trainers[0].run_dir)]
        assert lab.live.fig.placeholder is None and lab.live.fig.figure.layout.xaxis.visible is True
        lab.worker.join(60)
        run = mpviz.load_run(claimed[0])
        assert len(run.steps) == 3
        recorded = [(n, t, int(p), int(d)) for n, t, p, d in
                    zip(*(run.layers[c] for c in ("layer", "type", "n_params", "depth")))]
        assert model_layers(lab.model) == recorded    # what the table was built from
        assert [r[0] for r in recorded if r[0]] == list(lab.live.table.rows)
        run.close()
        lab.reset()                               # Reset: the trained run stays, none is added
        assert list(dash_runs.iterdir()) == claimed
        assert len(lab.live.fig.trace("loss", 0).x) == 0 and "Start" in lab.live.fig.placeholder
    finally:
        lab.close()
    assert list(dash_runs.iterdir()) == claimed   # closing the page adds nothing either


def test_the_labs_default_session_has_no_step_limit_only_a_time_limit_and_stop(dash_runs):
    from mpviz.dashboard.lab import SESSION_S
    from mpviz.scenarios import SCENARIOS

    import torch

    from mpviz.dashboard.worker import torch_thread

    # One torch thread where the lab trains: two spin-wait on each other on a busy 2-core
    # machine (12 steps/s instead of 600 here; see conftest's one_torch_thread).
    threads = torch_thread.call(torch.get_num_threads)
    torch_thread.call(torch.set_num_threads, 1)
    lab = lab_app(task="mlp", precision="fp32")
    try:
        # Defaults: no step limit (0), ten minutes, so a kernel never trains forever.
        assert lab.max_steps.value == 0 and lab.max_seconds.value == SESSION_S == 600
        lab.start()
        assert lab.worker.max_seconds == SESSION_S and lab.worker.max_steps > 10**12
        assert _wait(lambda: lab.worker.rounds > 1000, timeout=300), lab.worker.rounds
        assert lab.worker.alive and lab.worker.state == "running"
        lab.stop()
        assert not lab.worker.alive and lab.worker.reason == "stopped"
        assert " / " not in lab.bar.status.value.split("·")[1]      # "step N", no "of 1000"
    finally:
        lab.close()
        torch_thread.call(torch.set_num_threads, threads)
    # A scenario brings its own step limit; leaving it restores the lab's.
    lab = lab_app(task="mlp", precision="fp32", scenario="lr-too-high")
    try:
        assert lab.max_steps.value == SCENARIOS["lr-too-high"].max_steps
        lab.load_scenario(None)
        assert lab.max_steps.value == 0
    finally:
        lab.close()


# --------------------------------------------------------------------------- queries
def _overflowing_run(run_dir: Path, bad_steps: set[int], steps: int = 60):
    """fp16 autocast + GradScaler on a tiny model; on `bad_steps` the input is scaled so fc1's
    output overflows fp16. Returns the steps GradScaler skipped, from the scaler itself."""
    # Not record_demo: its own loop, to overflow on chosen steps and read GradScaler's skips.
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    skipped = []
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=run_dir, every=2) as rec:
        for i in range(steps):
            x = torch.randn(16, 4) * (1e6 if i in bad_steps else 1.0)
            y = torch.randint(0, 2, (16,))
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < before:
                skipped.append(i)
            opt.zero_grad()
            rec.step(loss=loss, samples=16)
    return skipped


def test_queries_decimate_lines_but_keep_every_skipped_step(tmp_path):
    bad = {5, 17, 33, 34, 51}
    skipped_ref = _overflowing_run(tmp_path / "ovf", bad)
    assert set(skipped_ref) == bad
    run = mpviz.load_run(tmp_path / "ovf")
    steps = run.steps

    view = queries.step_view(run, 0, 59, max_points=10)
    assert len(view) <= 10
    # Each point is the mean of its bucket of 6 steps (hand computation with pandas).
    k = queries.bucket_size(0, 59, 10)
    ref = steps.assign(b=steps["step"] // k).groupby("b")["samples_per_s"].mean().to_numpy()
    np.testing.assert_allclose(view["samples_per_s"].to_numpy(float), ref)

    sk = queries.skipped_view(run, 0, 59)
    assert sorted(sk["step"].astype(int)) == sorted(skipped_ref)      # none dropped
    assert all("fc1" in c for c in sk["culprit"])                      # the layer that overflowed
    np.testing.assert_allclose(sk["loss_scale"].to_numpy(float),
                               steps.set_index("step").loc[sorted(skipped_ref), "loss_scale"].to_numpy(float))

    heat = queries.grad_heatmap(run, 0, 59, max_cells=12)
    assert heat.z.size <= 12 and set(heat.layers) == {"fc1", "fc2"}
    # Cell = log2 of the largest recorded grad norm in its bucket (reference in pandas).
    st = run.layer_stats
    g = st[(st["tensor"] == "grad") & (st["layer"] == "fc2")]
    kk = queries.bucket_size(0, 59, 12 // 2)
    ref = np.log2(g.assign(b=g["step"] // kk).groupby("b")["norm"].max().to_numpy())
    row = heat.layers.index("fc2")
    got = heat.z[row]
    ok = np.isfinite(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-6)

    # On the figure: one × per skipped step, at log2 of its loss scale, culprit on hover.
    from mpviz.dashboard.plots import RunFigure

    fig = RunFigure()
    snap = queries.snapshot(run, max_points=10)
    fig.update(0, snap.steps, snap.skipped, snap.marks, snap.dtypes, snap.heat)
    skips = fig.trace("skips", 0)
    assert sorted(int(x) for x in skips.x) == sorted(skipped_ref)
    np.testing.assert_allclose(skips.y, np.log2(sk["loss_scale"].to_numpy(float)))
    assert all("fc1" in h for h in skips.hovertext)

    # Very large runs sample recorded steps per cell instead of scanning: with enough samples
    # per cell that is the exact answer; with one, each cell is one of its bucket's norms.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(queries, "EXACT_ROWS", 0)
        mp.setattr(queries, "SAMPLES_PER_CELL", 1000)
        np.testing.assert_allclose(queries.grad_heatmap(run, 0, 59, max_cells=12).z, heat.z)
        mp.setattr(queries, "SAMPLES_PER_CELL", 1)
        sampled = queries.grad_heatmap(run, 0, 59, max_cells=12).z[row]
        by_bucket = g.assign(b=g["step"] // kk).groupby("b")["norm"]
        for col, (_, norms) in enumerate(by_bucket):
            assert any(np.isclose(sampled[col], np.log2(norms.to_numpy(float))))

    table, total = queries.overflow_table(run, limit=3)
    assert total == len(run.overflows) and len(table) == 3
    assert int(table["step"].iloc[0]) == max(bad)  # newest first
    run.close()


def test_layer_table_headroom_is_binades_below_the_format_max(dash_two_runs):
    _, _, fp16_dir = dash_two_runs
    run = mpviz.load_run(fp16_dir)
    table = queries.layer_table(run, {}, base="fp16").set_index("layer")
    st = run.layer_stats
    act = st[(st["tensor"] == "activation") & (st["layer"] == "fc1")].sort_values("step")
    expected = math.log2(65504.0 / float(act["max_abs"].iloc[-1]))
    assert table.loc["fc1", "headroom"] == pytest.approx(expected)
    grad = st[(st["tensor"] == "grad") & (st["layer"] == "fc1")].sort_values("step")
    assert table.loc["fc1", "grad_norm"] == pytest.approx(float(grad["norm"].iloc[-1]))
    assert table.loc["fc1", "precision"] == "fp16" and table.loc["fc1", "n_params"] == 128 * 64 + 64
    run.close()


# --------------------------------------------------------------------------- explorer
def _has_a_step(run_dir: Path) -> bool:
    try:
        return mpviz.load_run(run_dir).last_step >= 0
    except mpviz.RunStoreError:   # not created yet, or its first commit not written
        return False


def test_explorer_follows_a_run_written_by_another_process(dash_runs):
    run_dir = dash_runs / "live"
    proc = demo_process(run_dir, task="mlp", precision="fp32", steps=3000, every=5)
    try:
        assert _wait(lambda: _has_a_step(run_dir))
        ex = explorer_app(poll_s=0.2)   # the newest run under $MPVIZ_RUNS_DIR
        assert Path(ex.picker.value) == run_dir
        first = ex.run.last_step
        assert first < 2999 and ex.follower.alive
        assert _wait(lambda: ex.last_seen > first)   # it grows while the other process writes
        assert proc.wait(300) == 0, proc.stderr.read().decode()
        # The follower sees the end of the run and stops by itself.
        assert _wait(lambda: ex.follower.thread is None)
        assert ex.last_seen == 2999
        assert ">3000</span> steps" in ex.info.value
        # 3000 steps drawn as <= 2000 averaged points, up to the last one.
        assert len(ex.fig.trace("loss", 0).x) <= 2000
        assert int(max(ex.fig.trace("loss", 0).x)) == 2998
        ex.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_explorer_opens_the_newest_run_that_has_steps(dash_runs):
    trained = record_demo(dash_runs / "trained", task="mlp", precision="fp32", steps=3, every=5)
    # newer, no step: a job that never got going
    empty = record_demo(dash_runs / "empty", task="mlp", precision="fp32", steps=0, every=5)
    past = time.time() - 60
    os.utime(trained / "run.db", (past, past))   # list_runs orders by the store's mtime
    assert [p.name for p in mpviz.list_runs(dash_runs)] == ["empty", "trained"]
    ex = explorer_app(follow=False)
    try:
        assert Path(ex.picker.value) == trained and ">3</span> steps" in ex.info.value
        assert str(empty) in [v for _, v in ex.picker.options]   # listed, to pick by hand
    finally:
        ex.close()


def test_the_explorer_predicts_a_runs_speed_from_the_step_counted_with_it(dash_runs):
    """A run of `Trainer` carries its counted step: the explorer shows the estimate of its
    precision in force (written out by hand) and of fp32 on the GPU picked, `predict`'s; a run
    recorded without one says so in one line, no error."""
    from mpviz.cost import load_counts, predict
    from mpviz.dashboard.estimate_panel import step_time
    from mpviz.dashboard.explorer import NO_COUNTS

    counted = record_demo(dash_runs / "counted", task="text", precision="bf16", steps=3, every=5,
                          policy={"head": "fp32"})
    plain = dash_runs / "plain"
    _overflowing_run(plain, set(), steps=3)     # mpviz.Recorder alone: no count
    counts = load_counts(counted)
    assert counts is not None and load_counts(plain) is None
    policy = {"": "bf16", "head": "fp32"}
    ex = explorer_app(run_dir=counted, follow=False)
    try:
        measured = mpviz.load_run(counted).steps["step_time_s"].median()
        for gpu, title in (("h100", "NVIDIA H100 SXM 80GB"), ("l4", "NVIDIA L4 24GB")):
            ex.estimate.gpu.value = gpu
            text = ex.estimate.text.value
            est, fp32 = predict(counts, policy, gpu), predict(counts, "fp32", gpu)
            assert f"measured in this run (CPU)</b>: <span class=\"mpviz-measured\">{step_time(measured)}/step" in text
            assert f"<b>estimate for {title}</b>" in text
            assert f"policy in force (mixed) <span class=\"mpviz-predicted\">{step_time(est.step_time_s)}/step" in text
            assert f"fp32 <span class=\"mpviz-predicted-fp32\">{step_time(fp32.step_time_s)}/step" in text
        ex.open(plain)
        assert NO_COUNTS in ex.estimate.text.value and ex.estimate.gpu.layout.display == "none"
        assert ">3</span> steps" in ex.info.value and "mpviz-problem" not in ex.info.value
        ex.open(counted)
        assert "estimate for NVIDIA L4 24GB" in ex.estimate.text.value
        # A run of the command line (`mpviz demo`) carries its counted step too.
        cli = dash_runs / "cli"
        proc = demo_process(cli, task="mlp", precision="bf16", steps=3)
        assert proc.wait(300) == 0, proc.stderr.read().decode()
        cli_counts = load_counts(cli)
        assert cli_counts is not None and cli_counts.model == "MLP"
        ex.open(cli)
        est = predict(cli_counts, "bf16", "l4")
        assert f"policy in force (bf16) <span class=\"mpviz-predicted\">{step_time(est.step_time_s)}/step" in ex.estimate.text.value
    finally:
        ex.close()


def test_process_gone_tells_a_reused_pid_from_the_runs_writer():
    from mpviz import mailbox

    me = {"status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    assert not mailbox.process_gone({**me, "start_time": time.time()})   # this process: alive
    # A run that started long before this process: its pid was reused since, the writer is gone.
    assert mailbox.process_gone({**me, "start_time": 1.0})
    assert not mailbox.process_gone({**me, "start_time": 1.0, "status": "finished"})
    # One check for `mpviz info`, steering and the apps.
    assert queries.process_gone is mailbox.process_gone


def test_a_run_whose_writer_was_killed_reads_killed_in_info_explorer_and_compare(dash_runs):
    run_dir = dash_runs / "killed"
    proc = demo_process(run_dir, task="mlp", precision="fp32", steps=1000000, every=5)
    try:
        assert _wait(lambda: proc.poll() is None and _has_a_step(run_dir)), proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)   # reaped, as its shell would
    run = mpviz.load_run(run_dir)
    meta, steps = run.meta, run.last_step + 1
    run.close()
    assert meta["status"] == "running" and steps > 0   # it never got to say it ended
    killed = "killed / not finished"

    info = subprocess.run([sys.executable, "-m", "mpviz", "info", str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert f"{run_dir}: {killed}" in info and "running" not in info.replace(str(run_dir), "")

    ex = explorer_app(runs_dir=dash_runs)   # follow on: there is nothing to follow
    try:
        assert Path(ex.picker.value) == run_dir and ex.follower.thread is None
        assert killed in ex.info.value and killed in ex.meta.value
        assert "running" not in ex.info.value + ex.meta.value
    finally:
        ex.close()

    finished = record_demo(dash_runs / "finished", task="mlp", precision="fp32", steps=3, every=5)
    cmp = compare_app(runs=[run_dir, finished], runs_dir=dash_runs)
    try:
        labels = dict((v, label) for label, v in cmp.picker.options)
        assert labels[str(run_dir)].endswith(killed) and killed not in labels[str(finished)]
        assert killed in cmp.info.value
        assert not any("running" in label for label in labels.values())
        assert "running" not in cmp.info.value
    finally:
        cmp.close()


def test_explorer_range_and_drill_down(dash_two_runs):
    _, fp32_dir, _ = dash_two_runs
    ex = explorer_app(run_dir=fp32_dir, runs_dir=fp32_dir.parent, follow=False)
    try:
        assert ex.range.value == (0, 29)
        ex.set_range(10, 20)
        xs = [int(x) for x in ex.fig.trace("loss", 0).x]
        assert xs == list(range(10, 21))
        ex.layer.value = "fc1"
        assert len(ex.drill.outputs) == 1
        fig = ex.drill.outputs[0]["data"]["application/vnd.plotly.v1+json"]
        norms = [t for t in fig["data"] if t["name"] == "grad norm"][0]
        st = mpviz.load_run(fp32_dir).layer_history("fc1", "grad")
        ref = st[(st["step"] >= 10) & (st["step"] <= 20)]
        assert list(norms["x"]) == ref["step"].tolist()
        np.testing.assert_allclose(norms["y"], ref["norm"].to_numpy(float))
    finally:
        ex.close()


# --------------------------------------------------------------------------- compare
def test_compare_overlays_runs_and_ranks_layer_differences(dash_two_runs):
    root, a, b = dash_two_runs
    cmp = compare_app(runs=[a, b], runs_dir=root)   # the apps open runs only under their root
    try:
        for slot, d in enumerate((a, b)):
            steps = mpviz.load_run(d).steps
            t = cmp.fig.trace(f"loss-step:{slot}")
            np.testing.assert_allclose(np.asarray(t.y), steps["loss"].to_numpy(float))
            w = cmp.fig.trace(f"loss-wall:{slot}")
            np.testing.assert_allclose(np.asarray(w.x), steps["wall_time"] - steps["wall_time"].min())
            assert not cmp.fig.trace(f"loss-step:{slot + 2}").visible
        diff = cmp.differences()
        top = diff.iloc[0]
        # spread = |log2(mean norm a) - log2(mean norm b)| for that layer and tensor.
        means = []
        for d in (a, b):
            st = mpviz.load_run(d).layer_stats
            sel = st[(st["layer"] == top["layer"]) & (st["tensor"] == top["tensor"])]
            means.append(sel["norm"].mean())
        assert top["spread"] == pytest.approx(abs(math.log2(means[0]) - math.log2(means[1])), abs=1e-3)
        assert (diff["spread"].dropna().diff().dropna() <= 1e-12).all() or diff["nonfinite"].any()
        assert top["layer"] in cmp.table.value
    finally:
        cmp.close()


def test_differences_puts_nonfinite_layers_first():
    base = pd.DataFrame({"layer": ["a", "b"], "tensor": ["grad", "grad"], "norm": [1.0, 1.0],
                         "max_abs": [1.0, 1.0], "nonfinite": [0, 0], "underflow_fp16": [0.0, 0.0]})
    other = base.assign(norm=[8.0, 1.0], nonfinite=[0, 3])
    d = differences({"x": base, "y": other})
    assert d["layer"].tolist() == ["b", "a"]
    assert d.set_index("layer").loc["a", "spread"] == pytest.approx(3.0)


def test_the_explorer_follower_redraws_with_at_most_its_share_of_the_time(dash_runs):
    """Following a live run, a slow page (here every redraw 40 ms longer) is redrawn less often:
    the redraws take at most UI_SHARE of the follower's time, however fast rows arrive."""
    import threading

    import torch
    from torch import nn

    from mpviz.dashboard.worker import UI_SHARE

    run_dir, stop = dash_runs / "follow-share", threading.Event()

    def train():   # a job that commits every 50 ms, so new rows are always there to draw
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        with mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=10,
                            flush_every_s=0.05) as rec:
            while not stop.is_set():
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward(); opt.step(); opt.zero_grad()
                rec.step(loss=loss, samples=32)
                time.sleep(0.002)

    job = threading.Thread(target=train, daemon=True)
    job.start()
    try:
        assert _wait(lambda: _has_a_step(run_dir))
        ex = explorer_app(run_dir=run_dir, runs_dir=dash_runs, poll_s=0.01)
        draws: list[float] = []
        slow_part, draw = ex.steer.refresh, ex._draw

        def slow_steer(run):   # inside the timed redraw, like a slow table or figure
            time.sleep(0.04)
            slow_part(run)

        def timed_draw(drill=False):
            t0 = time.perf_counter()
            draw(drill)
            draws.append(time.perf_counter() - t0)

        ex.steer.refresh, ex._draw = slow_steer, timed_draw
        t0 = time.perf_counter()
        # however long a redraw takes on a busy machine: until the fourth of them
        assert _wait(lambda: len(draws) >= 4)   # it follows the run
        elapsed, done = time.perf_counter() - t0, list(draws)
        ex.close()
    finally:
        stop.set()
        job.join(30)
    assert min(done) >= 0.04   # the slow redraws
    # Each redraw waits (1 - UI_SHARE) / UI_SHARE of its own cost (the first follows the open).
    assert sum(done) <= UI_SHARE * elapsed + 2 * max(done), (len(done), sum(done), elapsed)


def test_a_slow_ui_takes_at_most_its_share_of_the_training_thread(tmp_path):
    """The lab's redraws run on the training thread between steps: however slow one is (here
    30 ms, a busy page), they are spaced so that all of them take at most UI_SHARE of it."""
    from mpviz.dashboard.worker import UI_SHARE, TrainingWorker, make_trainer, torch_thread

    trainer = torch_thread.call(make_trainer, "mlp", "fp32", runs_root=str(tmp_path),
                                run_name="ui-share", every=10)
    ticks: list[float] = []

    def slow_ui(worker):
        t0 = time.perf_counter()
        time.sleep(0.03)
        ticks.append(time.perf_counter() - t0)

    w = TrainingWorker([trainer], max_steps=100_000, max_seconds=4.0, on_tick=slow_ui, tick_s=0.0)
    t0 = time.perf_counter()
    w.start()
    w.join()
    elapsed = time.perf_counter() - t0
    assert w.reason == "time limit" and w.rounds > 100
    # Each tick waits (1 - UI_SHARE) / UI_SHARE of its own cost; the last one (the final redraw)
    # comes when training ends, so it may exceed the share by itself.
    assert len(ticks) >= 3
    assert sum(ticks[:-1]) <= UI_SHARE * elapsed + max(ticks), (len(ticks), sum(ticks), elapsed)


def test_evaluations_left_to_the_worker_take_at_most_their_share_and_end_on_the_final_weights(tmp_path):
    """The lab's default: eval_fn as often as it takes at most EVAL_SHARE of the training thread
    (every 25 steps, a digits eval cost 4% of training), and once more on the final weights."""
    from mpviz.dashboard.worker import EVAL_SHARE, TrainingWorker, make_trainer, torch_thread

    trainer = torch_thread.call(make_trainer, "mlp", "fp32", runs_root=str(tmp_path),
                                run_name="eval-share", every=10)
    inner, costs = trainer.eval_fn, []

    def slow_eval(model, batch):   # a held-out set that takes 20 ms
        t0 = time.perf_counter()
        time.sleep(0.02)
        value = inner(model, batch)
        costs.append(time.perf_counter() - t0)
        return value

    trainer.eval_fn = slow_eval
    w = TrainingWorker([trainer], max_steps=100_000, max_seconds=3.0, eval_every=None)
    t0 = time.perf_counter()
    w.start()
    w.join()
    elapsed = time.perf_counter() - t0
    assert w.reason == "time limit" and w.rounds > 100
    steps = [s for s, _ in trainer.evals]
    assert len(steps) >= 3 and steps == sorted(set(steps))
    assert steps[-1] == w.rounds                       # the last one is on the final weights
    assert sum(costs[:-1]) <= EVAL_SHARE * elapsed + max(costs), (len(costs), sum(costs), elapsed)
