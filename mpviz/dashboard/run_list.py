"""The runs an app offers: those under its runs folder, newest first, and the ones it was given
(each confined to the folder: one given outside it is refused with the message to show)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mpviz.run import list_runs, load_run

from . import paths


def scan(runs_dir: str | Path, given: Sequence[str | Path] = (),
         given_first: bool = False) -> tuple[list[Path], list[str]]:
    """(the run directories to list, one message per given run that is refused). The given
    ones not under ``runs_dir`` already come after the listed ones (``given_first``: before)."""
    found = [Path(p) for p in list_runs(runs_dir)]
    extra: list[Path] = []
    refused = []
    for p in given:
        try:
            paths.confine(runs_dir, p)
        except paths.RunUnavailable as e:  # outside the runs folder: not listed, not opened
            refused.append(str(e))
            continue
        if Path(p) not in found and Path(p) not in extra:
            extra.append(Path(p))
    return (extra + found if given_first else found + extra), refused


def newest_with_steps(runs: list[Path]) -> Path | None:
    """The first of ``runs`` (newest first) that has a recorded step; None if none has."""
    for path in runs:
        try:
            run = load_run(path)
            try:
                if run.last_step >= 0:
                    return path
            finally:
                run.close()
        except paths.STORE_ERRORS:   # unreadable: not the one to open first
            continue
    return None
