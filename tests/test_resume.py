"""A job restarted from a checkpoint continues its run; run stores are claimed atomically; a
store on a network filesystem is warned about (issue 9)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import mpviz
from mpviz.store import RunStoreError, RunWriter, filesystem_type, warn_if_network_filesystem

F = nn.functional

TRAIN = textwrap.dedent("""
    import sys, torch, mpviz
    from torch import nn
    run_dir, ckpt = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=2, flush_every_s=0.05) as rec:
        for step in range(12):
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            rec.step(loss=loss, samples=8)
            if step == 5:  # the checkpoint holds the state after step 5
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt)
        rec.flush()
        print("steps written", flush=True)
        sys.stdin.read()  # killed here, before the recorder closes
""")


def test_a_killed_job_resumed_from_its_checkpoint_continues_its_run(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(run_dir), str(ckpt)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "steps written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    before = mpviz.load_run(run_dir)
    assert before.meta["status"] == "running" and before.steps["step"].tolist() == list(range(12))
    stale = {t: int((getattr(before, t)["step"] >= 6).sum())
             for t in ("steps", "layer_stats", "dtypes", "overflows", "policy_changes")}
    with sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True) as con:
        stale["histograms"] = con.execute(
            "SELECT COUNT(*) FROM histograms WHERE step >= 6").fetchone()[0]

    # The restarted job: same model, state from the checkpoint, steps 6..9.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = torch.load(ckpt, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    with pytest.raises(RunStoreError, match="already holds a run.*resume=True"):
        mpviz.Recorder(model, optimizer=opt, run_dir=run_dir).attach()
    with mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=2, resume=True,
                        start_step=6) as rec:
        for _ in range(4):
            x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, samples=8)
    run = mpviz.load_run(run_dir)
    assert run.steps["step"].tolist() == list(range(10))  # 0-5 kept, 6-9 new, 10-11 gone
    assert run.steps["loss"].iloc[:6].tolist() == before.steps["loss"].iloc[:6].tolist()
    (resumed,) = run.meta["resumed"]
    assert resumed["at_step"] == 6 and resumed["previous_status"] == "running"
    assert resumed["dropped_rows"] == sum(stale.values()) > 0
    assert run.meta["status"] == "finished"
    assert sorted(set(run.layer_stats["step"])) == [0, 2, 4, 6, 8]


def test_resume_refuses_a_run_of_another_model_and_starts_fresh_without_one(tmp_path):
    a = nn.Sequential(nn.Linear(4, 4))
    with mpviz.Recorder(a, run_dir=tmp_path / "r") as rec:
        a(torch.randn(2, 4)).sum().backward()
        rec.step()
    b = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(RunStoreError, match="other layers"):
        mpviz.Recorder(b, run_dir=tmp_path / "r", resume=True, start_step=1).attach()
    assert mpviz.load_run(tmp_path / "r").meta["status"] == "finished"  # untouched
    with mpviz.Recorder(b, run_dir=tmp_path / "new", resume=True, start_step=3) as rec:
        b(torch.randn(2, 4)).sum().backward()
        rec.step()
    assert mpviz.load_run(tmp_path / "new").steps["step"].tolist() == [3]


def test_two_writers_racing_for_one_run_dir_never_share_it(tmp_path):
    path = tmp_path / "run.db"
    results: list[str] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        barrier.wait()
        try:
            RunWriter(path, {"status": "running"}, []).close()
            results.append("ok")
        except RunStoreError:
            results.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok", "refused", "refused", "refused"]


def test_a_store_on_a_network_filesystem_is_warned_about(tmp_path):
    mounts = ("/dev/sda1 / ext4 rw 0 0\n"
              "server:/export /mnt/shared nfs4 rw,relatime 0 0\n"
              "tmpfs /mnt/shared/local tmpfs rw 0 0\n")
    assert filesystem_type("/mnt/shared/runs/a", mounts) == "nfs4"
    assert filesystem_type("/mnt/shared/local/a", mounts) == "tmpfs"  # the deepest mount wins
    assert filesystem_type("/mnt/sharedx", mounts) == "ext4"
    with pytest.warns(RuntimeWarning, match="network filesystem \\(nfs4\\).*local disk"):
        assert warn_if_network_filesystem("/mnt/shared/runs", mounts)
    assert not warn_if_network_filesystem("/home/me/runs", mounts)
    if os.path.exists("/proc/mounts"):  # this machine's own table is read
        assert filesystem_type(tmp_path) is not None
