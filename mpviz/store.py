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
from typing import Any, Callable, Iterable, Iterator

SCHEMA_VERSION = 1
DB_NAME = "run.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS layers (
    idx INTEGER PRIMARY KEY, layer TEXT, type TEXT, n_params INTEGER, param_dtype TEXT,
    depth INTEGER, is_leaf INTEGER);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, loss REAL, loss_scale REAL, loss_scale_after REAL, skipped INTEGER,
    nonfinite_grads INTEGER, step_time_s REAL, samples INTEGER, samples_per_s REAL, wall_time REAL);
CREATE TABLE IF NOT EXISTS layer_stats (
    step INTEGER, layer_idx INTEGER, tensor TEXT, dtype TEXT, norm REAL, max_abs REAL,
    min_abs_nonzero REAL, zeros INTEGER, nonfinite INTEGER, underflow_fp16 INTEGER,
    overflow_fp16 INTEGER, underflow_bf16 INTEGER, overflow_bf16 INTEGER, numel INTEGER);
CREATE INDEX IF NOT EXISTS layer_stats_step ON layer_stats (step);
CREATE INDEX IF NOT EXISTS layer_stats_layer ON layer_stats (layer_idx, tensor, step);
CREATE TABLE IF NOT EXISTS dtypes (step INTEGER, layer_idx INTEGER, tensor TEXT, dtype TEXT);
CREATE TABLE IF NOT EXISTS overflows (
    step INTEGER, layer_idx INTEGER, tensor TEXT, phase TEXT, first INTEGER, nonfinite INTEGER,
    skipped INTEGER, origin INTEGER);
CREATE TABLE IF NOT EXISTS histograms (
    step INTEGER, layer_idx INTEGER, tensor TEXT, lo INTEGER, counts BLOB);
CREATE INDEX IF NOT EXISTS histograms_layer ON histograms (layer_idx, tensor, step);
CREATE TABLE IF NOT EXISTS policy_changes (step INTEGER, layer_idx INTEGER, precision TEXT, rule TEXT);
CREATE TABLE IF NOT EXISTS diagnostics (
    step INTEGER, layer_idx INTEGER, kind TEXT, metric TEXT, value REAL);
