"""`python -m mpviz`: what `demo` and `info` print matches the recorded run, and user errors are
one line `mpviz: error: ...` with exit status 2. Runs the real command in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpviz
from helpers.training import record_demo
from mpviz.demos import Trainer

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mpviz", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def user_error(res: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed as a user error: exit 2, one `mpviz...: error:` line, no traceback."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert re.match(r"mpviz( demo| info)?: error: ", last), res.stderr
    for w in words:
        assert w in last
    return last


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory) -> Path:
    """mlp, fp16 + GradScaler, 19 steps: head in fp32 from the start, fc3 set to fp32 at step 12,
    and a last step whose inputs overflow fp16 in fc1, so GradScaler skips it and backs off."""
    d = tmp_path_factory.mktemp("cli") / "fp16"
    # Not record_demo: a rule changed mid-run and a hand-made overflowing step, inside one Trainer.
    with Trainer(task="mlp", precision="fp16", run_dir=d, every=5, policy={"head": "fp32"}) as t:
        for _ in range(12):
            t.step()
        t.policy_handle.update({"fc3": "fp32"})
        for _ in range(6):
            t.step()
        x, y = next(t.task.batches(seed=1))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = t.task.loss_fn(t.model(x * 1e6), y)  # fc1's output > 65504: inf in fp16
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad()
        t.recorder.step(loss=loss, samples=len(x))
    return d


def test_info_prints_the_recorded_numbers(fp16_run, tmp_path):
    res = cli("info", str(fp16_run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    run = mpviz.load_run(fp16_run)
    steps, changes = run.steps, run.policy_changes
    assert len(steps) == 19 and steps["skipped"].tolist() == [False] * 18 + [True]
    # the scale went down at the last step: the summary ends at the scale after it
    first, used, after = steps["loss_scale"].iloc[0], steps["loss_scale"].iloc[-1], steps["loss_scale_after"].iloc[-1]
    assert after == used / 2
    assert f"loss scale {first:.6g} -> {after:.6g} (min {after:.6g})" in out
    assert f"{len(steps)} steps;" in out and "; 1 skipped by GradScaler;" in out
    tail = steps["loss"].tail(10)
    assert f"loss {steps['loss'].iloc[0]:.4g} -> {tail.mean():.4g} (mean of last 10)" in out
    # the policy the run started with is not a change; the one made at step 12 is
    assert changes[["step", "layer", "precision"]].values.tolist() == [[0, "head", "fp32"], [12, "fc3", "fp32"]]
    assert "initial policy: head=fp32;" in out
    assert "1 per-layer precision changes on 1 steps, last at step 12" in out
    ov = run.overflows
    assert set(ov["step"]) == {18}
    assert f"{len(ov)} overflow events on 1 steps; first culprit 'fc1' at step 18" in out
    assert "GradScaler(growth x2 every 2000 steps, backoff x0.5)" in out
    assert run.stats_schedule == "every 5 steps" and "statistics every 5 steps" in out


def test_info_of_a_run_without_gradscaler_says_so(tmp_path):
    d = record_demo(tmp_path / "fp32", task="mlp", precision="fp32", steps=6)
    res = cli("info", str(d), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "no GradScaler" in res.stdout and "skipped" not in res.stdout
    assert "loss scale" not in res.stdout  # fp32: no scale to show
    assert "initial policy: none" in res.stdout and "no precision changes during training" in res.stdout
    assert f"{len(mpviz.load_run(d).steps)} steps;" in res.stdout


def test_demo_prints_what_it_recorded(tmp_path):
    d = tmp_path / "demo"
    res = cli("demo", "--task", "mlp", "--precision", "fp16", "--steps", "8", "--every", "4",
              "--threads", "1", "--quiet", "--run-dir", str(d), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    steps = mpviz.load_run(d).steps
    assert len(steps) == 8
    tail = steps["loss"].tail(8)
    assert f"final loss {tail.mean():.4f} (mean of last 8), first {steps['loss'].iloc[0]:.4f}" in res.stdout
    assert f"8 steps, {int(steps['skipped'].sum())} skipped by GradScaler, " in res.stdout


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, fp16_run):
    d = tmp_path / "r"
    # a policy naming a layer the model lacks: close matches, and no run directory left behind
    last = user_error(cli("demo", "--task", "mlp", "--policy", "hed=fp32", "--run-dir", str(d),
                          cwd=tmp_path), "'hed'", "'head'")
    assert last.startswith("mpviz: error: ")
    assert not (d / "run.db").exists()
    user_error(cli("demo", "--run-dir", str(fp16_run), cwd=tmp_path), "already holds a run")
    user_error(cli("info", str(tmp_path / "nothing"), cwd=tmp_path), "no run at")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.db").write_bytes(b"not a database" * 100)
    user_error(cli("info", str(tmp_path / "bad"), cwd=tmp_path), "not a readable mpviz run")


@pytest.mark.parametrize("args, words", [
    (["--policy", "head=fp33"], ["--policy", "fp33"]),
    (["--policy", "head"], ["--policy", "LAYER_PATTERN=PRECISION"]),
    (["--lr", "-1"], ["--lr", "must be > 0"]),
    (["--task", "mlpp"], ["--task", "did you mean mlp"]),
    (["--steps", "0"], ["--steps", "must be >= 1"]),
])
def test_bad_demo_arguments_are_argparse_errors(args, words, capsys):
    """Checked while parsing, before anything is built (in-process: argparse's own exit)."""
    from mpviz.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["demo", *args])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mpviz demo: error: argument ")
    assert all(w in last for w in words), last


