"""The explorer and compare apps against what a runs folder really holds (issue 9): stores that
are truncated, corrupt, empty, foreign or newer; a run whose process was SIGKILLed; a run
deleted while it is followed; and run paths outside the apps' root. Each bad store is made on
disk the way it happens, from a real recorded run or a real `python -m mpviz demo` process
(tests/helpers/bad_runs.py, shared with tests/test_browser_bad_input.py: the same cases in
Chromium).
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest

import mpviz
from mpviz.dashboard import compare_app, explorer_app, paths, queries

from helpers.bad_runs import EXPECTED, UNREADABLE, make_bad_runs
from helpers.training import start_demo
from waiting import wait_for as _wait

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, Path]:
    return make_bad_runs(tmp_path_factory.mktemp("bad") / "runs")


def test_the_bad_stores_are_really_unreadable(bad_runs):
    """The reference: plain mpviz.load_run + the explorer's queries fail on each of them."""
    for name in UNREADABLE:
        with pytest.raises(paths.STORE_ERRORS):
            run = mpviz.load_run(bad_runs[name])
            queries.snapshot(run)
    run = mpviz.load_run(bad_runs["escape"])   # readable: only the confinement refuses it
    assert run.last_step == 29


def _loss_points(app) -> int:
    return len(app.fig.trace("loss", 0).x)


def test_explorer_shows_one_message_per_bad_run_and_keeps_working(bad_runs, capfd):
    root = bad_runs["good"].parent
    ex = explorer_app(runs_dir=root, follow=True, poll_s=0.1)
    try:
        listed = {Path(v).name for _, v in ex.picker.options}
        assert listed >= set(EXPECTED) | {"good"}
        for name in [*UNREADABLE, "escape"]:
            ex.picker.value = str(root / name)
            assert EXPECTED[name] in ex.info.value, (name, ex.info.value)
            assert ex.info.value.count("mpviz-problem") == 1
            assert ex.run is None and ex.follower.thread is None and _loss_points(ex) == 0, name
            assert ex.range.value == (0, 0)
            assert ex.layer.options == (("(pick a layer)", ""),)
            # ... and the app keeps working: the good run is drawn after it.
            ex.picker.value = str(root / "good")
            assert ">30</span> steps · finished" in ex.info.value
            assert _loss_points(ex) == 30
        out, err = capfd.readouterr()
        assert "Traceback" not in out + err
    finally:
        ex.close()


def test_explorer_shows_a_killed_run_as_killed_and_does_not_follow_it(bad_runs):
    d = bad_runs["killed"]
    steps = mpviz.load_run(d).steps
    ex = explorer_app(run_dir=d, runs_dir=d.parent, follow=True, poll_s=0.1)
    try:
        assert f">{len(steps)}</span> steps · killed / not finished" in ex.info.value
        assert "following" not in ex.info.value and ex.follower.thread is None
        # What it wrote, drawn (over 2000 steps: the first step of each bucket of k steps).
        k = queries.bucket_size(0, len(steps) - 1, 2000)
        assert [int(x) for x in ex.fig.trace("loss", 0).x] == steps["step"].tolist()[::k]
        assert ex.range.value == (0, len(steps) - 1)
    finally:
        ex.close()


