"""Errors inside the recorder: recorded once per part, which then stops; never raised into training."""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from .. import compat


class ErrorLog:
    def __init__(self, step: Callable[[], int | None],
                 publish: Callable[[list[dict[str, Any]]], None]) -> None:
        self.step, self.publish = step, publish  # the step under way; errors to run.meta
        self.errors: list[dict[str, Any]] = []
        self.broken: set[str] = set()

    def contained(self, part: str, fn: Callable, traced: bool = False) -> Callable:
        """``fn``, with any exception recorded instead of raised; a part that failed stops."""
        def run(*args: Any, **kwargs: Any) -> Any:
            if not traced and compat.is_compiling():
                return None  # traced into compiled code: a clock or RNG read would break the graph
            if part in self.broken:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - mpviz must never break the user's training
                self.record(part, e)
                return None
        return run

    def record(self, part: str, exc: BaseException, internal: bool = True,
               stacklevel: int = 3) -> None:
        self.broken.add(part)
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f"{Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
        self.errors.append({"part": part, "step": self.step(),
                            "error": f"{type(exc).__name__}: {exc}", "where": where})
        if internal:
            msg = (f"recording of {part!r} stopped after an internal error ({type(exc).__name__}:"
                   f" {exc}); training goes on unchanged. Details in run.meta['recorder_errors'];"
                   " please report it.")
        else:
            msg = f"{exc}; training goes on unchanged."
        warnings.warn(f"mpviz: {msg}", RuntimeWarning, stacklevel=stacklevel)
        self.publish(list(self.errors))