# ---------------------------------------------------------------- mpviz lab | explore | compare | tour
# (serving them, from the wheel and in Chromium: tests/test_serve.py)
def test_version_is_the_package_version(tmp_path):
    res = cli("--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"mpviz {mpviz.__version__}"


def test_app_commands_refuse_what_they_cannot_serve(tmp_path, fp16_run):
    """Checked before any server starts: one line, exit status 2."""
    user_error(cli("explore", "nowhere", cwd=tmp_path), "no such folder: 'nowhere'")
    user_error(cli("compare", str(fp16_run), str(tmp_path), cwd=tmp_path), "not runs", str(tmp_path))
    user_error(cli("lab", "--model", "mypkg.train", cwd=tmp_path), "write MODULE:FUNCTION")
    user_error(cli("lab", "--model", "nopkg.train:lab_parts", cwd=tmp_path), "no module 'nopkg.train'")
    import socket

    with socket.socket() as s:   # a port in use is refused, not silently moved
        s.bind(("127.0.0.1", 0))
        s.listen()
        user_error(cli("tour", "--no-browser", "--port", str(s.getsockname()[1]), cwd=tmp_path),
                   "is in use")


def test_app_commands_tell_the_notebooks_what_to_show(tmp_path, fp16_run, monkeypatch):
    """What each command puts in the environment, and what the notebook makes of it."""
    import argparse

    from mpviz import serve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    explore = serve._explore_env(argparse.Namespace(path=str(fp16_run)))   # one run: opened
    assert explore == {"MPVIZ_RUNS_DIR": str(fp16_run.parent), "MPVIZ_RUN": str(fp16_run)}
    assert serve._explore_env(argparse.Namespace(path=str(fp16_run.parent))) == {
        "MPVIZ_RUNS_DIR": str(fp16_run.parent)}                             # a folder of runs
    other = record_demo(tmp_path / "more" / "fp32", task="mlp", precision="fp32", steps=2)
    compare = serve._compare_env(argparse.Namespace(paths=[str(fp16_run), str(other)]))
    assert compare["MPVIZ_RUNS_DIR"] == os.path.commonpath([fp16_run, other])
    (tmp_path / "cli_userpkg").mkdir()   # a name no other test imports
    (tmp_path / "cli_userpkg" / "__init__.py").write_text("")
    (tmp_path / "cli_userpkg" / "train.py").write_text(
        "from mpviz.demos import demo_parts\n\ndef lab_parts():\n    return demo_parts('mlp')\n")
    lab = serve._lab_env(argparse.Namespace(runs_dir="runs", model="cli_userpkg.train:lab_parts"))
    assert lab == {"MPVIZ_RUNS_DIR": str(tmp_path / "runs"), "MPVIZ_LAB_MODEL": "cli_userpkg.train:lab_parts"}

    monkeypatch.chdir(ROOT)   # the kernel starts elsewhere; MPVIZ_CWD brings it back
    for key, value in {**explore, **compare, **lab, "MPVIZ_CWD": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    assert serve.from_env("explorer") == {"run_dir": str(fp16_run)}
    assert serve.from_env("compare") == {"runs": [str(fp16_run), str(other)]}
    parts = serve.from_env("lab")
    sys.modules.pop("cli_userpkg.train"), sys.modules.pop("cli_userpkg")
    assert Path.cwd() == tmp_path
    assert {"model", "optimizer", "loss_fn", "data"} <= set(parts) and "meta" not in parts
    for key in ("MPVIZ_RUN", "MPVIZ_COMPARE", "MPVIZ_LAB_MODEL", "MPVIZ_CWD"):
        monkeypatch.delenv(key)
    assert serve.from_env("lab") == serve.from_env("explorer") == serve.from_env("compare") == {}
