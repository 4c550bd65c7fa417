"""A store that cannot be written (full disk, deleted file): training goes on bit-identical,
statistics are dropped first, the small tables are kept, and the run says what was dropped.

A full disk is a file-size limit (RLIMIT_FSIZE, which any user can set) in a subprocess, with
SIGXFSZ ignored so that writes past it fail (EFBIG) as they would on a full disk (ENOSPC)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from torch import nn

import mpviz

TRAIN = textwrap.dedent("""
    import json, os, resource, signal, sqlite3, sys, threading, warnings
    import torch
    from torch import nn
    import mpviz

    run_dir, headroom, kept, want_errors, space_back = sys.argv[1:]
    headroom, kept, want_errors = int(headroom), int(kept), int(want_errors)
    torch.set_num_threads(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    crashed = []
    threading.excepthook = crashed.append
    torch.manual_seed(0)
    x, y = torch.randn(64, 32), torch.randn(64, 32)

    def model_and_opt():  # a 30-layer MLP
        torch.manual_seed(1)
        model = nn.Sequential(*[m for _ in range(15) for m in (nn.Linear(32, 32), nn.ReLU())])
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    def train_step(model, opt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
        return loss

    def on_disk(sql):  # what a reader of the store sees now
        con = sqlite3.connect(f"file:{run_dir}/run.db?mode=ro", uri=True)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()

    def space(n):  # how large a file may grow
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))

    model, opt = model_and_opt()
    n, out = 0, {"written_while_full": []}

    def train(steps):  # then one commit (~50 kB of statistics a step)
        global n
        for _ in range(steps):
            rec.step(loss=train_step(model, opt), samples=64)
            n += 1
        rec.flush()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the timer never fires: the store commits at rec.flush() only
        with mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=1,
                            flush_every_s=600) as rec:
            rec._writer.max_kept_rows = kept
            if headroom < 0:
                space(0)
            else:  # statistics, then the WAL may grow by `headroom` bytes: less than 10 steps
                train(20)
                space(os.path.getsize(f"{run_dir}/run.db-wal") + headroom)
            while len(rec.errors) < want_errors:  # the writer said it could not write
                train(10)
                assert n < 3000, "the store never reported an error"
            for _ in range(5):  # more steps while the disk is full
                train(10)
                if headroom >= 0:  # (with no space at all, a reader cannot open it either)
                    out["written_while_full"].append(on_disk("SELECT MAX(step) FROM steps"))
            out["full_until"] = n
            if space_back == "yes":
                space(resource.RLIM_INFINITY)
                while (on_disk("SELECT MAX(step) FROM layer_stats") or -1) < out["full_until"]:
                    train(10)
                    assert n < out["full_until"] + 300, "statistics were never written again"
    out["steps"] = n
    out["errors"] = rec.errors
    out["warnings"] = [str(w.message) for w in caught]
    out["crashed"] = [repr(a.exc_value) for a in crashed]
    plain, plain_opt = model_and_opt()  # the same training without mpviz
    out["losses"] = [train_step(plain, plain_opt).item() for _ in range(n)]
    out["same_params"] = all(torch.equal(a, b) for a, b in
                             zip(model.state_dict().values(), plain.state_dict().values()))
    print(json.dumps(out))
