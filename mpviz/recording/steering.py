"""The recorder's side of steering (:mod:`mpviz.mailbox`): pick requests up at step boundaries.

``Recorder(..., steerable=True)`` calls :meth:`Steering.poll` at the end of every step, on the
training thread. Its cost when nothing was posted: one ``PRAGMA data_version`` on an open
connection (~2 us; it changes only when another process commits). A request is checked and
queued by ``PolicyHandle.update`` (the very checks a live ``rec.policy.update`` makes) and applied
right away with ``apply_pending``, so that the change is in force from the next step's first
forward, and the recorder's policy listener records it in ``run.policy_changes`` at that step.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..mailbox import APPLIED, PENDING, REFUSED, connect


class Steering:
    """Requests of ``run_dir/steer.db`` applied to ``policy`` (a PolicyHandle)."""

    def __init__(self, run_dir: str | Path, policy: Any) -> None:
        self.policy = policy
        # A short busy timeout: a writer that holds the file longer makes us try again at the
        # next step instead of stalling training.
        self._con = connect(run_dir)
        self._con.execute("PRAGMA busy_timeout=50")
        self._version: int | None = None
        self._seen: set[int] = set()  # requests handled (their outcome may wait in _unwritten)
        self._unwritten: list[tuple] = []

    def poll(self, next_step: int) -> None:
        """Apply or refuse every pending request; ``next_step`` is the step about to begin."""
        if self._unwritten:
            self._write()
        version = self._con.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return
        try:
            pending = self._con.execute(
                "SELECT id, rules FROM requests WHERE status = ? ORDER BY id", (PENDING,)).fetchall()
        except sqlite3.OperationalError:  # locked by a writer this instant: next step
            return
        self._version = version
        pending = [(rid, text) for rid, text in pending if rid not in self._seen]
        if not pending:
            return
        for rid, text in pending:
            reason = None
            try:
                rules = json.loads(text)
                if not isinstance(rules, dict):
                    raise ValueError(f"rules must be a JSON object {{layer: precision}}, got {text!r}")
                self.policy.update(rules)  # validates exactly as a live update does, or raises
            except (ValueError, TypeError) as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001 - a request never breaks training
                reason = f"{type(e).__name__}: {e}"
            self._seen.add(rid)
            self._unwritten.append((REFUSED if reason else APPLIED, next_step, reason, time.time(), rid))
        self.policy.apply_pending()  # in force from the next forward on (recorded at next_step)
        self._write()

    def _write(self) -> bool:
        """Write the outcomes not written yet; if another writer holds the file, the next
        step tries again (training never waits more than a few ms here)."""
        try:
            self._con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        try:
            self._con.executemany("UPDATE requests SET status = ?, step = ?, reason = ?, "
                                  "done_time = ? WHERE id = ?", self._unwritten)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._unwritten = []
        return True

    def close(self, step: int) -> None:
        """The run ends: requests still pending are refused (nothing will apply them)."""
        try:
            self._con.execute("PRAGMA busy_timeout=2000")
            pending = self._con.execute("SELECT id FROM requests WHERE status = ?",
                                        (PENDING,)).fetchall()
            self._unwritten += [(REFUSED, step, "the run ended before a step boundary picked "
                                 "this request up", time.time(), rid)
                                for (rid,) in pending if rid not in self._seen]
            if self._unwritten:
                self._write()
        finally:
            self._con.close()