def test_explorer_stops_following_a_run_deleted_while_open(bad_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(bad_runs["good"], root / "good")
    live = root / "live"
    proc = start_demo(live)
    try:
        ex = explorer_app(run_dir=live, runs_dir=root, follow=True, poll_s=0.1)
        try:
            assert ex.follower.thread is not None
            seen = ex.last_seen
            assert _wait(lambda: ex.last_seen > seen)     # it follows the other process
            assert _wait(lambda: " · following" in ex.info.value)
            shutil.rmtree(live)                            # ... which goes on writing
            assert _wait(lambda: "was deleted while open" in ex.info.value), ex.info.value
            assert _wait(lambda: ex.follower.thread is None)
            assert ex.run is None and _loss_points(ex) == 0
            assert proc.poll() is None                     # the training process is unharmed
            ex.picker.value = str(root / "good")           # pick another run: drawn
            assert _loss_points(ex) == 30 and ">30</span> steps" in ex.info.value
            ex.picker.value = str(live)                    # still listed until Rescan
            assert "live: the run directory no longer exists" in ex.info.value
            ex.rescan()
            assert str(live) not in [v for _, v in ex.picker.options]
        finally:
            ex.close()
    finally:
        proc.kill()
        proc.wait(30)


def test_compare_draws_the_good_runs_and_names_each_bad_one(bad_runs, tmp_path):
    root = bad_runs["good"].parent
    good = str(bad_runs["good"])
    cmp = compare_app(runs=[good, str(bad_runs["killed"])], runs_dir=root)
    try:
        assert "2 runs:" in cmp.info.value and "mpviz-problem" not in cmp.info.value
        for name in UNREADABLE:
            cmp.select([good, str(bad_runs[name])])
            assert EXPECTED[name] in cmp.info.value, (name, cmp.info.value)
            assert cmp.info.value.count("mpviz-problem") == 1
            assert len(cmp.fig.trace("loss-step:0").x) == 30      # the good run is drawn
            assert not cmp.fig.trace("loss-step:1").visible
        cmp.select([good, str(bad_runs["escape"])])
        assert "refused:" in cmp.info.value and len(cmp.fig.trace("loss-step:0").x) == 30
    finally:
        cmp.close()
    # A run deleted while the comparison shows it.
    other = tmp_path / "runs"
    shutil.copytree(bad_runs["good"], other / "a")
    shutil.copytree(bad_runs["good"], other / "b")
    cmp = compare_app(runs=[other / "a", other / "b"], runs_dir=other)
    try:
        assert "2 runs:" in cmp.info.value
        shutil.rmtree(other / "b")
        cmp.refresh()
        assert "b was deleted while open" in cmp.info.value
        assert "1 runs:" in cmp.info.value and len(cmp.fig.trace("loss-step:0").x) == 30
    finally:
        cmp.close()


# --------------------------------------------------------------------------- confinement
def test_confine_accepts_only_paths_that_resolve_under_the_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    (root / "exp").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "inner-link").symlink_to(root / "exp")
    (root / "out-link").symlink_to(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    exp = (root / "exp").resolve()
    for ok in ("exp", "runs/exp", root / "exp", "runs/../runs/exp", "runs/exp/run.db"):
        assert paths.confine(root, ok) == exp, ok
    assert paths.confine(root, "inner-link") == exp
    for bad in ("../elsewhere", "runs/../elsewhere", tmp_path / "elsewhere", "/etc", "out-link",
                "runs/out-link", root / "out-link" / "run.db", "exp/../../elsewhere"):
        with pytest.raises(paths.RunUnavailable, match="refused: .* is outside the runs folder"):
            paths.confine(root, bad)


def test_apps_refuse_run_dirs_outside_their_root(bad_runs):
    root = bad_runs["good"].parent
    outside = root.parent / "outside-run"          # a real, readable run
    assert mpviz.load_run(outside).last_step == 29
    rel_escape = os.path.relpath(outside, Path.cwd())
    for given in (outside, rel_escape, root / ".." / "outside-run", root / "escape"):
        ex = explorer_app(run_dir=given, runs_dir=root, follow=False)
        try:
            assert "refused:" in ex.info.value and "outside the runs folder" in ex.info.value, given
            assert ex.run is None and _loss_points(ex) == 0
            if given != root / "escape":   # (that one is in the folder, so it is listed)
                assert str(given) not in [v for _, v in ex.picker.options]
        finally:
            ex.close()
        cmp = compare_app(runs=[bad_runs["good"], given], runs_dir=root)
        try:
            assert "refused:" in cmp.info.value and "1 runs:" in cmp.info.value, given
        finally:
            cmp.close()
    # Inside the root, the same app opens what it is given.
    ex = explorer_app(run_dir=root / "good", runs_dir=root, follow=False)
    try:
        assert ex.run is not None and _loss_points(ex) == 30
    finally:
        ex.close()


# --------------------------------------------------------------------------- no pickle
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def pickle_uses(source: str) -> list[str]:
    """Calls that can unpickle (run code from a file) in `source`: `pickle`-like imports,
    pandas `read_pickle`, numpy `load(allow_pickle=True)`, `torch.load` without
    `weights_only=True`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("read_pickle") or name.endswith("Unpickler"):
                found.append(name)
            elif kw.get("allow_pickle") not in (None, "False"):
                found.append(f"{name}(allow_pickle={kw['allow_pickle']})")
            elif name == "torch.load" and kw.get("weights_only") != "True":
                found.append("torch.load without weights_only=True")
    return found


def test_pickle_finder_finds_what_it_looks_for():
    for bad in ("import pickle", "from joblib import load", "pd.read_pickle(p)",
                "np.load(p, allow_pickle=True)", "torch.load(p)", "torch.load(p, weights_only=False)"):
        assert pickle_uses(bad), bad
    for fine in ("np.load(p)", "np.load(p, allow_pickle=False)", "torch.load(p, weights_only=True)",
                 "json.loads(s)"):
        assert not pickle_uses(fine), fine


def test_no_pickle_anywhere_in_the_package():
    files = sorted((ROOT / "mpviz").rglob("*.py"))
    assert len(files) > 20
    hits = {str(f.relative_to(ROOT)): pickle_uses(f.read_text()) for f in files}
    assert not {f: h for f, h in hits.items() if h}
