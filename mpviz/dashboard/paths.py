"""A run name to an open run, for the apps: confined to the runs folder (`confine`: `..`,
absolute paths and symlinks that resolve outside it are refused), and read once (`open_run`), so
that an empty, foreign, corrupt, truncated or too new store fails there with `RunUnavailable`:
one sentence for the page saying which, and what to do.

>>> confine("runs", "../etc")    # doctest: +SKIP
Traceback (most recent call last):
RunUnavailable: refused: '../etc' is outside the runs folder ...
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd

from mpviz.run import is_foreign_store, load_run
from mpviz.store import DB_NAME, RunStoreError, db_path

SQLITE_MAGIC = b"SQLite format 3\x00"

# What reading a store can raise once it is open (pandas wraps sqlite3's errors in its own).
STORE_ERRORS: tuple[type[BaseException], ...] = (RunStoreError, sqlite3.DatabaseError,
                                                 pd.errors.DatabaseError)


class RunUnavailable(Exception):
    """A run the app cannot show; ``str(e)`` is the one message the page shows."""


def confine(root: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """The resolved run directory for `run_dir` if it lies under `root`, else `RunUnavailable`.

    A relative `run_dir` is taken from the working directory when it exists there or lands under
    the root (``runs/exp1``, as the apps list them), else as a name under the root (``exp1``);
    one with `..` only from the working directory. `..`, absolute paths and symlinks that lead out of the
    root are refused: the check is on ``Path.resolve()`` of both."""
    base = Path(root).expanduser().resolve()
    given = Path(run_dir).expanduser()
    if given.name == DB_NAME or given.suffix == ".db":
        given = given.parent
    path = given if given.is_absolute() else Path.cwd() / given
    if not (given.is_absolute() or ".." in given.parts or os.path.lexists(path)
            or path.resolve().is_relative_to(base)):
        path = base / given
    resolved = path.resolve()
    if not resolved.is_relative_to(base):
        raise RunUnavailable(f"refused: {str(run_dir)!r} is outside the runs folder {str(base)!r} "
                             f"(it resolves to {str(resolved)!r}); the apps open only runs under "
                             f"it: move or copy the run there")
    return resolved


def open_run(root: str | os.PathLike, run_dir: str | os.PathLike) -> Any:
    """`mpviz.load_run` of a confined `run_dir`, read once (meta, layers, last step) so that an
    unreadable store fails here. Raises `RunUnavailable` with the message to show."""
    path = confine(root, run_dir)
    try:
        run = load_run(path)
    except STORE_ERRORS as e:
        raise RunUnavailable(describe(path, e)) from None
    try:
        run.meta
        run.layers
        run.last_step
    except STORE_ERRORS as e:
        run.close()
        raise RunUnavailable(describe(path, e)) from None
    return run


def describe(run_dir: str | os.PathLike, error: BaseException) -> str:
    """One sentence for the page: what is wrong with the store of `run_dir`, and what to do.

    Looks at the file itself (size, SQLite header, tables) rather than parsing `error`."""
    run_dir = Path(run_dir)
    name = run_dir.name
    db = db_path(run_dir)
    if not run_dir.exists():
        return f"{name}: the run directory no longer exists (deleted or moved): press Rescan"
    if not db.exists():
        return f"{name}: no {DB_NAME} in this directory: not an mpviz run, or it was deleted"
    try:
        size = db.stat().st_size
        with open(db, "rb") as f:
            head = f.read(100)
    except OSError as e:
        return f"{name}: {DB_NAME} cannot be read ({e.strerror or e})"
    if size == 0:
        return (f"{name}: {DB_NAME} is empty (0 bytes): the recording was killed before its first "
                f"write (or is starting this instant), or the file was truncated; nothing to show")
    if not head.startswith(SQLITE_MAGIC):
        return (f"{name}: {DB_NAME} is not an SQLite file: not an mpviz run (or overwritten); "
                f"nothing to show")
    if isinstance(error, RunStoreError) and "newer than this mpviz" in str(error):
        return f"{name}: {error}"
    if isinstance(error, RunStoreError) and "no schema version" in str(error):
        return (f"{name}: {DB_NAME} has no schema version yet: a run starting this instant (press "
                f"Rescan in a second), or one killed before its first write")
    if is_foreign_store(db):
        return (f"{name}: {DB_NAME} is an SQLite database but not an mpviz run (no meta table "
                f"with a schema version); nothing to show")
    detail = _sqlite_reason(error)
    truncated = _truncated(head, size)
    if truncated:
        return (f"{name}: {DB_NAME} is truncated ({truncated}), e.g. an interrupted copy or a full "
                f"disk; SQLite says: {detail}. The run cannot be shown: record it again or restore it")
    return (f"{name}: {DB_NAME} is corrupt (SQLite says: {detail}); the run cannot be shown: "
            f"record it again or restore it")


def _sqlite_reason(error: BaseException) -> str:
    """SQLite's own words ("database disk image is malformed") from a chain of errors."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, sqlite3.Error):
            return str(e)
        e = e.__cause__ or e.__context__
    found = re.search(r"\(([^()]+)\)", str(error))  # RunStoreError quotes it in parentheses
    return found.group(1) if found else str(error)


def _truncated(head: bytes, size: int) -> str:
    """'N of M bytes' when the file is shorter than its SQLite header says, else ''."""
    if len(head) < 100:
        return f"{size} bytes, shorter than an SQLite header"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the header's page count is valid only then
    expected = page * pages
    if valid and pages and size < expected:
        return f"{size} of {expected} bytes"
    if size % page:
        return f"{size} bytes, not a whole number of {page}-byte pages"
    return ""