"""

COLUMNS = {
    "steps": ("step", "loss", "loss_scale", "loss_scale_after", "skipped", "nonfinite_grads",
              "step_time_s", "samples", "samples_per_s", "wall_time"),
    "layer_stats": ("step", "layer_idx", "tensor", "dtype", "norm", "max_abs", "min_abs_nonzero",
                    "zeros", "nonfinite", "underflow_fp16", "overflow_fp16", "underflow_bf16",
                    "overflow_bf16", "numel"),
    "dtypes": ("step", "layer_idx", "tensor", "dtype"),
    "overflows": ("step", "layer_idx", "tensor", "phase", "first", "nonfinite", "skipped",
                  "origin"),
    "histograms": ("step", "layer_idx", "tensor", "lo", "counts"),
    "policy_changes": ("step", "layer_idx", "precision", "rule"),
    "diagnostics": ("step", "layer_idx", "kind", "metric", "value"),
    "layers": ("idx", "layer", "type", "n_params", "param_dtype", "depth", "is_leaf"),
}


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
            RunWriter._write_meta(con, {**meta, "schema_version": SCHEMA_VERSION})
            con.executemany(f"INSERT INTO layers VALUES ({','.join('?' * 7)})", layers)
    except sqlite3.Error as e:  # a half-made store would refuse the next try as "already a run"
        con.close()
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
        raise RunStoreError(f"cannot create the run store {path} ({type(e).__name__}: {e}): "
                            "is its disk full?") from e
    con.close()


_STEP_TABLES = ("steps", "layer_stats", "dtypes", "overflows", "histograms", "policy_changes",
                "diagnostics")


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
                          for t in _STEP_TABLES)
            resumed = list(prev.get("resumed") or []) + [
                {"at_step": start, "dropped_rows": dropped, "time": time.time(),
                 "previous_status": prev.get("status")}]
            keep = {k: prev[k] for k in ("start_time",) if k in prev}
            RunWriter._write_meta(con, {**meta, **keep, "resumed": resumed, "status": "running",
                                        "end_time": None})
    finally:
        con.close()
    return dropped


class RunWriter:
    """Appends rows to a store from a background thread.

    ``put`` never blocks on disk; rows are committed at least every ``flush_every_s`` seconds,
    on ``flush()`` and on ``close()``.

    Nothing here raises into training when the store cannot be written (disk full, store
    deleted...). A commit that fails is tried again without its statistics (``layer_stats`` and
    ``histograms``: nearly all the bytes), which are dropped, and so are those of the next 10
    commits; if that fails too, its other rows wait in memory (at most
    ``max_kept_rows``, then they are dropped) for the next commit that succeeds. What was
    dropped goes to ``meta["store_errors"]`` (when the store takes it) and to ``errors``;
    errors not taken and rows still unwritten at ``close()`` get a warning.
    """

    def __init__(self, path: Path, meta: dict[str, Any], layers: Iterable[tuple],
                 flush_every_s: float = 2.0, resume_from: int | None = None) -> None:
        """Create the store at ``path`` (claimed atomically: two writers never share one), or,
        with ``resume_from=N`` and a run already there, continue it from step ``N``: rows the
        earlier process wrote for steps >= N are dropped (``meta["resumed"]`` says how many)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        warn_if_network_filesystem(path.parent)
        layers = list(layers)
        self.dropped_rows = 0
        if resume_from is not None and path.exists():
            self.dropped_rows = _resume(path, meta, layers, int(resume_from))
        else:
            _create(path, meta, layers)
        self.path = path
        self._inode = os.stat(path).st_ino
        # mode=rw: a store deleted during the run is not re-created empty by a reconnect
        self._uri = path.resolve().as_uri() + "?mode=rw"
        self.flush_every_s = flush_every_s
        # Rows wait in memory and the writer wakes every flush_every_s (or on flush/close):
        # waking it on every put would make it fight the training thread for the GIL.
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Any]] = []
        self._pending_bytes = 0
        self.max_pending_bytes = 256 << 20
        self._wake = threading.Event()
        self._waiters: list[threading.Event] = []
        self._closing = False
        self._con: sqlite3.Connection | None = None
        # Rows a failed commit could not write, for the next commit (meta updates always kept)
        self._kept: list[tuple[str, Any]] = []
        self._kept_rows = 0
        self.max_kept_rows = 100_000
        # after statistics failed to commit, those of the next commits are dropped unmade: on a
        # full disk each commit would make and write them only to fail again
        self._skip_stats = 0
        self.store_errors: dict[str, Any] = {}  # meta["store_errors"]
        self._store_errors_written = True
        # Errors of put_later's row makers and of the store: the recorder records them
        # (take_errors). A maker that failed has its items dropped from then on.
        self.errors: list[BaseException] = []
        self._failed_makers: set[Any] = set()
        # CPU seconds this writer's thread spent committing, and put_later items committed (the
        # recorder's statistics schedule counts them as what statistics cost)
        self.busy_s, self.later_done = 0.0, 0
        self._thread = threading.Thread(target=self._loop, name="mpviz-writer", daemon=True)
        self._thread.start()

    @staticmethod
    def _write_meta(con: sqlite3.Connection, meta: dict[str, Any]) -> None:
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v, default=str)) for k, v in meta.items()])

    def put(self, table: str, rows: list[tuple]) -> None:
        """Queue rows. Never blocks on disk and never raises (see the class docstring)."""
        if rows:
            with self._lock:
                self._pending.append((table, rows))

    def put_later(self, make_rows: Callable[[list[Any]], list[tuple[str, list[tuple]]]],
                  item: Any, nbytes: int = 0) -> None:
        """Queue ``item`` for ``make_rows``, called on the writer thread with the items queued
        for it since the last commit (one call for many steps), which returns
        ``[(table, rows), ...]``: the recorder hands over raw numbers and leaves turning them
        into rows to this thread. These are the statistics a failed commit drops first.

        ``nbytes``: memory the item holds. When more than ``max_pending_bytes`` wait, this call
        blocks until the writer has caught up, so a writer that falls behind slows training
        instead of filling memory."""
        self.put("later", [(make_rows, item)])
        with self._lock:
            self._pending_bytes += nbytes
            behind = self._pending_bytes > self.max_pending_bytes
        if behind:
            self.flush()

    def take_errors(self) -> list[BaseException]:
        with self._lock:
            errors, self.errors = self.errors, []
        return errors

    def set_meta(self, **meta: Any) -> None:
        with self._lock:
            self._pending.append(("meta", [meta]))

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every row put so far is committed (or its commit failed)."""
        done = threading.Event()
        with self._lock:
            self._waiters.append(done)
        self._wake.set()
        if self._thread.is_alive():
            done.wait(timeout)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()
        for e in self.take_errors():  # of the last commit: nobody will take them any more
            warnings.warn(f"mpviz: {e}", RuntimeWarning, stacklevel=2)
        if self._kept:
            steps = _steps_of(self._kept)
            what = (f"{self._kept_rows} rows of steps {min(steps)}..{max(steps)} and " if steps
                    else "")
            warnings.warn(f"mpviz: the run store {self.path} could not be written at the end "
                          f"({self.store_errors.get('last_error')}): {what}the run's last meta "
                          "updates (its status among them) are not in it.", RuntimeWarning,
                          stacklevel=2)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            closing = self._closing
            with self._lock:
                pending, self._pending = self._pending, []
                waiters, self._waiters = self._waiters, []
                self._pending_bytes = 0
            if pending or self._kept:
                t0 = time.thread_time()
                self._write(pending)
                self.busy_s += time.thread_time() - t0
                self.later_done += sum(len(rows) for table, rows in pending if table == "later")
            for w in waiters:
                w.set()
            if closing:
                break
        if self._con is not None:
            try:
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:  # no space to checkpoint: the WAL stays, readers read it
                pass
            self._con.close()

    def _write(self, pending: list[tuple[str, Any]]) -> None:
        """Commit the kept rows and ``pending``; on failure, the same without the statistics;
        on failure again, keep the rows for the next commit."""
        rows = [p for p in pending if p[0] != "later"]
        later = [p for p in pending if p[0] == "later"]
        if later and self._skip_stats:
            self._skip_stats -= 1
            self._dropped("statistics_dropped", "statistics_steps", _count(later), rows)
            later = []
        tries = [self._kept + rows + later] + ([self._kept + rows] if later else [])
        for n, batch in enumerate(tries):
            try:
                self._commit(batch)
            except Exception as e:  # noqa: BLE001 - the writer thread must not die
                error = e
                self._failed(e, rows)
                if n == 0 and later:
                    self._dropped("statistics_dropped", "statistics_steps", _count(later), rows)
                    self._skip_stats = 10
            else:
                self._kept, self._kept_rows = [], 0
                return
        if not isinstance(error, (sqlite3.OperationalError, OSError)):
            # rows the store refuses (not a full disk): they would fail again
            self._dropped("rows_dropped", "rows", _count(rows), rows, error)
            return
        for table, rs in rows:
            if table != "meta" and self._kept_rows + len(rs) > self.max_kept_rows:
                self._dropped("rows_dropped", "rows", len(rs), [(table, rs)], error)
                continue
            self._kept.append((table, rs))
            self._kept_rows += _count([(table, rs)])

    def _failed(self, e: BaseException, rows: list[tuple[str, Any]]) -> None:
        err = self.store_errors
        if not err:
            steps = _steps_of(rows)
            err.update(error=f"{type(e).__name__}: {e}", at_step=min(steps, default=None),
                       time=time.time(), failed_commits=0)
            with self._lock:
                self.errors.append(RunStoreError(
                    f"the run store {self.path} could not be written"
                    + (f" at step {err['at_step']}" if steps else "") + f" ({err['error']}): "
                    "statistics are dropped first; what could not be written is in "
                    "run.meta['store_errors'] once the store takes it"))
        err["failed_commits"] += 1
        err["last_error"] = f"{type(e).__name__}: {e}"
        self._store_errors_written = False

    def _dropped(self, key: str, count: str, n: int, rows: list[tuple[str, Any]],
                 e: BaseException | None = None) -> None:
        """Note in ``store_errors[key]`` that ``n`` (``count``) of the steps of ``rows`` were
        dropped; the first time rows (``e``: why) are dropped, an error says so."""
        steps = _steps_of(rows)
        d = self.store_errors.setdefault(key, {"from_step": None, "to_step": None, count: 0})
        if e is not None and not d[count]:
            with self._lock:
                self.errors.append(RunStoreError(
                    f"rows of the run store {self.path} are dropped"
                    + (f" from step {min(steps)}" if steps else "")
                    + f" ({type(e).__name__}: {e}); counted in run.meta['store_errors']"))
        d[count] += n
        if steps:
            lo, hi = min(steps), max(steps)
            d["from_step"] = lo if d["from_step"] is None else min(d["from_step"], lo)
            d["to_step"] = hi if d["to_step"] is None else max(d["to_step"], hi)
        self._store_errors_written = False

    def _commit(self, pending: list[tuple[str, Any]]) -> None:
        try:
            gone = os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            gone = True
        if gone:  # SQLite would go on writing into the removed file, unseen
            raise RunStoreError(f"{self.path} was deleted or replaced during the run")
        if self._con is None:
            self._con = sqlite3.connect(self._uri, uri=True)
            self._con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against kill
        con = self._con
        if not self._store_errors_written:
            pending = pending + [("meta", [{"store_errors": self.store_errors}])]
        try:
            with con:
                for table, rows in self._expand(pending):
                    if table == "meta":
                        for meta in rows:
                            RunWriter._write_meta(con, meta)
                        continue
                    cols = COLUMNS[table]
                    con.executemany(f"INSERT INTO {table} ({','.join(cols)}) "
                                    f"VALUES ({','.join('?' * len(cols))})", rows)
        except BaseException:
            try:
                con.rollback()
            except sqlite3.Error:
                pass
            raise
        self._store_errors_written = True

    def _expand(self, pending: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        later: dict[Any, list[Any]] = {}  # make_rows -> its items, in order
        for table, rows in pending:
            if table == "later":
                for make_rows, item in rows:
                    later.setdefault(make_rows, []).append(item)
            else:
                yield table, rows
        for make_rows, items in later.items():
            for i in range(0, len(items), 64):  # bounded temporaries
                if make_rows in self._failed_makers:
                    break
                try:
                    made = make_rows(items[i:i + 64])
                except Exception as e:  # noqa: BLE001 - that part stops, the rest is written
                    self._failed_makers.add(make_rows)
                    with self._lock:
                        self.errors.append(e)
                    break
                yield from made


def _steps_of(rows: list[tuple[str, Any]]) -> list[int]:
    """The steps of queued rows (a step table's first column is its step)."""
    return [r[0] for table, rs in rows if table != "meta" for r in rs]


def _count(rows: list[tuple[str, Any]]) -> int:
    return sum(len(rs) for table, rs in rows if table != "meta")


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
                RunWriter._write_meta(con, {"thinned": list(meta.get("thinned") or []) + [
                    {"keep_every": int(keep_every), "before_step": before_step,
                     "rows_dropped": n, "time": time.time()}]})
            dropped += n
            if vacuum if vacuum is not None else meta.get("status") != "running":
                con.execute("VACUUM")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    return {"rows_dropped": dropped, "bytes_before": before, "bytes_after": size()}
