"""Waiting on a condition in tests (never on the clock alone)."""
from __future__ import annotations

import time
from typing import Callable


def wait_for(cond: Callable[[], object], timeout: float = 120.0, every: float = 0.1) -> bool:
    """Poll ``cond`` until it is true; False after ``timeout`` s (which only bounds a broken
    test: no timing is asserted)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return False
