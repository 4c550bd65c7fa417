"""Shared pytest fixtures. Each issue keeps its fixtures in one marked block. Shared helpers
that are not fixtures live in tests/helpers/ (importable as `helpers.*`: pytest puts tests/ on
sys.path, as for models.py and waiting.py)."""

import pytest as _pytest

from helpers.browser import browser, shots  # noqa: F401  (fixtures: see the browser block below)
from helpers.training import one_thread as _one_thread
from helpers.training import record_demo as _record_demo


# ---------------------------------------------------------------- dashboard fixtures (issue 4)
# Used by tests/test_dashboard.py, test_notebooks.py, test_browser.py. Keep this block together.

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
    a = _record_demo(root / "digits-fp32", task="digits", precision="fp32", steps=30)
    b = _record_demo(root / "digits-fp16", task="digits", precision="fp16", steps=30)
    return root, a, b
# ---------------------------------------------------------------- end of dashboard fixtures


# ---------------------------------------------------------------- one torch thread
@_pytest.fixture(scope="module")
def one_torch_thread():
    """Train with one torch thread, restored after: on a shared 2-core machine torch's two
    intra-op threads spin-wait on each other when another process holds a core (steps measured
    20-30x slower). Use as `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    with _one_thread():
        yield


# ---------------------------------------------------------------- browser fixtures
# `browser` (Debian's Chromium through Playwright; skips without it, fails under CI or
# $MPVIZ_SCREENSHOTS) and `shots` (the screenshots folder), from tests/helpers/browser.py, for
# the test_browser*.py files (imported at the top of this file). test_serve.py defines
# its own `browser`.
