"""The run store: readable from another process while written, survives SIGKILL, versioned."""
from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import mpviz
from mpviz.schema import DiagnosticRow, LayerRow, StepRow, values
from mpviz.store import SCHEMA_VERSION, Rows, RunWriter

TRAINER = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    import mpviz
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    with mpviz.Recorder(model, optimizer=opt, run_dir=sys.argv[1], flush_every_s=0.2) as rec:
        for step in range(int(sys.argv[2])):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            rec.step(loss=loss, samples=256)
            print(step, repr(time.time()), flush=True)  # when the step was done
            if len(sys.argv) > 3:
                sys.stdin.readline()  # gated: the test says when to go on (EOF: run free)
""")


def start_trainer(run_dir, steps, gated=False):
    """A training process (flush_every_s=0.2) that prints each step it finished and when;
    ``gated``: it waits after each step for a line on its stdin (see :func:`go_on`)."""
    return subprocess.Popen([sys.executable, "-c", TRAINER, str(run_dir), str(steps)]
                            + (["gated"] if gated else []),
                            stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)


def go_on(proc, steps):
    """Let a gated trainer do ``steps`` more steps."""
    proc.stdin.write("\n" * steps)
    proc.stdin.flush()


def wait_for_steps(proc, n):
    for line in proc.stdout:
        if int(line.split()[0]) >= n - 1:
            return int(line.split()[0])
    raise AssertionError("trainer ended early")


def wait_until(condition, what: str, timeout: float = 30.0):
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def test_another_process_reads_a_run_while_it_is_written(tmp_path):
    proc = start_trainer(tmp_path / "r", 60, gated=True)
    try:
        go_on(proc, 4)
        wait_for_steps(proc, 5)  # steps 0..4 done; it waits
        run = mpviz.load_run(tmp_path / "r")
        wait_until(lambda: run.last_step == 4, "the first 5 steps to be committed")
        assert run.is_live
        go_on(proc, 15)
        wait_for_steps(proc, 20)
        # the same Run object follows the live run
        wait_until(lambda: run.last_step == 19, "later steps to reach the same Run")
        assert list(run.steps["step"]) == list(range(20))
    finally:
        proc.stdin.close()  # run free to the end
        proc.wait(timeout=60)
    assert not run.is_live and run.last_step == 59


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path):
    """Killed at a moment unrelated to its commits, a run still has every step that was done
    more than flush_every_s (0.2 s) before the kill, give or take a busy machine's delays
    (``slack``). Fails when commits are not periodic, or ten times rarer (2 s: 1.2-1.4 s lost)."""
    flush_every_s, slack = 0.2, 0.5
    proc = start_trainer(tmp_path / "r", 1_000_000)
    done = {}  # step -> when the trainer had done it (its own clock)
    kill_after = 3.2 + random.uniform(0, flush_every_s)  # any phase of the writer's timer
    for line in proc.stdout:
        step, t = line.split()
        done[int(step)] = float(t)
        if float(t) - done[0] > kill_after:
            break
    killed_at = time.time()
    proc.send_signal(signal.SIGKILL)
    for line in proc.stdout:  # steps printed before the kill, not read yet
        step, t = line.split()
        done[int(step)] = float(t)
    proc.wait(timeout=30)
    run = mpviz.load_run(tmp_path / "r")  # reopens cleanly
    steps = run.steps
    assert list(steps["step"]) == list(range(len(steps)))  # no holes, no torn rows
    must_have = [s for s, t in done.items() if t < killed_at - flush_every_s - slack]
    assert len(must_have) > len(done) / 2  # the claim covers most of the run
    lost = [s for s, t in done.items() if s > run.last_step]
    assert run.last_step >= max(must_have), (
        f"steps done up to {killed_at - done[run.last_step + 1]:.2f} s before the kill were "
        f"lost ({len(lost)} steps)")
    assert run.meta["status"] == "running"  # it never said it finished
    con = sqlite3.connect(run.path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_newer_schema_and_corrupt_store_give_clear_errors(tmp_path):
    import torch
    from torch import nn

    model = nn.Linear(2, 2)
    with mpviz.Recorder(model, run_dir=tmp_path / "new") as rec:
        model(torch.randn(1, 2)).sum().backward()
        rec.step(loss=0.0)
    con = sqlite3.connect(tmp_path / "new" / "run.db")
    with con:
        con.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                    (json.dumps(SCHEMA_VERSION + 1),))
    con.close()
    with pytest.raises(mpviz.RunStoreError, match="newer than this mpviz reads.*upgrade"):
        mpviz.load_run(tmp_path / "new")

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(mpviz.RunStoreError, match="not a readable mpviz run"):
        mpviz.load_run(tmp_path / "bad")
    with pytest.raises(mpviz.RunStoreError, match="does not exist"):
        mpviz.load_run(tmp_path / "nothing")


# Schema version 1 as mpviz has always written it, (column, type, primary key) per table and
# (index: columns): runs recorded before must open, and a change needs a new SCHEMA_VERSION.
V1_TABLES = {
    "meta": "key TEXT pk, value TEXT",
    "layers": "idx INTEGER pk, layer TEXT, type TEXT, n_params INTEGER, param_dtype TEXT, "
              "depth INTEGER, is_leaf INTEGER",
    "steps": "step INTEGER pk, loss REAL, loss_scale REAL, loss_scale_after REAL, skipped INTEGER, "
             "nonfinite_grads INTEGER, step_time_s REAL, samples INTEGER, samples_per_s REAL, "
             "wall_time REAL",
    "layer_stats": "step INTEGER, layer_idx INTEGER, tensor TEXT, dtype TEXT, norm REAL, "
                   "max_abs REAL, min_abs_nonzero REAL, zeros INTEGER, nonfinite INTEGER, "
                   "underflow_fp16 INTEGER, overflow_fp16 INTEGER, underflow_bf16 INTEGER, "
                   "overflow_bf16 INTEGER, numel INTEGER",
    "dtypes": "step INTEGER, layer_idx INTEGER, tensor TEXT, dtype TEXT",
    "overflows": "step INTEGER, layer_idx INTEGER, tensor TEXT, phase TEXT, first INTEGER, "
                 "nonfinite INTEGER, skipped INTEGER, origin INTEGER",
    "histograms": "step INTEGER, layer_idx INTEGER, tensor TEXT, lo INTEGER, counts BLOB",
    "policy_changes": "step INTEGER, layer_idx INTEGER, precision TEXT, rule TEXT",
    "diagnostics": "step INTEGER, layer_idx INTEGER, kind TEXT, metric TEXT, value REAL",
}
V1_INDEXES = {"layer_stats_step": "step", "layer_stats_layer": "layer_idx, tensor, step",
              "histograms_layer": "layer_idx, tensor, step"}


def test_a_new_store_has_the_version_1_schema(tmp_path):
    RunWriter(tmp_path / "run.db", {"status": "running"}, []).close()
    con = sqlite3.connect(tmp_path / "run.db")
    tables = {t: ", ".join(f"{name} {type_}" + (" pk" if pk else "") for _, name, type_, _, _, pk
                           in con.execute(f"PRAGMA table_info({t})"))
              for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    indexes = {name: ", ".join(c[2] for c in con.execute(f"PRAGMA index_info({name})"))
               for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                          "AND name NOT LIKE 'sqlite_%'")}
    con.close()
    assert SCHEMA_VERSION == 1 and tables == V1_TABLES and indexes == V1_INDEXES


def test_rows_reach_their_columns_by_name(tmp_path):
    """Records (mpviz.schema) and whole columns are matched to the table's columns by name."""
    w = RunWriter(tmp_path / "run.db", {"status": "running"},
                  [values(LayerRow(idx=0, layer="", type="Net", n_params=3, param_dtype=None,
                                   depth=0, is_leaf=1))])
    w.write([StepRow(wall_time=9.0, samples_per_s=None, samples=8, step_time_s=0.25,
                     nonfinite_grads=0, skipped=1, loss_scale_after=None, loss_scale=None,
                     loss=0.5, step=3)])
    w.put_later(lambda items: [Rows.columns(DiagnosticRow, value=[1.5], metric=["m"],
                                            kind=["k"], layer_idx=[0], step=items)], 4)
    w.close()
    con = sqlite3.connect(tmp_path / "run.db")
    assert con.execute("SELECT * FROM steps").fetchall() == [
        (3, 0.5, None, None, 1, 0, 0.25, 8, None, 9.0)]
    assert con.execute("SELECT * FROM diagnostics").fetchall() == [(4, 0, "k", "m", 1.5)]
    assert con.execute("SELECT * FROM layers").fetchall() == [(0, "", "Net", 3, None, 0, 1)]
    con.close()
    with pytest.raises(ValueError, match="diagnostics has the columns"):
        Rows.columns(DiagnosticRow, step=[1], layer_idx=[0], kind=["k"], metric=["m"])


