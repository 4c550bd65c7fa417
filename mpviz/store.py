"""The on-disk run format: one SQLite file in WAL mode, written by a background thread.

Why SQLite/WAL: no server, readers in other processes see committed steps while the run is being
written (the dashboard tails it), and a process killed with SIGKILL loses only the rows not yet
committed (at most ``flush_every_s`` seconds). No torch import here.

WAL needs shared memory between the processes that open the file, so it works on local disks,
not on network filesystems (NFS, SMB, sshfs, Lustre...): a run created there gets a warning.
Write runs to local disk and copy them (or let the explorer open the copy).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
import warnings
from array import array
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from .schema import COLUMNS, SCHEMA, SCHEMA_VERSION, STEP_TABLES, values

DB_NAME = "run.db"


def pack_hists(hists: Any) -> list[tuple[int, bytes]]:
    """Log2 histograms (rows of a numpy array, see mpviz.stats), each trimmed to its nonzero
    bins: (first bin, little-endian int64 bytes) per row."""
    nz = hists > 0
    lo = nz.argmax(1)
    hi = hists.shape[1] - nz[:, ::-1].argmax(1)
    data = hists.astype("<i8")
    return [(int(a), data[k, a:b].tobytes()) if nz[k, a] else (0, b"")
            for k, (a, b) in enumerate(zip(lo.tolist(), hi.tolist()))]


def unpack_hist(lo: int, blob: bytes) -> list[int]:
    counts = array("q", blob)  # written little-endian (pack_hists)
    if sys.byteorder == "big":
        counts.byteswap()
    return [0] * lo + list(counts)


class RunStoreError(Exception):
    """A run directory that cannot be read: missing, corrupt, or written by a newer mpviz."""


def db_path(run_dir: str | Path, rank: int = 0) -> Path:
    """The store file of ``run_dir`` (a path to the file itself is accepted too)."""
    p = Path(run_dir)
    if p.suffix == ".db":
        return p
    return p / (DB_NAME if rank == 0 else f"run-rank{rank}.db")


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open a store for reading and check its schema version."""
    if not path.exists():
        raise RunStoreError(f"no mpviz run at {path.parent}: {path.name} does not exist "
                            f"(pass the run_dir given to mpviz.Recorder)")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise RunStoreError(f"{path} is not a readable mpviz run ({e}); the file is corrupt or "
                            f"not written by mpviz") from None
    if row is None:
        raise RunStoreError(f"{path} has no schema version: not an mpviz run, or it was killed "
                            f"before its first write")
    version = json.loads(row[0])
    if version > SCHEMA_VERSION:
        raise RunStoreError(f"{path} was written with run format v{version}, newer than this "
                            f"mpviz reads (v{SCHEMA_VERSION}): upgrade mpviz (pip install -U mpviz)")
    return con


_NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "fuse.sshfs",
                        "sshfs", "lustre", "gpfs", "ceph", "glusterfs", "fuse.glusterfs", "beegfs",
                        "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs"}


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem ``path`` lives on, from ``/proc/mounts`` (Linux), or None
    where the platform does not say. ``mounts``: that file's text (for tests)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, fstype = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def warn_if_network_filesystem(path: str | Path, mounts: str | None = None) -> bool:
    fstype = filesystem_type(path, mounts)
    if fstype in _NETWORK_FILESYSTEMS:
        warnings.warn(f"mpviz: {path} is on a network filesystem ({fstype}). The run store is "
                      "SQLite in WAL mode, which needs a local disk: readers may see stale or "
                      "corrupt data. Write runs to local disk (e.g. /tmp or a local scratch "
                      "dir) and copy them where you read them.", RuntimeWarning, stacklevel=3)
        return True
    return False


def _write_meta(con: sqlite3.Connection, meta: dict[str, Any]) -> None:
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [(k, json.dumps(v, default=str)) for k, v in meta.items()])


def _insert_sql(table: str) -> str:
    cols = COLUMNS[table]
    return f"INSERT INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"


def _create(path: Path, meta: dict[str, Any], layers: list[tuple]) -> None:
    try:  # O_EXCL: of two processes (or two lab pages) claiming one path, exactly one wins
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise RunStoreError(f"{path} already holds a run: choose a new run_dir (or delete the "
                            "old one, or pass resume=True to continue it)") from None
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        with con:
            _write_meta(con, {**meta, "schema_version": SCHEMA_VERSION})
            con.executemany(_insert_sql("layers"), layers)
    except sqlite3.Error as e:  # a half-made store would refuse the next try as "already a run"
        con.close()
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
        raise RunStoreError(f"cannot create the run store {path} ({type(e).__name__}: {e}): "
                            "is its disk full?") from e
    con.close()


