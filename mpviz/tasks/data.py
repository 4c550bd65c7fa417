"""The demo tasks' data (`digits_data`, `text_data`, `breast_cancer_data`: each a `Split` whose
held-out part is the same whatever the training seed) and their seeded batch streams."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["Batch", "Split", "TEXT_BYTES", "CONTEXT", "stdlib_text", "digits_data", "text_data",
           "breast_cancer_data", "shuffled_batches", "text_batches"]

Batch = tuple[torch.Tensor, torch.Tensor]

TEXT_BYTES = 300_000
CONTEXT = 32  # bytes per training window: short, so a step stays quick on a CPU


@dataclass(frozen=True)
class Split:
    """Train and held-out tensors of one task (inputs ``x``, targets ``y``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


def _split(x: torch.Tensor, y: torch.Tensor, n_eval: int) -> Split:
    # The split is fixed (seed 0) whatever the training seed, so every run of a task is
    # evaluated on the same held-out examples.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    ev, tr = perm[:n_eval], perm[n_eval:]
    return Split(x[tr], y[tr], x[ev], y[ev])


# ----------------------------------------------------------------------------- datasets


@functools.lru_cache(maxsize=None)
def digits_data() -> Split:
    """scikit-learn's 1797 digits as ``(N, 1, 8, 8)`` images in [0, 1]; 297 held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, n_eval=297)


@functools.lru_cache(maxsize=None)
def breast_cancer_data() -> Split:
    """scikit-learn's breast-cancer table, standardised; 114 rows held out."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    s = _split(x, y, n_eval=114)
    # Standardise with training statistics only: raw features span 1e-3..4e3.
    mean, std = s.x_train.mean(0), s.x_train.std(0).clamp_min(1e-6)
    return Split((s.x_train - mean) / std, s.y_train, (s.x_eval - mean) / std, s.y_eval)


def stdlib_text(n_bytes: int = TEXT_BYTES) -> bytes:
    """The first ``n_bytes`` of the top-level ``*.py`` files of Python's standard library (not
    starting with ``_``, sorted, joined by newlines): the same Python version gives the same text.

        >>> len(stdlib_text(1000))
        1000
    """
    lib = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in lib.glob("*.py") if not p.name.startswith("_"))
    out = bytearray()
    for p in files:
        out += p.read_bytes() + b"\n"
        if len(out) >= n_bytes:
            break
    if len(out) < 10 * CONTEXT:
        raise RuntimeError(
            f"found only {len(out)} bytes of Python source under {lib}; the 'text' demo needs the "
            "standard library as .py files (not zipped). Use task='digits' or 'mlp' instead."
        )
    return bytes(out[:n_bytes])


@functools.lru_cache(maxsize=None)
def text_data() -> Split:
    """`stdlib_text` as bytes: the first 90 % to train on, 64 windows of the rest held out."""
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    train, held = data[:cut], data[cut:]
    # A fixed held-out batch: 64 windows evenly spaced over the last 10 % of the text.
    starts = torch.linspace(0, len(held) - CONTEXT - 2, 64).long()
    xe = torch.stack([held[s : s + CONTEXT] for s in starts])
    ye = torch.stack([held[s + 1 : s + CONTEXT + 1] for s in starts])
    # x_train holds the raw byte stream; windows are cut on the fly by the batch iterator.
    return Split(train, train, xe, ye)


# ----------------------------------------------------------------------------- batch streams


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless epochs, each a fresh permutation from one seeded generator; drops the ragged tail."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i : i + bs]
            yield x[idx], y[idx]


def text_batches(split: Split, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless random windows of ``CONTEXT`` bytes; target is the input shifted by one."""
    g = torch.Generator().manual_seed(seed)
    data = split.x_train
    offsets = torch.arange(CONTEXT + 1)
    while True:
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch_size,), generator=g)
        win = data[starts[:, None] + offsets]
        yield win[:, :-1], win[:, 1:]
