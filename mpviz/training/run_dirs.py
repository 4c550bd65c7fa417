"""Claiming a new run directory, safely when several processes or threads start runs at once."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["new_run_dir"]


def new_run_dir(root: str | os.PathLike[str], stem: str) -> Path:
    """Create and return a new, empty run directory ``root/stem`` (``stem-2``, ``-3``... if taken).

    ``os.mkdir`` fails when the directory exists, so two processes or threads asking for the
    same stem in the same second each get their own directory, never the same one.

        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> new_run_dir(root, "lab").name, new_run_dir(root, "lab").name
        ('lab', 'lab-2')
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory {root / stem}-N: 10,000 exist; "
                       f"clean up {root} or choose another stem")