def _resume(path: Path, meta: dict[str, Any], layers: list[tuple], start: int) -> int:
    """Continue the run at ``path`` from step ``start``; returns the number of rows dropped."""
    connect_readonly(path).close()  # a corrupt or newer store is refused here, clearly
    con = sqlite3.connect(path, timeout=30)
    try:
        con.executescript(SCHEMA)  # tables added since the run was created (diagnostics)
        if "origin" not in {r[1] for r in con.execute("PRAGMA table_info(overflows)")}:
            con.execute("ALTER TABLE overflows ADD COLUMN origin INTEGER")  # added after v1
        old = [r[0] for r in con.execute("SELECT layer FROM layers ORDER BY idx")]
        new = [l[1] for l in layers]
        if old != new:
            first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b),
                         min(len(old), len(new)))
            raise RunStoreError(
                f"cannot resume {path}: it was recorded from a model with other layers "
                f"({len(old)} layers, {len(new)} now; first difference at layer {first}: "
                f"{old[first] if first < len(old) else None!r} vs "
                f"{new[first] if first < len(new) else None!r}). Resume with the same model, "
                "or record into a new run_dir.")
        prev = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        with con:
            dropped = sum(con.execute(f"DELETE FROM {t} WHERE step >= ?", (start,)).rowcount
                          for t in STEP_TABLES)
            resumed = list(prev.get("resumed") or []) + [
                {"at_step": start, "dropped_rows": dropped, "time": time.time(),
                 "previous_status": prev.get("status")}]
            keep = {k: prev[k] for k in ("start_time",) if k in prev}
            _write_meta(con, {**meta, **keep, "resumed": resumed, "status": "running",
                              "end_time": None})
    finally:
        con.close()
    return dropped


# ---------------------------------------------------------------- what the writer queue carries
@dataclass(slots=True)
class Rows:
    """Rows of one table, each a tuple in the table's column order."""

    table: str
    rows: list[tuple]

    @classmethod
    def of(cls, records: Sequence[Any]) -> "Rows":
        """Rows from records of one table (the dataclasses of :mod:`mpviz.schema`)."""
        return cls(type(records[0]).TABLE, [values(r) for r in records])

    @classmethod
    def columns(cls, table: type, **columns: Sequence[Any]) -> "Rows":
        """Rows from whole columns, matched to the table's columns by name."""
        names = COLUMNS[table.TABLE]
        if columns.keys() != set(names):
            raise ValueError(f"{table.TABLE} has the columns {names}, got {sorted(columns)}")
        return cls(table.TABLE, list(zip(*(columns[n] for n in names))))


@dataclass(slots=True)
class Meta:
    values: dict[str, Any]


@dataclass(slots=True)
class Later:
    """An item that ``make_rows`` turns into rows on the writer thread, with others of its kind.
    These are the statistics, which a failing store drops first."""

    make_rows: Callable[[list[Any]], list[Rows]]
    item: Any
    nbytes: int = 0  # memory the item holds while it waits


Message = Rows | Meta | Later


