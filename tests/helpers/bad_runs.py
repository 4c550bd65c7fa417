"""A runs folder holding every bad case the apps must survive (issue 9): stores that are
truncated, corrupt, empty, not SQLite, foreign or newer, a symlink out of the folder, and a run
whose process was SIGKILLed, each made on disk the way it happens, from a real recorded run or a
real `python -m mpviz demo` process. Used by tests/test_apps_bad_input.py (the apps' logic) and
tests/test_browser_bad_input.py (the same cases in Chromium).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import mpviz
from mpviz.dashboard import queries

from helpers.training import record_demo, start_demo

# name -> what the app's one message says (substring). "killed" is readable: its status says it.
EXPECTED = {
    "truncated": "run.db is truncated",
    "corrupt": "run.db is corrupt",
    "empty": "run.db is empty (0 bytes)",
    "garbage": "run.db is not an SQLite file",
    "foreign": "is an SQLite database but not an mpviz run",
    "newer": "newer than this mpviz reads",
    "escape": "refused:",
    "killed": "killed / not finished",
}
UNREADABLE = ("truncated", "corrupt", "empty", "garbage", "foreign", "newer")


def killed_run(run_dir: Path) -> int:
    """Record with a real process and SIGKILL it mid-run; returns the last step it committed."""
    proc = start_demo(run_dir)
    try:
        meta = mpviz.load_run(run_dir).meta
        assert meta["pid"] == proc.pid and queries.run_status(meta) == "running"  # alive: not killed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)   # reaped, as its shell would
    run = mpviz.load_run(run_dir)
    assert run.meta["status"] == "running"   # it never got to say it finished
    return run.last_step


def _table_root_page(db: Path, table: str) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    finally:
        con.close()


def make_bad_runs(root: Path) -> dict[str, Path]:
    """A runs folder with a good recorded run and each bad case next to it (see EXPECTED)."""
    root.mkdir(parents=True, exist_ok=True)
    good = record_demo(root / "good", task="mlp", precision="fp32", steps=30, every=5)
    runs = {"good": good}

    def copy(name: str) -> Path:
        d = root / name
        shutil.copytree(good, d)
        runs[name] = d
        return d / "run.db"

    db = copy("truncated")        # an interrupted copy / full disk: the file's second half is gone
    os.truncate(db, db.stat().st_size // 2)
    db = copy("corrupt")          # damaged in the middle: opens, but its statistics do not read
    page = _table_root_page(db, "layer_stats")
    with open(db, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(os.urandom(4096))
    db = copy("empty")            # killed between creating the file and its first write
    os.truncate(db, 0)
    db = copy("garbage")          # something else saved under the name run.db
    db.write_bytes(os.urandom(8192))
    (root / "foreign").mkdir()    # another program's SQLite database
    con = sqlite3.connect(root / "foreign" / "run.db")
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.commit()
    con.close()
    runs["foreign"] = root / "foreign"
    db = copy("newer")            # written by a future mpviz
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(2),))
    con.commit()
    con.close()
    outside = root.parent / "outside-run"   # a symlink in the runs folder that leads out of it
    shutil.copytree(good, outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    runs["escape"] = root / "escape"
    runs["killed"] = root / "killed"
    killed_run(runs["killed"])
    return runs
