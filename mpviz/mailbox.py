"""Steer a training job that runs elsewhere: the run directory is the mailbox (``mpviz.steer``).

    >>> rid = mpviz.steer("runs/exp1", {"head": "fp32"})     # doctest: +SKIP
    >>> mpviz.steer_status("runs/exp1", rid)["status"]        # doctest: +SKIP
    'applied'

The job records with ``mpviz.Recorder(..., steerable=True)``; any process that can write its run
directory (a terminal, the explorer app, another notebook) posts ``{layer or glob: precision}``
requests (``None`` removes a rule). No socket, no server: requests go into ``run_dir/steer.db``,
a small SQLite file beside the run's ``run.db`` (which only the recorder writes). At the end of
each step the recorder looks for new requests (one ``PRAGMA data_version``, ~2 us), checks each
exactly as :meth:`mpviz.precision.PolicyHandle.update` does (unknown layer, with close matches;
unknown precision or one the device cannot run; removing a rule that does not exist), and either
applies it from the next step on (recorded in ``run.policy_changes`` at that step) or refuses it
with the reason. Each request's fate is in :func:`steer_status` / ``run.steer_requests``:
``pending`` → ``applied`` (``step``: the first step computed with it) or ``refused``
(``reason``). ``run.policy_changes`` shows an applied change once the recorder's writer commits
it (within ``flush_every_s``).

Who can steer: whoever can write the run directory (file permissions are the access control).

Local filesystems only: SQLite's WAL mode shares memory between the processes that open the
file, which network filesystems (NFS, SMB/CIFS, sshfs, most cloud-drive mounts) do not provide.
On such a mount the two sides may not see each other's writes, or may corrupt the file. Keep run
directories on a local disk of the machine that trains, and run the explorer on that machine
(reach it from elsewhere through an SSH tunnel).

No torch import: the dashboards use this module. (It is not called ``mpviz/steer.py`` so that
importing it never hides the function ``mpviz.steer`` behind a submodule of that name.)
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

from .formats import AUTOCAST_PRECISIONS, DTYPE_PRECISION
from .store import RunStoreError, connect_readonly, db_path

__all__ = ["steer", "steer_status", "steer_requests", "SteerError", "STEER_DB",
           "advice_rules", "advice_target", "precision_in_force", "process_gone", "run_status"]

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
    """True when a run says "running" but its recording process is gone (killed: SIGKILL, OOM,
    a closed terminal) - known only on the host that recorded it, on POSIX. False when it is
    alive or when this cannot be told (another host, no pid). A pid reused by a later process
    does not count as alive (see `_same_process`). The one liveness check of the steering
    mailbox, ``mpviz info`` and the apps."""
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


def check_steerable(run_dir: str | os.PathLike) -> None:
    """Raise :class:`SteerError` unless ``run_dir`` holds a running, steerable recording."""
    try:
        con = connect_readonly(db_path(run_dir))
    except RunStoreError as e:
        raise SteerError(f"cannot steer {str(run_dir)!r}: {e}. To steer a job, {FIX} and pass "
                         "the same run_dir here.") from None
    try:
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    finally:
        con.close()
    if not meta.get("steerable"):
        raise SteerError(f"the run in {str(run_dir)!r} is not steerable: {FIX} to accept "
                         "precision changes from other processes.")
    status = meta.get("status")
    if status != "running":
        raise SteerError(f"the run in {str(run_dir)!r} is {status}: only a job still training "
                         f"can be steered ({FIX} and steer it while it runs).")
    if process_gone(meta):
        raise SteerError(f"the run in {str(run_dir)!r} says it is running, but its process "
                         f"(pid {meta.get('pid')}) is gone: it was killed. Restart the job "
                         f"({FIX}) and steer the new run.")


def _check_rules(rules: Any) -> dict[str, str | None]:
    if not isinstance(rules, Mapping) or not rules:
        raise TypeError("steer takes a non-empty dict {layer name or glob: precision or None}, "
                        f"e.g. {{'head': 'fp32'}}; got {rules!r}")
    for k, v in rules.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str)):
            raise TypeError(f"steer rules map layer names or globs (str) to a precision name "
                            f"(str, e.g. 'fp32') or None (remove the rule); got {k!r}: {v!r}")
    return dict(rules)


def steer(run_dir: str | os.PathLike, rules: Mapping[str, str | None] | Any) -> int:
    """Ask the job recording ``run_dir`` to change per-layer precision; returns the request id.

    ``rules`` is ``{layer name or glob: precision}`` (``None`` removes that rule), as for
    ``PolicyHandle.update``, or the policy :func:`mpviz.advise` returns: then one request carries
    only the layers it keeps in high precision whose precision in force differs
    (:func:`advice_rules`; the rest of the job, and rules the user set, stay as they are). The
    job checks and applies it at its next step boundary; follow it with :func:`steer_status`
    (``pending``, ``applied`` at ``step``, or ``refused`` with a ``reason``). Raises
    :class:`SteerError` if the run is missing, not steerable, finished, or its process is gone,
    or if the advice changes nothing.

        >>> rid = mpviz.steer("runs/exp1", {"encoder.*.norm*": "fp32"})   # doctest: +SKIP
        >>> rid = mpviz.steer("runs/exp1", mpviz.advise("runs/exp1"))     # doctest: +SKIP
    """
    if _is_advice(rules):
        check_steerable(run_dir)
        from .run import load_run

        run = load_run(run_dir)
        try:
            sent = advice_rules(run, rules)
        finally:
            run.close()
        if not sent:
            raise SteerError(f"the advice changes nothing in the job recording {str(run_dir)!r}: "
                             + _nothing_why(rules))
        rules = sent
    rules = _check_rules(rules)
    check_steerable(run_dir)
    con = connect(run_dir)
    try:
        cur = con.execute("INSERT INTO requests (time, rules, status) VALUES (?, ?, ?)",
                          (time.time(), json.dumps(rules), PENDING))
        return int(cur.lastrowid)
    finally:
        con.close()


# ---------------------------------------------------------------- advice (mpviz.advise)


def _is_advice(policy: Any) -> bool:
    """A PrecisionPolicy from :func:`mpviz.advise` (it carries ``reasons``); no torch import."""
    if isinstance(policy, Mapping) or not hasattr(policy, "rules"):
        return False
    if not isinstance(getattr(policy, "reasons", None), Mapping):
        raise TypeError("steer takes a dict {layer name or glob: precision or None} or the policy "
                        "mpviz.advise returns; for a PrecisionPolicy of your own, pass its rules: "
                        "mpviz.steer(run_dir, policy.rules)")
    return True


def precision_in_force(run: Any) -> dict[str, str]:
    """``{layer: precision}`` each layer of the job runs in now: its policy's decision (the last
    of ``run.policy_changes``), or the outer autocast's (``fp32`` without one)."""
    outer = DTYPE_PRECISION.get(str(run.meta.get("autocast_dtype")), "fp32")
    now = dict.fromkeys(run.layers["layer"].astype(str), outer)
    last = run.policy_changes.drop_duplicates("layer", keep="last")
    for layer, p in zip(last["layer"], last["precision"]):
        now[str(layer)] = p if isinstance(p, str) else outer
    return now


def advice_target(run: Any) -> str:
    """The low precision to advise the job for (``mpviz.advise(run, target=...)``): the one its
    model runs in (``fp16`` or ``bf16``), else ``fp16`` (which layers fp16 would break)."""
    root = precision_in_force(run).get("", "fp32")
    return root if root in AUTOCAST_PRECISIONS else "fp16"


def advice_rules(run: Any, policy: Any) -> dict[str, str]:
    """The one request that applies ``policy`` (from :func:`mpviz.advise`) to the job recording
    ``run``: ``{layer: precision}`` for each layer the advice keeps in high precision
    (``policy.reasons``) whose precision in force differs. The advice's default (``"*"``) is not
    sent and no rule is removed: the rest of the job runs as it did."""
    now = precision_in_force(run)
    rules = policy.rules
    return {l: rules[l] for l in policy.reasons if l in rules and now.get(l) != rules[l]}


def _nothing_why(policy: Any) -> str:
    if not policy.reasons:
        return "it keeps no layer in high precision (nothing the run shows needs it)."
    kept = ", ".join(f"{l} ({policy.rules.get(l)})" for l in policy.reasons)
    return f"the layers it keeps in high precision already run so: {kept}."


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
