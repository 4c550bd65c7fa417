"""The steering mailbox: the ``requests`` table of ``run_dir/steer.db``, beside the ``run.db``
that only the recorder writes. No socket, no server, no torch.

    >>> rid = mpviz.steer("runs/exp1", {"head": "fp32"})     # doctest: +SKIP
    >>> mpviz.steer_status("runs/exp1", rid)["status"]        # doctest: +SKIP
    'applied'

Any process that can write the run directory posts ``{layer or glob: precision or None}``
(:func:`post`, through ``mpviz.steer``); a job recorded with ``Recorder(..., steerable=True)``
looks at the end of each step (:class:`Inbox`, one ``PRAGMA data_version``), checks each request
as ``PolicyHandle.update`` does, and marks it ``applied`` (``step``: the first step computed with
it) or ``refused`` (``reason``). File permissions are the access control.

Local filesystems only: SQLite's WAL mode shares memory between the processes that open the
file, which network filesystems (NFS, SMB, sshfs, cloud-drive mounts) do not provide; the two
sides may then miss each other's writes or corrupt the file. Run the explorer on the machine that
trains (reach it through an SSH tunnel).
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .store import db_path

__all__ = ["steer_status", "steer_requests", "SteerError", "STEER_DB", "Inbox", "post",
           "check_rules", "process_gone", "run_status"]

STEER_DB = "steer.db"
PENDING, APPLIED, REFUSED = "pending", "applied", "refused"
COLUMNS = ["id", "time", "rules", "status", "step", "reason"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL, rules TEXT, status TEXT, step INTEGER,
    reason TEXT, done_time REAL);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status);
"""
FIX = "record the job with mpviz.Recorder(..., steerable=True)"


class SteerError(RuntimeError):
    """A steering request that cannot be posted: no run, not steerable, or not running."""


def steer_path(run_dir: str | os.PathLike) -> Path:
    """The mailbox file of a run directory."""
    return db_path(run_dir).parent / STEER_DB


def connect(run_dir: str | os.PathLike, timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open (creating if needed) the mailbox of ``run_dir``; both sides call this."""
    con = sqlite3.connect(steer_path(run_dir), timeout=timeout_s, isolation_level=None,
                          check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.executescript(SCHEMA)
    return con


def process_gone(meta: dict[str, Any]) -> bool:
    """True when a run says "running" but its recording process is gone (SIGKILL, OOM, a closed
    terminal; a reused pid does not count as alive). Known only on the recording host, on POSIX:
    False when it cannot be told. The one liveness check of steering, ``mpviz info`` and the apps."""
    if meta.get("status") != "running" or os.name != "posix":
        return False
    pid, host = meta.get("pid"), meta.get("host")
    if not isinstance(pid, int) or pid <= 0 or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass              # exists, owned by another user
    return not _same_process(pid, meta.get("start_time"))


def _same_process(pid: int, run_start: float | None) -> bool:
    """False when /proc shows `pid` is a zombie, or a later process that reused the pid (it
    started after the run did); True otherwise (and where /proc does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
        if fields[0] in ("Z", "X"):
            return False
        if run_start is None:
            return True
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return started <= float(run_start) + 2.0   # clock-tick and boot-time rounding
    except (OSError, ValueError, IndexError, StopIteration):
        return True


KILLED = "killed / not finished"


def run_status(meta: dict[str, Any]) -> str:
    """The status to show: the recorded one, or "killed / not finished" for a run that says
    "running" but whose process is gone."""
    if process_gone(meta):
        return KILLED
    return str(meta.get("status", "?"))


def check_rules(rules: Any) -> dict[str, str | None]:
    """``rules`` as a request carries them, or TypeError: ``{layer or glob: precision or None}``."""
    if not isinstance(rules, Mapping) or not rules:
        raise TypeError("steer takes a non-empty dict {layer name or glob: precision or None}, "
                        f"e.g. {{'head': 'fp32'}}; got {rules!r}")
    for k, v in rules.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str)):
            raise TypeError(f"steer rules map layer names or globs (str) to a precision name "
                            f"(str, e.g. 'fp32') or None (remove the rule); got {k!r}: {v!r}")
    return dict(rules)


def post(run_dir: str | os.PathLike, rules: dict[str, str | None]) -> int:
    """Add a pending request; returns its id."""
    con = connect(run_dir)
    try:
        cur = con.execute("INSERT INTO requests (time, rules, status) VALUES (?, ?, ?)",
                          (time.time(), json.dumps(rules), PENDING))
        return int(cur.lastrowid)
    finally:
        con.close()


def steer_requests(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every request posted to ``run_dir``: ``id, time, rules (dict), status, step, reason``."""
    path = steer_path(run_dir)
    if not path.exists():
        return pd.DataFrame({c: [] for c in COLUMNS})
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        df = pd.read_sql_query(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id", con)
    except sqlite3.DatabaseError:  # created this instant (no table yet)
        return pd.DataFrame({c: [] for c in COLUMNS})
    finally:
        con.close()
    df["rules"] = [_loads(r) for r in df["rules"]]
    df["step"] = df["step"].astype("Int64")
    return df


def steer_status(run_dir: str | os.PathLike, request_id: int) -> dict[str, Any]:
    """One request: ``{"id", "time", "rules", "status", "step", "reason"}``.

        >>> mpviz.steer_status("runs/exp1", rid)   # doctest: +SKIP
        {'id': 1, ..., 'status': 'applied', 'step': 42, 'reason': None}
    """
    df = steer_requests(run_dir)
    row = df[df["id"] == int(request_id)]
    if row.empty:
        raise KeyError(f"no steering request {request_id} in {str(run_dir)!r} "
                       f"(its requests: {df['id'].tolist() or 'none'})")
    out = row.iloc[0].to_dict()
    out["id"] = int(out["id"])
    out["step"] = None if pd.isna(out["step"]) else int(out["step"])
    out["reason"] = None if out["reason"] is None or pd.isna(out["reason"]) else out["reason"]
    return out


def _loads(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


Busy = sqlite3.OperationalError   # another process holds the mailbox this instant


class Inbox:
    """The recorder's end: pending requests, and their outcomes written back. Waits at most
    ``busy_ms`` for another writer (then :data:`Busy`, or ``write`` returns False): training
    tries again at its next step instead of stalling."""

    def __init__(self, run_dir: str | os.PathLike, busy_ms: int = 50) -> None:
        self._con = connect(run_dir)
        self.wait_at_most(busy_ms)

    def wait_at_most(self, busy_ms: int) -> None:
        self._con.execute(f"PRAGMA busy_timeout={int(busy_ms)}")

    def version(self) -> int:
        """Changes only when another connection commits (~2 us)."""
        return self._con.execute("PRAGMA data_version").fetchone()[0]

    def pending(self) -> list[tuple[int, str]]:
        """``[(id, rules JSON)]`` of the pending requests, oldest first."""
        return self._con.execute("SELECT id, rules FROM requests WHERE status = ? ORDER BY id",
                                 (PENDING,)).fetchall()

    def write(self, outcomes: list[tuple]) -> bool:
        """``[(status, step, reason, done_time, id)]`` in one transaction; False if Busy."""
        try:
            self._con.execute("BEGIN IMMEDIATE")
        except Busy:
            return False
        try:
            self._con.executemany("UPDATE requests SET status = ?, step = ?, reason = ?, "
                                  "done_time = ? WHERE id = ?", outcomes)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        return True

    def close(self) -> None:
        self._con.close()
