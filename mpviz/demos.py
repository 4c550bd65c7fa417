"""Demo tasks on real, locally shipped data, and a `Trainer` that records them.

Three tasks, all small enough that one training step stays well under 100 ms on a 2-core CPU
even under bf16/fp16 autocast (which is several times *slower* than fp32 on CPUs without
bf16 instructions), and that learn visibly within a minute:

- ``digits``: a small CNN on scikit-learn's bundled 8x8 handwritten digits (10 classes).
- ``text``: a 2-block character-level transformer predicting the next byte of Python's own
  standard-library source code (read from ``os.path.dirname(os.__file__)``).
- ``mlp``: an MLP on scikit-learn's bundled breast-cancer table (30 standardised features,
  2 classes). Chosen over flattened digits so the three demos cover three kinds of data
  (images, text, tables) and the MLP does not just repeat the CNN's dataset.

Nothing is downloaded. Module names are stable (``conv1``, ``blocks.0.attn``, ``head``)
because users toggle per-layer precision by name.

    >>> from mpviz.demos import Trainer
    >>> t = Trainer(task="digits", precision="fp32", record=False, seed=0)
    >>> out = t.step(); sorted(out)
    ['loss', 'step']
    >>> t.close()
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mpviz.precision import PRECISIONS, PrecisionPolicy, apply_policy, canonical, validate_rules

__all__ = ["Task", "TASKS", "PRECISIONS", "Trainer", "get_task", "stdlib_text"]

Batch = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- data


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


@functools.lru_cache(maxsize=None)
def _digits() -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, n_eval=297)


@functools.lru_cache(maxsize=None)
def _breast_cancer() -> Split:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    s = _split(x, y, n_eval=114)
    # Standardise with training statistics only: raw features span 1e-3..4e3.
    mean, std = s.x_train.mean(0), s.x_train.std(0).clamp_min(1e-6)
    return Split((s.x_train - mean) / std, s.y_train, (s.x_eval - mean) / std, s.y_eval)


TEXT_BYTES = 300_000
CONTEXT = 32  # bytes per training window; with dim 32 and batch 16 an fp16 step stays ~25 ms here


def stdlib_text(n_bytes: int = TEXT_BYTES) -> bytes:
    """The first ``n_bytes`` of Python's standard-library sources, as one byte string.

    Files are the top-level ``*.py`` files of ``os.path.dirname(os.__file__)`` not starting
    with ``_``, in sorted order (``abc.py``, ``aifc.py``, ``argparse.py``, ...), joined by a
    newline. Same Python version, same text.

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
def _text() -> Split:
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    train, held = data[:cut], data[cut:]
    # A fixed held-out batch: 64 windows evenly spaced over the last 10 % of the text.
    starts = torch.linspace(0, len(held) - CONTEXT - 2, 64).long()
    xe = torch.stack([held[s : s + CONTEXT] for s in starts])
    ye = torch.stack([held[s + 1 : s + CONTEXT + 1] for s in starts])
    # x_train holds the raw byte stream; windows are cut on the fly by the batch iterator.
    return Split(train, train, xe, ye)


def _shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless epochs, each a fresh permutation from one seeded generator; drops the ragged tail."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i : i + bs]
            yield x[idx], y[idx]


