"""``mpviz.steer``: check that a run is a live steerable job, then post a request to its
mailbox (:mod:`mpviz.mailbox`); advice becomes the one request that applies it."""
from __future__ import annotations

import os
from typing import Any, Mapping

from .diagnosis.advise import advice_rules, is_advice, nothing_to_send
from .mailbox import FIX, SteerError, check_rules, post, process_gone
from .run import Run
from .store import RunStoreError

__all__ = ["steer", "check_steerable"]


def check_steerable(run_dir: str | os.PathLike) -> None:
    """Raise :class:`SteerError` unless ``run_dir`` holds a running, steerable recording."""
    try:
        run = Run(run_dir, rank=0)
    except RunStoreError as e:
        raise SteerError(f"cannot steer {str(run_dir)!r}: {e}. To steer a job, {FIX} and pass "
                         "the same run_dir here.") from None
    try:
        meta = run.meta
    finally:
        run.close()
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


def steer(run_dir: str | os.PathLike, rules: Mapping[str, str | None] | Any) -> int:
    """Ask the job recording ``run_dir`` to change per-layer precision; returns the request id
    (follow it with :func:`mpviz.steer_status`). ``rules``: ``{layer or glob: precision}``
    (``None`` removes a rule), or :func:`mpviz.advise`'s policy, sent as the layers it keeps in
    high precision whose precision differs. :class:`SteerError` if the run is missing, not
    steerable, finished or killed, or the advice changes nothing.

        >>> rid = mpviz.steer("runs/exp1", {"encoder.*.norm*": "fp32"})   # doctest: +SKIP
        >>> rid = mpviz.steer("runs/exp1", mpviz.advise("runs/exp1"))     # doctest: +SKIP
    """
    if is_advice(rules):
        check_steerable(run_dir)
        run = Run(run_dir)
        try:
            sent = advice_rules(run, rules)
        finally:
            run.close()
        if not sent:
            raise SteerError(f"the advice changes nothing in the job recording {str(run_dir)!r}: "
                             + nothing_to_send(rules))
        rules = sent
    rules = check_rules(rules)
    check_steerable(run_dir)
    return post(run_dir, rules)
