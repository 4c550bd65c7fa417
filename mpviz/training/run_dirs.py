"""Claiming a new run directory, safely when several processes or threads start runs at once."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["new_run_dir"]


def new_run_dir(root: str | os.PathLike[str], stem: str) -> Path:
    """A new, empty run directory ``root/stem`` (``stem-2``, ``-3``... if taken); ``os.mkdir``
    fails on an existing one, so two processes asking at once never get the same.

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
