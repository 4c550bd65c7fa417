"""The recorder's side of steering (:mod:`mpviz.mailbox`): pick requests up at step boundaries.

``Recorder(..., steerable=True)`` calls :meth:`Steering.poll` at the end of every step, on the
training thread; when nothing was posted that costs one look at the mailbox's version (~2 us). A
request is checked and queued by ``PolicyHandle.update`` (the very checks a live
``rec.policy.update`` makes) and applied at once with ``apply_pending``, so the change is in
force from the next step's first forward, where the recorder's policy listener records it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..mailbox import APPLIED, REFUSED, Busy, Inbox


class Steering:
    """Requests of ``run_dir/steer.db`` applied to ``policy`` (a PolicyHandle)."""

    def __init__(self, run_dir: str | Path, policy: Any) -> None:
        self.policy = policy
        self._inbox = Inbox(run_dir)
        self._version: int | None = None
        self._seen: set[int] = set()  # requests handled (their outcome may wait in _unwritten)
        self._unwritten: list[tuple] = []

    def poll(self, next_step: int) -> None:
        """Apply or refuse every pending request; ``next_step`` is the step about to begin."""
        if self._unwritten:
            self._write()
        version = self._inbox.version()
        if version == self._version:
            return
        try:
            pending = self._inbox.pending()
        except Busy:  # a writer holds the file this instant: next step
            return
        self._version = version
        pending = [(rid, text) for rid, text in pending if rid not in self._seen]
        if not pending:
            return
        for rid, text in pending:
            reason = self._apply(text)
            self._seen.add(rid)
            self._unwritten.append((REFUSED if reason else APPLIED, next_step, reason, time.time(), rid))
        self.policy.apply_pending()  # in force from the next forward on (recorded at next_step)
        self._write()

    def _apply(self, text: str) -> str | None:
        """Queue one request's rules; the reason it is refused, or None."""
        try:
            rules = json.loads(text)
            if not isinstance(rules, dict):
                raise ValueError(f"rules must be a JSON object {{layer: precision}}, got {text!r}")
            self.policy.update(rules)  # validates exactly as a live update does, or raises
        except (ValueError, TypeError) as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a request never breaks training
            return f"{type(e).__name__}: {e}"
        return None

    def _write(self) -> None:
        if self._inbox.write(self._unwritten):
            self._unwritten = []

    def close(self, step: int) -> None:
        """The run ends: requests still pending are refused (nothing will apply them)."""
        try:
            self._inbox.wait_at_most(2000)
            self._unwritten += [(REFUSED, step, "the run ended before a step boundary picked "
                                 "this request up", time.time(), rid)
                                for rid, _ in self._inbox.pending() if rid not in self._seen]
            if self._unwritten:
                self._write()
        finally:
            self._inbox.close()
