"""The run store: readable from another process while written, survives SIGKILL, versioned."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import mpviz
from mpviz.store import SCHEMA_VERSION

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
            print(step, flush=True)
            time.sleep(0.05)
""")


def start_trainer(run_dir, steps):
    return subprocess.Popen([sys.executable, "-c", TRAINER, str(run_dir), str(steps)],
                            stdout=subprocess.PIPE, text=True)


def wait_for_steps(proc, n):
    for line in proc.stdout:
        if int(line) >= n - 1:
            return int(line)
    raise AssertionError("trainer ended early")


def test_another_process_reads_a_run_while_it_is_written(tmp_path):
    proc = start_trainer(tmp_path / "r", 60)
    try:
        wait_for_steps(proc, 5)
        time.sleep(0.5)  # > flush_every_s
        run = mpviz.load_run(tmp_path / "r")
        first = run.last_step
        assert first >= 4 and run.is_live
        wait_for_steps(proc, first + 15)
        time.sleep(0.5)
        assert run.last_step > first  # the same Run object follows the live run
        assert list(run.steps["step"]) == list(range(run.last_step + 1))
    finally:
        proc.wait(timeout=60)
    assert not run.is_live and run.last_step == 59


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path):
    proc = start_trainer(tmp_path / "r", 10_000)
    printed = wait_for_steps(proc, 20)
    time.sleep(0.5)  # two flush intervals: everything printed so far must be committed
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = mpviz.load_run(tmp_path / "r")  # reopens cleanly
    steps = run.steps
    assert run.last_step >= printed
    assert list(steps["step"]) == list(range(len(steps)))  # no holes, no torn rows
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


def test_list_runs_newest_first(tmp_path):
    from torch import nn

    for name in ("a", "b"):
        with mpviz.Recorder(nn.Linear(2, 2), run_dir=tmp_path / name):
            pass
        time.sleep(0.05)
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
