"""Small real training runs for the tests: one recorded demo run in this process
(`record_demo`), a demo process recording the way users start one (`demo_process`,
`start_demo`), and one torch thread while training (`one_thread`).

torch and mpviz are imported inside the functions: tests/conftest.py imports this module.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]   # the repository


def record_demo(run_dir, task="mlp", precision="fp32", steps=30, every=5, policy=None, seed=0,
                lr=None) -> Path:
    """Record `steps` real training steps of a demo task (`mpviz.demos.Trainer`) to `run_dir`;
    returns the run dir. `lr=None` is the task's own learning rate; `every=None` is the
    recorder's default statistics schedule."""
    from mpviz.demos import Trainer

    with Trainer(task=task, precision=precision, seed=seed, lr=lr, run_dir=str(run_dir), every=every,
                 policy=policy) as t:
        for _ in range(steps):
            t.step()
    return Path(run_dir)


@contextlib.contextmanager
def one_thread():
    """Train with one torch thread (restored after): on a busy 2-core machine two OpenMP threads
    make these tiny models 10-30x slower. (conftest's `one_torch_thread` fixture is this for a
    whole test module.)"""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def demo_process(run_dir, task="mlp", precision="fp32", steps=1_000_000, every=5,
                 stderr=subprocess.PIPE) -> subprocess.Popen:
    """`python -m mpviz demo ... --quiet` recording to `run_dir`, started as a user starts it (from
    the repository); the caller waits for it and kills it."""
    return subprocess.Popen(
        [sys.executable, "-m", "mpviz", "demo", "--task", task, "--precision", precision, "--steps",
         str(steps), "--every", str(every), "--run-dir", str(run_dir), "--quiet"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)


def start_demo(run_dir: Path) -> subprocess.Popen:
    """A training process started the way users start one, recording to `run_dir` for a long
    time (the caller kills it); returns once it has committed a few steps."""
    import mpviz

    proc = demo_process(run_dir)

    def started() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            return mpviz.load_run(run_dir).last_step >= 5
        except mpviz.RunStoreError:   # not created yet, or its first commit is pending
            return False

    assert wait_for(started), "the demo process did not record 5 steps"
    return proc


def optimizer_step(opt, scaler=None) -> None:
    """The end of an AMP step as users write it: ``scaler.step(opt); scaler.update()`` (or
    ``opt.step()`` without a GradScaler), then ``opt.zero_grad()``."""
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad()
