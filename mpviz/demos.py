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
import copy
import difflib
import functools
import math
import os
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mpviz import tree
from mpviz.precision import PRECISIONS, PrecisionPolicy, apply_policy, canonical, validate_rules

__all__ = ["Task", "TASKS", "PRECISIONS", "Trainer", "copy_model", "copy_optimizer", "demo_parts",
           "get_task", "model_layers", "new_run_dir", "stdlib_text"]

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


# ----------------------------------------------------------------------------- run directories


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


def model_layers(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """(name, type, own parameters, depth) of each module, as a run records them in its
    ``layers`` table: what the lab's layer table lists before a run exists.

        >>> model_layers(nn.Sequential(nn.Linear(2, 3)))
        [('', 'Sequential', 0, 0), ('0', 'Linear', 9, 1)]
    """
    from mpviz import compat

    return [(name, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)),
             0 if name == "" else name.count(".") + 1) for name, m in compat.named_modules(model)]


# ----------------------------------------------------------------------------- copies for a race

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


_DROPPED = object()


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` without any module hooks or ``forward`` wrappers that belong to
    another object (a recorder's hooks and a precision policy's hooks and wrapped forwards are
    attached while the lab trains; a copy must carry none of them, nor the objects they belong
    to). A ``forward`` bound to the module itself (a user's own) is kept."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for name in _HOOK_DICTS:
            d = getattr(m, name, None)
            if isinstance(d, dict):
                memo[id(d)] = type(d)()
        forward = m.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__self__ is not m:
            memo[id(forward)] = _DROPPED
    out = copy.deepcopy(model, memo)
    for m in out.modules():
        if m.__dict__.get("forward") is _DROPPED:
            del m.__dict__["forward"]   # the class's own forward again
    return out


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, copy_of: nn.Module) -> torch.optim.Optimizer:
    """A deep copy of ``optimizer`` that updates ``copy_of``'s parameters: same class, param
    groups and hyper-parameters, and a copy of its state (Adam's moments...); no step hooks."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    params = dict(copy_of.named_parameters(remove_duplicate=False))
    missing = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in names]
    if missing:
        raise ValueError(f"the optimizer updates {len(missing)} tensor(s) that are not parameters "
                         "of the model, so a copy of the model cannot take them: build the "
                         "optimizer over model.parameters()")
    # deepcopy maps each parameter to the copy's (state is keyed by parameter), copies the
    # state tensors, and leaves out the step hooks a recorder put on the optimizer.
    memo: dict[int, Any] = {pid: params[n] for pid, n in names.items()}
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        d = getattr(optimizer, name, None)
        if isinstance(d, dict):
            memo[id(d)] = type(d)()
    return copy.deepcopy(optimizer, memo)


# ----------------------------------------------------------------------------- trainer

LossFn = Callable[[nn.Module, Any], Any]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def demo_parts(task: "str | Task" = "digits", seed: int = 0, batch_size: int | None = None,
               lr: float | None = None) -> dict[str, Any]:
    """A demo task as the lab's generic parts: ``model``, ``optimizer``, ``loss_fn``, ``data``,
    ``eval_fn``, ``eval_data`` (what `Trainer(model=..., ...)` and `lab_app(model=...)` take),
    plus ``meta`` (task, batch_size, lr, seed).

        >>> parts = demo_parts("mlp", seed=0)
        >>> float(parts["loss_fn"](parts["model"], next(iter(parts["data"])))) > 0
        True
    """
    task = get_task(task)
    bs = int(batch_size if batch_size is not None else task.batch_size)
    lr = float(lr if lr is not None else task.lr)
    if bs < 1 or not lr > 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0, got {bs} and {lr}")
    model = task.model(seed)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return task.loss_fn(model(batch[0]), batch[1])

    def eval_fn(model: nn.Module, batch: Batch) -> float:
        logits = model(batch[0])
        if task.metric_name == "bits_per_char":
            return float(task.loss_fn(logits, batch[1])) / math.log(2)
        return float((logits.argmax(-1) == batch[1]).float().mean())

    eval_fn.__name__ = task.metric_name
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=lr),
            "loss_fn": loss_fn, "data": _Endless(task, seed, bs), "eval_fn": eval_fn,
            "eval_data": [task.eval_batch()],
            "meta": {"task": task.name, "batch_size": bs, "lr": lr, "seed": int(seed)}}


class _Endless:
    """A demo's batch stream as an iterable (one endless, seeded iterator)."""

    def __init__(self, task: Task, seed: int, batch_size: int) -> None:
        self._it = task.batches(seed, batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self._it


class Trainer:
    """Train a model step by step, optionally recording it with `mpviz.Recorder`: the one step
    runner behind the lab and ``python -m mpviz demo``.

    Either a demo task (``Trainer(task="digits", precision="fp16")``, see `demo_parts`), or your
    own parts:

    - ``model``, ``optimizer``, ``data`` (any iterable of batches; iterated again when it ends);
    - ``loss_fn(model, batch) -> loss`` (forward only): the trainer owns autocast
      (``precision``), the GradScaler (``grad_scaler``, ``init_scale``, ``growth_interval``;
      by default on for fp16 only), backward, ``optimizer.step()`` and ``zero_grad``;
    - or ``train_step(model, batch) -> loss``, which does backward and the step itself (pass its
      ``scaler`` so skipped steps and the loss scale are recorded); the AMP settings are its own.

    ``precision``: ``"fp32"`` (no autocast), ``"bf16"``, ``"fp16"`` (autocast on the model's
    device), ``"fp8_e4m3"``/``"fp8_e5m2"`` (emulated through the policy ``{"*": precision}``).
    A precision policy is always applied (possibly empty), so
    ``t.policy_handle.update({"head": "fp32"})`` toggles a layer live from any thread. Batches
    are moved to the model's device (every tensor in them, containers kept).

        >>> t = Trainer(task="mlp", precision="bf16", record=False, seed=0)
        >>> first = t.step()["loss"]
        >>> for _ in range(30): last = t.step()["loss"]
        >>> last < first
        True
        >>> t.close()
    """

    def __init__(
        self,
        task: "str | Task | None" = None,
        precision: str = "fp32",
        batch_size: int | None = None,
        lr: float | None = None,
        seed: int = 0,
        run_dir: str | os.PathLike[str] | None = None,
        every: int | None = None,
        policy: Mapping[str, str] | Any | None = None,
        record: bool = True,
        meta: Mapping[str, Any] | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn | None = None,
        train_step: LossFn | None = None,
        data: Iterable[Any] | None = None,
        scaler: Any = None,
        eval_fn: Callable[[nn.Module, Any], Any] | None = None,
        eval_data: Iterable[Any] | None = None,
        grad_scaler: bool | None = None,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        runs_root: str | os.PathLike[str] | None = None,
        run_name: str | None = None,
    ) -> None:
        self.precision = canonical(precision)  # also accepts float16, mixed_bfloat16, ...
        info: dict[str, Any] = {}
        if model is None:
            parts = demo_parts(task if task is not None else "digits", seed, batch_size, lr)
            info = parts.pop("meta")
            self.task: Task | None = get_task(info["task"])
            self.batch_size, self.lr = info["batch_size"], info["lr"]
            model, optimizer, loss_fn, data = parts["model"], parts["optimizer"], parts["loss_fn"], parts["data"]
            eval_fn, eval_data = parts["eval_fn"], parts["eval_data"]
        else:
            self.task = None
            self.batch_size, self.lr = batch_size, lr
            _check_parts(task, model, optimizer, loss_fn, train_step, data, self.precision)
        self.seed = int(seed)
        self.model, self.optimizer, self.data = model, optimizer, data
        self.loss_fn, self.train_step, self.eval_fn = loss_fn, train_step, eval_fn
        self.eval_data = eval_data
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        dtype = _AUTOCAST.get(self.precision)
        if train_step is not None:
            self.scaler = scaler          # the user's, if any: recorded, never driven by us
            self._autocast_dtype = None
        else:
            if scaler is not None:
                self.scaler = scaler
            else:
                on = self.precision == "fp16" if grad_scaler is None else bool(grad_scaler)
                self.scaler = (torch.amp.GradScaler(self.device.type, init_scale=float(init_scale),
                                                    growth_interval=int(growth_interval))
                               if on else None)
            self._autocast_dtype = dtype
        self._iter: Iterator[Any] | None = None
        self._last_batch: Any = None
        self._step = 0
        self._closed = False
        self._eval_model: nn.Module | None = None
        self._rng: tuple[Any, Any] | None = None   # this trainer's own RNG state (race lanes)
        self.evals: list[tuple[int, float]] = []   # (step, eval metric) from run_eval()
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
        validate_rules(self.model, pol.rules, self.device.type, pol.precisions())
        if record:
            import mpviz

            info = {**info, "precision": self.precision if train_step is None else "train_step",
                    **(meta or {})}
            if run_dir is None:
                stem = run_name or (f"{info.get('task') or type(model).__name__}-{info['precision']}-"
                                    f"{time.strftime('%Y%m%d-%H%M%S')}")
                run_dir = new_run_dir(runs_root if runs_root is not None else "runs", stem)
            info.setdefault("amp", self.amp_settings())
            self.recorder = mpviz.Recorder(self.model, optimizer=self.optimizer, scaler=self.scaler,
                                           run_dir=run_dir, every=every, policy=pol, meta=info)
            try:
                self.recorder.__enter__()
            except BaseException as e:
                self.recorder.__exit__(type(e), e, e.__traceback__)  # no hooks left, run marked failed
                raise
            self.policy_handle = self.recorder.policy
        else:
            self.policy_handle = apply_policy(self.model, pol, device_type=self.device.type)

    # ------------------------------------------------------------------ reading
    @property
    def run(self) -> Any:
        """The live `mpviz.Run` being written, or None when not recording."""
        return None if self.recorder is None else self.recorder.run

    @property
    def steps_done(self) -> int:
        return self._step

    @property
    def owns_step(self) -> bool:
        """True when the trainer runs autocast, the GradScaler and the optimizer (``loss_fn``)."""
        return self.train_step is None

    def amp_settings(self) -> dict[str, Any]:
        """What AMP does here: ``autocast`` (precision name or None), ``grad_scaler`` (bool),
        ``init_scale``, ``growth_interval`` (of the GradScaler, when enabled), ``owner``."""
        from mpviz.compat import scaler_settings

        s = scaler_settings(self.scaler) or {"enabled": False}
        # torch's GradScaler has no get_init_scale(): read the attribute it keeps.
        init = s.get("init_scale", getattr(self.scaler, "_init_scale", None)) if s["enabled"] else None
        return {"owner": "lab" if self.owns_step else "train_step",
                "autocast": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self._autocast_dtype),
                "grad_scaler": bool(s["enabled"]), "init_scale": None if init is None else float(init),
                "growth_interval": s.get("growth_interval")}

    # ------------------------------------------------------------------ stepping
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def next_batch(self) -> Any:
        """The next batch of ``data`` (iterated again from the start when it ends)."""
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.data)
            try:
                return next(self._iter)
            except StopIteration:
                raise ValueError("data yields no batches when iterated again: pass something that "
                                 "can be iterated more than once (a list, a DataLoader), not a "
                                 "generator") from None

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with this trainer's own RNG state, if it has one (race lanes: same dropout masks)."""
        if self._rng is None:
            yield
            return
        from mpviz.compat import get_rng_state, set_rng_state

        outer = get_rng_state(self.device)
        set_rng_state(self._rng, self.device)
        try:
            yield
        finally:
            self._rng = get_rng_state(self.device)
            set_rng_state(outer, self.device)

    def own_rng(self) -> None:
        """From now on, step with a private copy of the current RNG state (torch's default
        generators): trainers given it at the same moment draw the same dropout masks."""
        from mpviz.compat import get_rng_state

        self._rng = get_rng_state(self.device)

    def step(self, batch: Any = None) -> dict[str, Any]:
        """One real training step on ``batch`` (default: the next one of ``data``); returns
        ``{"step": i, "loss": float}``."""
        with self._lock:
            return self._train_step(batch)

    def _train_step(self, batch: Any) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("this Trainer is closed; create a new one to keep training")
        if batch is None:
            batch = self.next_batch()
        if self.device.type != "cpu":
            batch = tree.map_tensors(lambda t: t.to(self.device, non_blocking=True), batch)
        self._last_batch = batch
        with self._own_rng():
            if self.train_step is not None:
                loss = self.train_step(self.model, batch)
            else:
                with self._autocast():
                    loss = self.loss_fn(self.model, batch)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        first = next(tree.tensors(batch), None)
        samples = len(first) if first is not None and first.dim() > 0 else None
        if self.recorder is not None:
            index = self.recorder.step(loss=loss, samples=samples)
        else:
            index = self._step
        self._step += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        return {"step": int(index), "loss": value}

    def fork(self, precision: str, **kwargs: Any) -> "Trainer":
        """A race lane: a new Trainer over copies of this one's model and optimizer state (now),
        the same loss, data source and evaluation, at another ``precision``. ``kwargs`` go to
        `Trainer` (run_dir, runs_root, run_name, every, policy, record, meta, grad_scaler...)."""
        if not self.owns_step:
            raise ValueError("a race needs loss_fn: a train_step drives its own optimizer (and "
                             "scaler), which a copy of the model cannot share. Pass "
                             "loss_fn=lambda model, batch: ... to race precisions")
        with self._lock:
            model = copy_model(self.model)
            opt = copy_optimizer(self.optimizer, self.model, model)
        meta = {k: v for k, v in (self.recorder.run.meta if self.recorder else {}).items()
                if k in ("task", "batch_size", "lr", "seed", "app", "source")}
        lane = Trainer(precision=precision, model=model, optimizer=opt, loss_fn=self.loss_fn,
                       data=self.data, eval_fn=self.eval_fn, eval_data=self.eval_data,
                       seed=self.seed, **{"meta": meta, **kwargs})
        lane._rng = self._rng   # the same RNG state (if any): the same dropout masks
        return lane

    # ------------------------------------------------------------------ evaluation
    def _fp32_copy(self) -> nn.Module:
        """A hook-free copy of the model with the current weights (made once, then refreshed)."""
        if self._eval_model is None:
            self._eval_model = (self.task.model(self.seed) if self.task is not None
                                else copy_model(self.model))
        self._eval_model.load_state_dict(self.model.state_dict())
        return self._eval_model

    def evaluate(self) -> dict[str, float]:
        """A demo's held-out loss and metric of the current weights, computed in plain fp32.

        Runs on a hook-free copy of the model, so it neither shows up in the recording nor
        depends on the training precision: runs at different precisions compare on one scale.
        """
        if self.task is None:
            raise ValueError("evaluate() is for demo tasks; for your model pass eval_fn= and "
                             "eval_data= and call run_eval()")
        with self._lock:
            return self.task.evaluate(self._fp32_copy())

    @torch.no_grad()
    def run_eval(self) -> float | None:
        """``eval_fn(model, batch)`` averaged over ``eval_data`` (default: the next batch of
        ``data``), in fp32 on a hook-free copy of the current weights in eval mode; appended to
        ``self.evals`` as ``(steps done, value)``. None without an ``eval_fn``."""
        if self.eval_fn is None:
            return None
        with self._lock, self._own_rng():
            model = self._fp32_copy().eval()
            if self.eval_data is None and self._last_batch is None:
                return None     # nothing trained yet and no eval_data
            batches = list(self.eval_data) if self.eval_data is not None else [self._last_batch]
            values = [float(self.eval_fn(model, tree.map_tensors(lambda t: t.to(self.device), b)))
                      for b in batches]
            value = sum(values) / max(len(values), 1)
            self.evals.append((self._step, value))
            return value

    # ------------------------------------------------------------------ closing
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
        what = f"task={self.task.name!r}" if self.task is not None else f"model={type(self.model).__name__}"
        return (f"Trainer({what}, precision={self.precision!r}, batch_size={self.batch_size}, "
                f"lr={self.lr}, seed={self.seed}, steps={self._step}, recording={self.recorder is not None})")


def _check_parts(task: Any, model: Any, optimizer: Any, loss_fn: Any, train_step: Any, data: Any,
                 precision: str) -> None:
    """Errors that name the fix for a model passed with the wrong companions."""
    if task is not None:
        raise ValueError(f"pass either task={task!r} (a demo) or model=... (yours), not both")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is None:
        raise ValueError("with model=..., pass its optimizer=... too (the trainer steps it, and "
                         "the recorder counts a step per optimizer.step())")
    if (loss_fn is None) == (train_step is None):
        raise ValueError("pass exactly one of loss_fn(model, batch) -> loss (forward only; the "
                         "trainer does autocast, GradScaler, backward and the step) or "
                         "train_step(model, batch) -> loss (does backward and the step itself)")
    if data is None or not hasattr(data, "__iter__"):
        raise ValueError("pass data=...: any iterable of batches (a DataLoader, a list); it is "
                         "iterated again when it ends")
    if train_step is not None and precision != "fp32":
        raise ValueError(f"precision={precision!r} is for loss_fn: with train_step the autocast "
                         "and GradScaler are yours (per-layer precision still works: policy=...)")