""")


def train_on_a_full_disk(run_dir, headroom, kept=100_000, want_errors=1, space_back=True):
    """Train in a subprocess, committing every 10 steps, whose files cannot grow past the
    store's WAL after 20 steps plus ``headroom`` bytes (-1: no space from the start), until
    the store reported ``want_errors`` errors, then 50 steps more; with ``space_back``, the
    limit is lifted and training goes on until statistics are written again. The recorder
    keeps at most ``kept`` rows in memory."""
    res = subprocess.run([sys.executable, "-c", TRAIN, str(run_dir), str(headroom), str(kept),
                          str(want_errors), "yes" if space_back else "no"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr  # no thread died
    out = json.loads(res.stdout)
    assert out["crashed"] == []
    assert out["same_params"]  # training bit-identical to the same loop without mpviz
    return out


def test_a_full_disk_drops_statistics_first_keeps_every_step_and_says_so(tmp_path):
    out = train_on_a_full_disk(tmp_path / "r", headroom=256 << 10)
    run = mpviz.load_run(tmp_path / "r")
    n = out["steps"]
    steps = run.steps
    assert steps["step"].tolist() == list(range(n))  # every step the loop made
    assert steps["loss"].tolist() == out["losses"]
    # the small tables were written while the disk was full, by each commit
    full = out["full_until"]
    assert out["written_while_full"] == [full - 1 - 10 * k for k in (4, 3, 2, 1, 0)]
    assert len(run.dtypes[run.dtypes["step"] == 0]) > 0

    with_stats = set(run.layer_stats["step"])
    assert set(run.query("SELECT DISTINCT step FROM histograms")["step"]) == with_stats
    err = run.meta["store_errors"]
    assert err["at_step"] == 20  # the first commit that did not fit
    # dropped from there until they were tried again after space came back; kept before, after
    again = min(s for s in with_stats if s > 20)
    assert set(range(n)) - with_stats == set(range(20, again)) and again >= full
    assert err["statistics_dropped"] == {"from_step": 20, "to_step": again - 1,
                                         "statistics_steps": again - 20}
    assert "rows_dropped" not in err
    assert "I/O error" in err["error"]  # EFBIG; a full disk (ENOSPC) says "disk is full"
    assert run.meta["status"] == "finished"

    said = "could not be written at step 20"
    assert [e for e in out["errors"] if said in e["error"]]
    assert [w for w in out["warnings"] if said in w]
    run.close()


def test_no_space_at_all_keeps_rows_in_bounded_memory_then_writes_them(tmp_path):
    """Not one byte can be written: every commit fails. 200 rows wait in memory (the first
    steps), later rows are dropped, and once there is space the run says which."""
    out = train_on_a_full_disk(tmp_path / "r", headroom=-1, kept=200, want_errors=2)
    run = mpviz.load_run(tmp_path / "r")
    n = out["steps"]
    err = run.meta["store_errors"]
    assert err["at_step"] == 0
    rows = err["rows_dropped"]
    missing = set(range(n)) - set(run.steps["step"])
    # what was dropped is exactly the steps the run lacks, from where memory was full
    assert missing == set(range(rows["from_step"], rows["to_step"] + 1))
    assert rows["rows"] == len(missing) and 0 < rows["from_step"] < out["full_until"]
    kept = run.steps[run.steps["step"] < rows["from_step"]]
    assert kept["loss"].tolist() == out["losses"][:rows["from_step"]]
    after = run.steps[run.steps["step"] > rows["to_step"]]
    assert after["loss"].tolist() == out["losses"][rows["to_step"] + 1:]
    assert len(run.dtypes[run.dtypes["step"] == 0]) + rows["from_step"] == 200
    assert run.meta["status"] == "finished"
    assert err["statistics_dropped"]["from_step"] == 0
    assert any(f"dropped from step {rows['from_step']}" in e["error"] for e in out["errors"])
    run.close()


def test_a_disk_that_stays_full_says_so_at_the_end(tmp_path):
    """No space until the end: the store cannot say what happened (it still says 'running');
    the recorder's errors and a warning at close do."""
    out = train_on_a_full_disk(tmp_path / "r", headroom=-1, space_back=False)
    run = mpviz.load_run(tmp_path / "r")
    assert run.last_step == -1 and run.meta["status"] == "running"
    assert any("could not be written at step 0" in e["error"] for e in out["errors"])
    end = [w for w in out["warnings"] if "could not be written at the end" in w]
    assert len(end) == 1 and f"rows of steps 0..{out['steps'] - 1} " in end[0]
    run.close()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.body(x)


# Not record_demo: bf16 steps on fixed data, an action between two, with and without mpviz.
def _train(model, opt, x, y, steps, rec=None, at=None, do=None):
    losses = []
    for i in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
        if rec is not None:
            rec.step(loss=loss)
        if i == at:
            do()
    return losses


@pytest.mark.usefixtures("one_torch_thread")
def test_a_store_deleted_mid_run(tmp_path, monkeypatch):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Net()
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    run_dir = tmp_path / "r"

    def delete():
        rec.flush()
        for f in os.listdir(run_dir):
            os.remove(run_dir / f)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=1,
                            flush_every_s=0.2) as rec:
            losses = _train(model, opt, x, y, 60, rec, at=19, do=delete)
            rec.flush()  # returns: the writer still serves
    assert losses == _train(ref, ref_opt, x, y, 60)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert crashed == []
    assert os.listdir(run_dir) == []  # not re-created empty
    said = [e["error"] for e in rec.errors]
    assert any("could not be written at step 20" in e and "deleted" in e for e in said)
    assert any("dropped from step 20" in e for e in said)
    assert any("deleted or replaced" in str(w.message) for w in caught)


def test_a_store_that_cannot_be_created_is_not_left_half_made(tmp_path):
    """Creating the store on a full disk fails clearly and leaves nothing that would make the
    next try (with space again) refuse the folder as 'already holds a run'."""
    script = textwrap.dedent("""
        import resource, signal, sys
        from pathlib import Path
        from mpviz.store import RunStoreError, RunWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        path = Path(sys.argv[1]) / "run.db"
        path.parent.mkdir()
        layers = [(0, "", "Net", 0, None, 0, 0)]
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            RunWriter(path, {"status": "running"}, layers)
        except RunStoreError as e:
            print(e)
        print(sorted(p.name for p in path.parent.iterdir()))
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        RunWriter(path, {"status": "running"}, layers).close()
    """)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    error, files = res.stdout.splitlines()
    assert "cannot create the run store" in error and "I/O error" in error
    assert files == "[]"
    run = mpviz.load_run(tmp_path / "r")
    assert run.meta["status"] == "running"
    run.close()