def _text_batches(split: Split, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless random windows of ``CONTEXT`` bytes; target is the input shifted by one."""
    g = torch.Generator().manual_seed(seed)
    data = split.x_train
    offsets = torch.arange(CONTEXT + 1)
    while True:
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch_size,), generator=g)
        win = data[starts[:, None] + offsets]
        yield win[:, :-1], win[:, 1:]


# ----------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """conv1 -> relu1 -> pool1 -> conv2 -> relu2 -> pool2 -> fc1 -> relu3 -> head (8x8 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.head(self.relu3(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """fc1 -> act1 -> fc2 -> act2 -> fc3 -> act3 -> head."""

    def __init__(self, n_in: int = 30, hidden: int = 64, n_out: int = 2) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(n_in, hidden), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(hidden, hidden), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(hidden, hidden), nn.ReLU()
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        return self.head(x)


class Attention(nn.Module):
    """Causal multi-head self-attention: ``qkv`` projection, softmax attention, ``proj``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLPBlock(nn.Module):
    """``fc`` -> GELU ``act`` -> ``proj`` (4x expansion)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Byte-level GPT: ``tok_emb`` + ``pos_emb`` -> ``blocks.0``, ``blocks.1`` -> ``ln_f`` -> ``head``."""

    def __init__(self, vocab: int = 256, dim: int = 32, n_heads: int = 4, n_blocks: int = 2,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------- tasks


def _classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Flattening makes the same function serve (B, C) classifiers and (B, T, V) next-byte models.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@dataclass(frozen=True)
class Task:
    """One demo: data, a model factory, a loss, default hyper-parameters and a metric.

        >>> task = TASKS["digits"]
        >>> model = task.model(seed=0)
        >>> x, y = next(task.batches(seed=0))
        >>> task.loss_fn(model(x), y).item() > 0
        True
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    data: Callable[[], Split]
    batch_size: int
    lr: float
    metric_name: str  # "accuracy" (higher is better) or "bits_per_char" (lower is better)
    sequence: bool = False
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default=_classification_loss)

    def model(self, seed: int = 0) -> nn.Module:
        """A freshly initialised fp32 model; the same seed gives the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def batches(self, seed: int = 0, batch_size: int | None = None) -> Iterator[Batch]:
        """An endless, deterministic stream of ``(x, y)`` training batches for ``seed``."""
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        split = self.data()
        if self.sequence:
            return _text_batches(split, bs, seed)
        return _shuffled_batches(split.x_train, split.y_train, bs, seed)

    def eval_batch(self) -> Batch:
        """The fixed held-out batch the metric is computed on."""
        split = self.data()
        return split.x_eval, split.y_eval

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out ``loss`` and the task's metric for ``model`` (run as is, in eval mode).

        ``accuracy`` for classifiers, ``bits_per_char`` (loss / ln 2) for the text model.
        """
        x, y = self.eval_batch()
        was_training = model.training
        model.eval()
        try:
            logits = model(x)
        finally:
            model.train(was_training)
        loss = float(self.loss_fn(logits, y))
        if self.metric_name == "bits_per_char":
            return {"loss": loss, "bits_per_char": loss / math.log(2)}
        acc = float((logits.argmax(-1) == y).float().mean())
        return {"loss": loss, "accuracy": acc}


TASKS: dict[str, Task] = {
    "digits": Task("digits", "small CNN on scikit-learn's 8x8 handwritten digits (10 classes)",
                   DigitsCNN, _digits, batch_size=64, lr=3e-3, metric_name="accuracy"),
    "text": Task("text", "2-block char transformer on Python stdlib source (next byte)",
                 CharTransformer, _text, batch_size=16, lr=1e-2, metric_name="bits_per_char",
                 sequence=True),
    "mlp": Task("mlp", "MLP on scikit-learn's breast-cancer table (30 standardised features, 2 classes)",
                MLP, _breast_cancer, batch_size=64, lr=1e-3, metric_name="accuracy"),
}


def get_task(name: "str | Task") -> Task:
    """``TASKS[name]``, or a ValueError naming the valid tasks and close matches."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}.{hint}")
    return TASKS[name]


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Train one demo task step by step, optionally recording it with `mpviz.Recorder`.

    ``precision``: ``"fp32"`` (no autocast), ``"bf16"`` (autocast bf16), ``"fp16"`` (autocast
    fp16 + ``GradScaler("cpu")``), ``"fp8_e4m3"``/``"fp8_e5m2"`` (emulated through the policy
    ``{"*": precision}``). A precision policy is always applied (possibly empty), so
    ``t.policy_handle.update({"head": "fp32"})`` toggles a layer live from any thread.

        >>> t = Trainer(task="mlp", precision="bf16", record=False, seed=0)
        >>> first = t.step()["loss"]
        >>> for _ in range(30): last = t.step()["loss"]
        >>> last < first
        True
        >>> t.close()
    """

    def __init__(
        self,
        task: str = "digits",
        precision: str = "fp32",
        batch_size: int | None = None,
        lr: float | None = None,
        seed: int = 0,
        run_dir: str | os.PathLike[str] | None = None,
        every: int = 10,
        policy: Mapping[str, str] | Any | None = None,
        record: bool = True,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.task = get_task(task)
        self.precision = canonical(precision)  # also accepts float16, mixed_bfloat16, ...
        self.batch_size = int(batch_size if batch_size is not None else self.task.batch_size)
        self.lr = float(lr if lr is not None else self.task.lr)
        if self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size} and {self.lr}")
        self.seed = int(seed)
        self.model = self.task.model(self.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        self.scaler = torch.amp.GradScaler("cpu") if self.precision == "fp16" else None
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self._batches = self.task.batches(self.seed, self.batch_size)
        self._step = 0
        self._closed = False
        self._eval_model: nn.Module | None = None
        self.recorder: Any = None
        self.policy_handle: Any = None
        # step() and evaluate() may be called from different threads (a dashboard's worker and
        # its UI); the lock keeps evaluate() from reading weights halfway through an update.
        self._lock = threading.Lock()

        rules: dict[str, str] = {"*": self.precision} if self.precision.startswith("fp8") else {}
        if policy is not None:
            rules.update(getattr(policy, "rules", policy))  # a PrecisionPolicy or a plain mapping
        pol = PrecisionPolicy(rules)
        # Check names and precisions before a run directory is created for a policy that cannot apply.
        validate_rules(self.model, pol.rules, "cpu", pol.precisions())
        if record:
            import mpviz

            if run_dir is None:
                run_dir = Path("runs") / f"{self.task.name}-{self.precision}-{time.strftime('%Y%m%d-%H%M%S')}"
            info = {"task": self.task.name, "precision": self.precision, "batch_size": self.batch_size,
                    "lr": self.lr, "seed": self.seed, **(meta or {})}
            self.recorder = mpviz.Recorder(self.model, optimizer=self.optimizer, scaler=self.scaler,
                                           run_dir=run_dir, every=every, policy=pol, meta=info)
            try:
                self.recorder.__enter__()
            except BaseException as e:
                self.recorder.__exit__(type(e), e, e.__traceback__)  # no hooks left, run marked failed
                raise
            self.policy_handle = self.recorder.policy
        else:
            self.policy_handle = apply_policy(self.model, pol, device_type="cpu")

    @property
    def run(self) -> Any:
        """The live `mpviz.Run` being written, or None when not recording."""
        return None if self.recorder is None else self.recorder.run

    @property
    def steps_done(self) -> int:
        return self._step

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self._autocast_dtype)

    def step(self) -> dict[str, Any]:
        """One real training step on the next batch; returns ``{"step": i, "loss": float}``."""
        with self._lock:
            return self._train_step()

    def _train_step(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("this Trainer is closed; create a new one to keep training")
        x, y = next(self._batches)
        with self._autocast():
            loss = self.task.loss_fn(self.model(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.recorder is not None:
            index = self.recorder.step(loss=loss, samples=len(x))
        else:
            index = self._step
        self._step += 1
        return {"step": int(index), "loss": float(loss.detach())}

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and metric of the current weights, computed in plain fp32.

        Runs on a hook-free copy of the model, so it neither shows up in the recording nor
        depends on the training precision: runs at different precisions compare on one scale.
        """
        with self._lock:
            if self._eval_model is None:
                self._eval_model = self.task.model(self.seed)
            self._eval_model.load_state_dict(self.model.state_dict())
            return self.task.evaluate(self._eval_model)

    def close(self) -> None:
        """Finish the recording (or remove the policy); safe to call twice, from any thread."""
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        with self._lock:  # never in the middle of a step
            if self._closed:
                return
            self._closed = True
            if self.recorder is not None:
                # Marks the run "failed" when leaving a `with Trainer(...)` block by an exception.
                self.recorder.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
            elif self.policy_handle is not None:
                self.policy_handle.remove()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._finish(exc)

    def __repr__(self) -> str:
        return (f"Trainer(task={self.task.name!r}, precision={self.precision!r}, batch_size={self.batch_size}, "
                f"lr={self.lr}, seed={self.seed}, steps={self._step}, recording={self.recorder is not None})")