class _Inbox:
    """Messages for the writer thread, and who waits for them to be written."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Message] = []
        self.nbytes = 0
        self.waiters: list[threading.Event] = []
        self.closing = False
        # The writer wakes every flush_every_s (or on flush/close), not on every message:
        # waking it that often would make it fight the training thread for the GIL.
        self.wake = threading.Event()

    def send(self, message: Message) -> int:
        """Queue ``message``; returns the bytes of the items waiting."""
        with self.lock:
            self.messages.append(message)
            if isinstance(message, Later):
                self.nbytes += message.nbytes
            return self.nbytes

    def take(self, timeout: float) -> tuple[bool, list[Message], list[threading.Event]]:
        self.wake.wait(timeout)
        self.wake.clear()
        closing = self.closing
        with self.lock:
            messages, self.messages = self.messages, []
            waiters, self.waiters = self.waiters, []
            self.nbytes = 0
        return closing, messages, waiters


class _Failures:
    """What a store that cannot be written costs, and its account (``meta["store_errors"]``).

    A failed commit is tried again without its statistics (nearly all the bytes), and those of
    the next 10 commits are dropped unmade: on a full disk they would only fail again. Its other
    rows wait for a later commit (at most ``max_kept_rows``; meta updates always)."""

    def __init__(self, path: Path, report: Callable[[BaseException], None]) -> None:
        self.path, self.report = path, report
        self.kept: list[Message] = []
        self.kept_rows = 0
        self.skip_stats = 0
        self.account: dict[str, Any] = {}  # meta["store_errors"]
        self.unwritten = False  # the account changed since the last commit

    def failed(self, e: BaseException, rows: list[Message]) -> None:
        err = self.account
        if not err:
            steps = _steps_of(rows)
            err.update(error=f"{type(e).__name__}: {e}", at_step=min(steps, default=None),
                       time=time.time(), failed_commits=0)
            self.report(RunStoreError(
                f"the run store {self.path} could not be written"
                + (f" at step {err['at_step']}" if steps else "") + f" ({err['error']}): "
                "statistics are dropped first; what could not be written is in "
                "run.meta['store_errors'] once the store takes it"))
        err["failed_commits"] += 1
        err["last_error"] = f"{type(e).__name__}: {e}"
        self.unwritten = True

    def dropped(self, key: str, count: str, n: int, rows: list[Message],
                e: BaseException | None = None) -> None:
        """``n`` (``count``) of the steps of ``rows`` were dropped; the first time rows are
        dropped (``e``: why), an error says so."""
        steps = _steps_of(rows)
        d = self.account.setdefault(key, {"from_step": None, "to_step": None, count: 0})
        if e is not None and not d[count]:
            self.report(RunStoreError(
                f"rows of the run store {self.path} are dropped"
                + (f" from step {min(steps)}" if steps else "")
                + f" ({type(e).__name__}: {e}); counted in run.meta['store_errors']"))
        d[count] += n
        if steps:
            lo, hi = min(steps), max(steps)
            d["from_step"] = lo if d["from_step"] is None else min(d["from_step"], lo)
            d["to_step"] = hi if d["to_step"] is None else max(d["to_step"], hi)
        self.unwritten = True

    def keep(self, rows: list[Message], error: BaseException, max_rows: int) -> None:
        """Rows of a failed commit, for the next: only while the disk may take them later."""
        if not isinstance(error, (sqlite3.OperationalError, OSError)):
            # rows the store refuses (not a full disk): they would fail again
            self.dropped("rows_dropped", "rows", _count(rows), rows, error)
            return
        for m in rows:
            if isinstance(m, Rows) and self.kept_rows + len(m.rows) > max_rows:
                self.dropped("rows_dropped", "rows", len(m.rows), [m], error)
                continue
            self.kept.append(m)
            self.kept_rows += _count([m])


class RunWriter:
    """Appends rows to a store from a background thread, committed at least every
    ``flush_every_s`` seconds, on ``flush()`` and on ``close()``. Nothing here blocks on disk or
    raises into training: a store that cannot be written drops statistics first, keeps other
    rows for a later commit (:class:`_Failures`), and says so in ``errors``."""

    def __init__(self, path: Path, meta: dict[str, Any], layers: Iterable[tuple],
                 flush_every_s: float = 2.0, resume_from: int | None = None) -> None:
        """Create the store at ``path`` (claimed atomically), or with ``resume_from=N`` continue
        the run there from step N (its rows of later steps dropped: ``meta["resumed"]``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        warn_if_network_filesystem(path.parent)
        layers = list(layers)
        self.dropped_rows = 0
        if resume_from is not None and path.exists():
            self.dropped_rows = _resume(path, meta, layers, int(resume_from))
        else:
            _create(path, meta, layers)
        self.path = path
        self.flush_every_s = flush_every_s
        self.max_pending_bytes = 256 << 20
        self.max_kept_rows = 100_000
        # Errors of the row makers (whose items are dropped from then on) and of the store,
        # for the recorder to record (take_errors).
        self.errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        self._failed_makers: set[Any] = set()
        # CPU seconds this writer's thread spent committing, and Later items committed (the
        # recorder's statistics schedule counts them as what statistics cost)
        self.busy_s, self.later_done = 0.0, 0
        self._inbox = _Inbox()
        self._db = _Connection(path)
        self._failures = _Failures(path, self._report)
        self._thread = threading.Thread(target=self._loop, name="mpviz-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the training thread's side
    def put(self, table: str, rows: list[tuple]) -> None:
        """Queue rows (tuples in the table's column order). Never blocks on disk, never raises."""
        if rows:
            self._inbox.send(Rows(table, rows))

    def write(self, records: Sequence[Any]) -> None:
        """Queue records of one table (dataclasses of :mod:`mpviz.schema`)."""
        if records:
            self._inbox.send(Rows.of(records))

    def put_later(self, make_rows: Callable[[list[Any]], list[Rows]], item: Any,
                  nbytes: int = 0) -> None:
        """Queue ``item`` for ``make_rows``, called on the writer thread with every item queued
        for it since the last commit. When more than ``max_pending_bytes`` wait, this call
        blocks until the writer has caught up: a writer that falls behind slows training
        instead of filling memory."""
        if self._inbox.send(Later(make_rows, item, nbytes)) > self.max_pending_bytes:
            self.flush()

    def set_meta(self, **meta: Any) -> None:
        self._inbox.send(Meta(meta))

    def take_errors(self) -> list[BaseException]:
        with self._errors_lock:
            errors, self.errors = self.errors, []
        return errors

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every row put so far is committed (or its commit failed)."""
        done = threading.Event()
        with self._inbox.lock:
            self._inbox.waiters.append(done)
        self._inbox.wake.set()
        if self._thread.is_alive():
            done.wait(timeout)

    def close(self) -> None:
        self._inbox.closing = True
        self._inbox.wake.set()
        self._thread.join()
        for e in self.take_errors():  # of the last commit: nobody will take them any more
            warnings.warn(f"mpviz: {e}", RuntimeWarning, stacklevel=2)
        kept = self._failures.kept
        if kept:
            steps = _steps_of(kept)
            what = (f"{self._failures.kept_rows} rows of steps {min(steps)}..{max(steps)} and "
                    if steps else "")
            warnings.warn(f"mpviz: the run store {self.path} could not be written at the end "
                          f"({self._failures.account.get('last_error')}): {what}the run's last "
                          "meta updates (its status among them) are not in it.", RuntimeWarning,
                          stacklevel=2)

    # ---------------------------------------------------------------- the writer thread
    def _loop(self) -> None:
        while True:
            closing, messages, waiters = self._inbox.take(self.flush_every_s)
            if messages or self._failures.kept:
                t0 = time.thread_time()
                self._write(messages)
                self.busy_s += time.thread_time() - t0
                self.later_done += sum(isinstance(m, Later) for m in messages)
            for w in waiters:
                w.set()
            if closing:
                break
        self._db.close()

    def _write(self, messages: list[Message]) -> None:
        """Commit the kept rows and ``messages``; on failure, the same without the statistics;
        on failure again, keep the rows for the next commit."""
        f = self._failures
        rows = [m for m in messages if not isinstance(m, Later)]
        later = [m for m in messages if isinstance(m, Later)]
        if later and f.skip_stats:
            f.skip_stats -= 1
            f.dropped("statistics_dropped", "statistics_steps", len(later), rows)
            later = []
        tries = [f.kept + rows + later] + ([f.kept + rows] if later else [])
        for n, batch in enumerate(tries):
            try:
                self._commit(batch)
            except Exception as e:  # noqa: BLE001 - the writer thread must not die
                error = e
                f.failed(e, rows)
                if n == 0 and later:
                    f.dropped("statistics_dropped", "statistics_steps", len(later), rows)
                    f.skip_stats = 10
            else:
                f.kept, f.kept_rows = [], 0
                return
        f.keep(rows, error, self.max_kept_rows)

    def _commit(self, batch: list[Message]) -> None:
        con = self._db.open()
        if self._failures.unwritten:
            batch = batch + [Meta({"store_errors": self._failures.account})]
        try:
            with con:
                for m in self._made(batch):
                    if isinstance(m, Meta):
                        _write_meta(con, m.values)
                    else:
                        con.executemany(_insert_sql(m.table), m.rows)
        except BaseException:
            try:
                con.rollback()
            except sqlite3.Error:
                pass
            raise
        self._failures.unwritten = False

    def _made(self, batch: list[Message]) -> Iterator[Rows | Meta]:
        """``batch`` with its Later items made into rows: one call per row maker for up to
        64 items (bounded temporaries); a maker that fails stops, the rest is written."""
        later: dict[Any, list[Any]] = {}
        for m in batch:
            if isinstance(m, Later):
                later.setdefault(m.make_rows, []).append(m.item)
            else:
                yield m
        for make_rows, items in later.items():
            for i in range(0, len(items), 64):
                if make_rows in self._failed_makers:
                    break
                try:
                    made = make_rows(items[i:i + 64])
                except Exception as e:  # noqa: BLE001 - that part stops, the rest is written
                    self._failed_makers.add(make_rows)
                    self._report(e)
                    break
                yield from made

    def _report(self, e: BaseException) -> None:
        with self._errors_lock:
            self.errors.append(e)


class _Connection:
    """The writer's connection, opened on first use; a store deleted during the run is noticed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inode = os.stat(path).st_ino
        # mode=rw: a store deleted during the run is not re-created empty by a reconnect
        self.uri = path.resolve().as_uri() + "?mode=rw"
        self.con: sqlite3.Connection | None = None

    def open(self) -> sqlite3.Connection:
        try:
            gone = os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            gone = True
        if gone:  # SQLite would go on writing into the removed file, unseen
            raise RunStoreError(f"{self.path} was deleted or replaced during the run")
        if self.con is None:
            self.con = sqlite3.connect(self.uri, uri=True)
            self.con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against kill
        return self.con

    def close(self) -> None:
        if self.con is not None:
            try:
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:  # no space to checkpoint: the WAL stays, readers read it
                pass
            self.con.close()


def _steps_of(messages: list[Message]) -> list[int]:
    """The steps of queued rows (a step table's first column is its step)."""
    return [r[0] for m in messages if isinstance(m, Rows) for r in m.rows]


def _count(messages: list[Message]) -> int:
    return sum(len(m.rows) for m in messages if isinstance(m, Rows))


def thin(run_dir: str | Path, keep_every: int = 100, before_step: int | None = None,
         vacuum: bool | None = None) -> dict[str, Any]:
    """Drop old per-layer statistics of a run (every rank's store in ``run_dir``), keeping those
    of steps that are multiples of ``keep_every`` and of every step that overflowed, was skipped
    or changed the loss scale. Rows of steps >= ``before_step`` (default: all steps) are kept.
    Steps, overflow events, dtypes and policy changes are never dropped. Call it again later to
    thin on a schedule; it works on a run still being written (its freed pages are reused by
    new rows), and ``vacuum`` (default: when the run is not running) shrinks the file.

        >>> mpviz.thin("runs/exp1", keep_every=100, before_step=50_000)   # doctest: +SKIP
        {'rows_dropped': 5346000, 'bytes_before': ..., 'bytes_after': ...}
    """
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob("run*.db")) if run_dir.is_dir() else [run_dir]
    if not paths or not paths[0].exists():
        raise RunStoreError(f"no mpviz run at {run_dir}: pass the run_dir given to mpviz.Recorder")
    if int(keep_every) < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    size = lambda: sum(p.stat().st_size for p in run_dir.glob("run*.db*"))  # noqa: E731 (+ WAL)
    before, dropped = size(), 0
    for path in paths:
        ro = connect_readonly(path)  # a corrupt or newer store is refused here, clearly
        meta = {k: json.loads(v) for k, v in ro.execute("SELECT key, value FROM meta")}
        ro.close()
        every = int(meta.get("every") or 1)
        if int(keep_every) % every:
            raise ValueError(f"keep_every={keep_every} is not a multiple of the run's statistics "
                             f"interval (every={every}): use e.g. keep_every={every * 10}")
        end = int(before_step) if before_step is not None else 1 << 62
        where = ("step < ? AND step % ? != 0 AND step NOT IN (SELECT step FROM overflows) AND "
                 "step NOT IN (SELECT step FROM steps WHERE skipped = 1 OR nonfinite_grads = 1 "
                 "OR loss_scale_after != loss_scale)")
        con = sqlite3.connect(path, timeout=60)
        try:
            with con:
                n = sum(con.execute(f"DELETE FROM {t} WHERE {where}", (end, int(keep_every))).rowcount
                        for t in ("layer_stats", "histograms"))
                _write_meta(con, {"thinned": list(meta.get("thinned") or []) + [
                    {"keep_every": int(keep_every), "before_step": before_step,
                     "rows_dropped": n, "time": time.time()}]})
            dropped += n
            if vacuum if vacuum is not None else meta.get("status") != "running":
                con.execute("VACUUM")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    return {"rows_dropped": dropped, "bytes_before": before, "bytes_after": size()}
