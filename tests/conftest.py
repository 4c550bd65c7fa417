"""Shared pytest fixtures. Each issue keeps its fixtures in one marked block."""

# ---------------------------------------------------------------- dashboard fixtures (issue 4)
# Used by tests/test_dashboard.py, test_notebooks.py, test_browser.py. Keep this block together.
from pathlib import Path as _Path

import pytest as _pytest


def record_demo(run_dir, task="mlp", precision="fp32", steps=30, every=5, policy=None, seed=0):
    """Record `steps` real training steps of a demo task to `run_dir`; returns the run dir."""
    from mpviz.demos import Trainer

    with Trainer(task=task, precision=precision, seed=seed, run_dir=str(run_dir), every=every,
                 policy=policy) as t:
        for _ in range(steps):
            t.step()
    return _Path(run_dir)


@_pytest.fixture
def dash_runs(tmp_path, monkeypatch):
    """An empty runs folder that the apps use ($MPVIZ_RUNS_DIR points at it)."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("MPVIZ_RUNS_DIR", str(root))
    return root


@_pytest.fixture(scope="module")
def dash_two_runs(tmp_path_factory):
    """Two finished digits runs, fp32 and fp16 (same seed and data), 30 steps each."""
    root = tmp_path_factory.mktemp("runs2")
    a = record_demo(root / "digits-fp32", task="digits", precision="fp32", steps=30)
    b = record_demo(root / "digits-fp16", task="digits", precision="fp16", steps=30)
    return root, a, b
# ---------------------------------------------------------------- end of dashboard fixtures


# ---------------------------------------------------------------- one torch thread
@_pytest.fixture(scope="module")
def one_torch_thread():
    """Train with one torch thread, restored after: on a shared 2-core machine torch's two
    intra-op threads spin-wait on each other when another process holds a core (steps measured
    20-30x slower). Use as `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