def test_list_runs_newest_first(tmp_path):
    from torch import nn

    for name in ("a", "b"):
        with mpviz.Recorder(nn.Linear(2, 2), run_dir=tmp_path / name):
            pass
        if name == "a":  # until the file system's clock shows a later time than a's
            a_time, probe = (tmp_path / "a" / "run.db").stat().st_mtime, tmp_path / "probe"
            wait_until(lambda: probe.touch() or probe.stat().st_mtime > a_time,
                       "a file modification time after a's")
    assert [p.name for p in mpviz.list_runs(tmp_path)] == ["b", "a"]


def test_a_writer_that_falls_behind_blocks_training_instead_of_filling_memory(tmp_path):
    """Statistics wait in memory for the writer thread; past max_pending_bytes, step() waits."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    # the timer never fires in this test: only the memory bound makes the writer write
    with mpviz.Recorder(model, optimizer=opt, run_dir=tmp_path / "r", every=1,
                        flush_every_s=600) as rec:
        rec._writer.max_pending_bytes = 1
        con = sqlite3.connect(tmp_path / "r" / "run.db")
        for step in range(3):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            rec.step(loss=loss, samples=64)
            n = con.execute("SELECT COUNT(*) FROM layer_stats WHERE step = ?", (step,)).fetchone()
            assert n[0] > 0  # already written, without a flush or the timer
        con.close()


def test_histogram_names_what_is_wrong_instead_of_an_empty_frame(tmp_path):
    """Unknown layer or tensor: close matches; a step without statistics: the nearest ones."""
    from helpers.training import record_demo

    run = mpviz.load_run(record_demo(tmp_path / "r", task="mlp", steps=12, every=5))
    stats = run.layer_stats
    grads = stats[(stats.layer == "fc1") & (stats.tensor == "grad")]
    assert grads["step"].tolist() == [0, 5, 10]
    for step in (0, 5, 10, None):
        h = run.histogram("fc1", "grad", step=step)
        assert h.attrs["step"] == (10 if step is None else step)
        assert h["count"].sum() == grads.set_index("step").loc[h.attrs["step"], "numel"]
    with pytest.raises(ValueError, match=r"no layer 'fc11'.*close matches: 'fc1'"):
        run.histogram("fc11", "grad")
    with pytest.raises(ValueError, match=r"unknown tensor 'grads'.*close matches: 'grad'"):
        run.histogram("fc1", "grads")
    with pytest.raises(ValueError, match=r"at step 7: .*every 5 steps\); nearest: 5 and 10"):
        run.histogram("fc1", "grad", step=7)
    with pytest.raises(ValueError, match=r"at step 99: .*nearest: 10$"):
        run.histogram("fc1", "grad", step=99)
    with pytest.raises(ValueError, match=r"no weight histogram of 'act1' .*\(it has activation\)"):
        run.histogram("act1", "weight")


def test_the_views_the_apps_draw_agree_with_the_recorded_tables(tmp_path):
    """Run's bucketed and per-layer reads (what the explorer, the report and advise show) equal
    the same reductions done with pandas over the full tables the recorder wrote."""
    import numpy as np

    from helpers.training import record_demo

    run = mpviz.load_run(record_demo(tmp_path / "r", task="mlp", precision="fp16", steps=23, every=2))
    steps, stats = run.steps, run.layer_stats
    lo, hi, k = 3, 20, 4
    got = run.step_buckets(lo, hi, k)
    part = steps[steps["step"].between(lo, hi)]
    want = part.groupby((part["step"] - lo) // k).agg(step=("step", "min"), loss=("loss", "mean"),
                                                       loss_scale=("loss_scale", "min"))
    assert got["step"].tolist() == want["step"].tolist()
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)
    np.testing.assert_array_equal(got["loss_scale"], want["loss_scale"])
    assert run.step_range() == (0, 22)
    assert run.stats_steps(lo, hi).tolist() == sorted(set(stats["step"]) & set(range(lo, hi + 1)))

    grads = stats[(stats["tensor"] == "grad") & stats["step"].between(lo, hi)]
    names = run.layer_names()
    cells = run.grad_norm_buckets(lo, hi, k)
    got = {(names[i], b): v for i, b, v in zip(cells["idx"], cells["b"], cells["norm"])}
    want = grads.groupby(["layer", (grads["step"] - lo) // k])["norm"].max().to_dict()
    assert got == want
    at = [4, 10]
    cells = run.grad_norms_at(at)
    assert sorted((names[i], s, v) for i, s, v in zip(cells["idx"], cells["step"], cells["norm"])) == \
        sorted(zip(*[stats.loc[(stats["tensor"] == "grad") & stats["step"].isin(at), c]
                     for c in ("layer", "step", "norm")]))

    acts = stats[(stats["tensor"] == "activation") & ~stats["step"].isin([0, 2])]
    peaks = run.peak_max_abs("activation", skip_steps=[0, 2])
    want = acts.groupby("layer", sort=False)["max_abs"].max()
    assert peaks["layer"].tolist() == want.index.tolist()
    assert peaks["max_abs"].tolist() == want.tolist()

    latest = run.latest_stats().set_index(["layer", "tensor"])
    last = stats.sort_values("step").groupby(["layer", "tensor"]).last()
    assert latest["norm"].to_dict() == last["norm"].to_dict()

    drill = run.layer_buckets("fc1", lo, hi, k)
    g = stats[(stats["layer"] == "fc1") & (stats["tensor"] == "grad") & stats["step"].between(lo, hi)]
    g = g.groupby((g["step"] - lo) // k).agg(step=("step", "min"), norm=("norm", "mean"),
                                             max_abs=("max_abs", "max"))
    d = drill[drill["tensor"] == "grad"]
    assert d["step"].tolist() == g["step"].tolist()
    np.testing.assert_allclose(d["norm"], g["norm"], rtol=1e-12)
    assert d["max_abs"].tolist() == g["max_abs"].tolist()

    have = run.histogram_steps("fc1", "grad", lo, hi)
    assert have == sorted(grads.loc[grads["layer"] == "fc1", "step"])
    got_steps, counts = run.histograms_of("fc1", "grad", have)
    assert got_steps == have
    numel = grads.loc[grads["layer"] == "fc1", "numel"].iloc[0]
    for s, row in zip(have, counts):
        assert row[row > 0].tolist() == run.histogram("fc1", "grad", step=s)["count"].tolist()
        assert row.sum() == numel
    run.close()
