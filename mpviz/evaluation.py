"""Evaluate a model at several precisions (``evaluate``) and measure the activation memory a
precision policy saves (``memory_report``).

A batch is an ``(x, y)`` pair (called as ``model(x)``), a dict of keyword arguments
(``model(**batch)``, labels under ``"labels"``), or anything a ``forward(model, batch)`` you
pass handles. An output with ``.loss`` / ``.logits`` (a Hugging Face ``ModelOutput``) is read
as such.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from mpviz import compat, tree
from mpviz.formats import dtype_name
from mpviz.metrics import accuracy, cross_entropy
from mpviz.precision import PrecisionPolicy, apply_policy, canonical, resolve_policy

__all__ = ["Evaluation", "evaluate", "memory_report"]

Forward = Callable[[nn.Module, Any], Any]
Metric = Callable[[torch.Tensor, torch.Tensor], Any]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_BATCHES = ("Batches are (x, y) pairs (called as model(x)) or dicts of keyword arguments (called as "
            "model(**batch); labels, if any, under 'labels'). For anything else pass "
            "forward=lambda model, batch: model(...), which returns the model's output.")
_SUMMARY_COLUMNS = ["precision", "loss", "metric", "samples", "batches"]
_LAYER_COLUMNS = ["precision", "layer", "type", "dtype", "rel_l2", "max_abs", "nonfinite"]
_MEMORY_COLUMNS = ("param_bytes", "saved_activation_bytes", "saved_activation_bytes_fp32")


@dataclass
class Evaluation:
    """What :func:`evaluate` returns.

    ``summary``: per precision, ``precision, loss, metric, samples, batches``.
    ``layers``: per (precision other than fp32, layer), ``precision, layer, type, dtype, rel_l2,
    max_abs, nonfinite``: the layer's output on the first batch against its fp32 output (the
    error includes what the layer received from the layers before it).
    """

    summary: pd.DataFrame
    layers: pd.DataFrame

    def worst_layers(self, precision: str, n: int = 10) -> pd.DataFrame:
        """The ``n`` layers with the largest relative error at ``precision``."""
        rows = self.layers[self.layers["precision"] == precision]
        return rows.sort_values("rel_l2", ascending=False).head(n)


# ----------------------------------------------------------------------------- batches


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)  # e.g. a Hugging Face BatchEncoding (a UserDict)
    return tree.map_tensors(lambda t: t.to(device), batch)


def _run(model: nn.Module, batch: Any, forward: Forward | None) -> Any:
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if _is_pair(batch):
        return model(batch[0])
    raise ValueError(f"Cannot run a batch of type {type(batch).__name__}. {_BATCHES}")


def _labels(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return batch[1] if _is_pair(batch) else None


def _samples(batch: Any, y: Any) -> int:
    """The length of the labels, else of the batch's first tensor."""
    if isinstance(y, (list, tuple)) or (isinstance(y, torch.Tensor) and y.dim() > 0):
        return len(y)
    first = next(tree.tensors(batch), None)
    return len(first) if first is not None and first.dim() > 0 else 1


def _logits(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else tree.first_float(out)


def _batches(data: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    """``data`` as something to read once per precision."""
    if isinstance(data, (Mapping, torch.Tensor)):
        raise TypeError(f"data is one {type(data).__name__}, not an iterable of batches; pass a list "
                        f"of batches, e.g. [batch]. {_BATCHES}")
    if iter(data) is data or max_batches is not None:  # a one-shot iterator is kept
        return list(itertools.islice(data, max_batches))
    return data


# ----------------------------------------------------------------------------- loss and metric


def _default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not y.is_floating_point():
        return cross_entropy(out, y)
    return nn.functional.mse_loss(out.float(), y.float())


def _default_metric(logits: Any, y: Any, paired: bool) -> Metric | None:
    """Accuracy where it is well defined, else None. A dict's labels count only one per example
    (logits ``(B, C)``, labels ``(B,)``): a causal LM shifts its labels inside the model."""
    if not (isinstance(logits, torch.Tensor) and isinstance(y, torch.Tensor)) or y.is_floating_point():
        return None
    if logits.dim() == 0 or logits.shape[:-1] != y.shape:
        return None
    if not paired and (logits.dim() != 2 or y.dim() != 1):
        return None
    return accuracy


def _loss(out: Any, y: Any, loss_fn: LossFn, i: int) -> float:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return float(loss)
    if y is None:
        raise ValueError(
            f"Batch {i} has no labels and the model's output ({type(out).__name__}) no .loss, so there "
            f"is no loss to compare. {_BATCHES} A forward= may also return an output with a .loss."
        )
    logits = _logits(out)
    if logits is None:
        raise ValueError(f"Batch {i}: the model's output ({type(out).__name__}) has no floating tensor "
                         "to compute a loss from; pass forward= returning the logits or an output with .loss.")
    return float(loss_fn(logits, y))


@dataclass
class _Score:
    """Sample-weighted sums of one precision's loss and metric over the batches."""

    label: str
    loss: float = 0.0
    metric: float = 0.0
    samples: int = 0
    metric_samples: int = 0
    batches: int = 0
    metric_name: str | None = None
    first: Any = None  # the first batch, on the model's device

    def add(self, batch: Any, out: Any, loss_fn: LossFn, metric: Metric | None) -> None:
        y = _labels(batch)
        n = _samples(batch, y)
        self.loss += _loss(out, y, loss_fn, self.batches) * n
        logits = _logits(out)
        if metric is None or y is None:
            metric = _default_metric(logits, y, paired=not isinstance(batch, Mapping))
        if metric is not None:
            self.metric_name = getattr(metric, "__name__", "metric").strip("_")
            self.metric += float(metric(logits, y)) * n
            self.metric_samples += n
        self.samples += n
        self.batches += 1
        if self.first is None:
            self.first = batch

    def row(self) -> dict[str, Any]:
        return {"precision": self.label, "loss": self.loss / self.samples,
                "metric": self.metric / self.metric_samples if self.metric_samples else math.nan,
                "samples": self.samples, "batches": self.batches}


# ----------------------------------------------------------------------------- evaluate


def _device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _label(p: Any) -> tuple[str, PrecisionPolicy]:
    if isinstance(p, str):
        name = canonical(p)
        return name, PrecisionPolicy({"*": name})
    policy = p if isinstance(p, PrecisionPolicy) else PrecisionPolicy(p)
    return str(policy.rules), policy


def _policies(model: nn.Module, precisions: Sequence[Any]) -> list[tuple[str, PrecisionPolicy]]:
    """(label, policy) per precision, checked against the model before any work is done."""
    labelled = [_label(p) for p in precisions]
    if not labelled:
        raise ValueError("precisions is empty; pass e.g. ['fp32', 'bf16', 'fp16', 'fp8_e4m3'].")
    for _, policy in labelled:
        resolve_policy(model, policy)
    return labelled


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, then each module's own train/eval flag back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A compiled model is measured as its eager module: your layer names, and hooks that run."""
    @functools.wraps(fn)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with compat.force_eager():
            return fn(compat.user_module(model), *args, **kwargs)
    return run


@_eager
def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    precisions: Sequence[str | Mapping[str, str] | PrecisionPolicy] = ("fp32", "bf16", "fp16", "fp8_e4m3"),
    metric: Metric | None = None,
    loss_fn: LossFn | None = None,
    device_type: str | None = None,
    max_batches: int | None = None,
    forward: Forward | None = None,
) -> Evaluation:
    """Loss and metric of ``model`` on ``data`` at each precision, and per-layer error vs fp32.

    Each precision runs the whole model under ``{"*": p}`` (or the policy given), in eval mode,
    without gradients; modes and hooks are as before afterwards. The loss is the output's
    ``.loss``, else ``loss_fn(logits, y)`` (cross-entropy for integer labels, else MSE); the
    metric defaults to accuracy where labels are one per prediction, else NaN. Both are
    sample-weighted means; per-layer errors are taken on the first batch.

        >>> from mpviz.tasks import TASKS
        >>> model, (x, y) = TASKS["digits"].model(seed=0), TASKS["digits"].eval_batch()
        >>> ev = evaluate(model, [(x[:64], y[:64])], precisions=["fp32", "bf16"])
        >>> ev.summary["precision"].tolist()
        ['fp32', 'bf16']
    """
    labelled = _policies(model, precisions)
    data = _batches(data, max_batches)
    device = _device(model)
    device_type = device_type or device.type
    with _eval_mode(model), torch.no_grad():
        scores = [_score(model, label, policy, data, device, device_type, forward,
                         loss_fn or _default_loss, metric) for label, policy in labelled]
        layers = _layer_table(model, labelled, scores[0].first, forward, device_type)
    summary = pd.DataFrame([s.row() for s in scores], columns=_SUMMARY_COLUMNS)
    summary.attrs["metric"] = next((s.metric_name for s in reversed(scores) if s.metric_name), None)
    return Evaluation(summary, layers)


def _score(model: nn.Module, label: str, policy: PrecisionPolicy, data: Iterable[Any],
           device: torch.device, device_type: str, forward: Forward | None, loss_fn: LossFn,
           metric: Metric | None) -> _Score:
    score = _Score(label)
    with apply_policy(model, policy, device_type=device_type):
        for batch in data:
            batch = _to(batch, device)
            score.add(batch, _run(model, batch, forward), loss_fn, metric)
    if score.batches == 0:
        raise ValueError(f"data yielded no batches. {_BATCHES}")
    return score


class _Outputs:
    """Every module's floating outputs of one forward (all calls, flattened, kept in fp32)."""

    def __init__(self, model: nn.Module) -> None:
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.dtypes: dict[str, torch.dtype] = {}
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in model.named_modules()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            for t in (t for t in tree.tensors(out) if t.is_floating_point()):
                self.dtypes.setdefault(name, t.dtype)
                self.values[name].append(t.detach().flatten().float())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def flat(self, name: str) -> torch.Tensor | None:
        parts = self.values.get(name)
        return torch.cat(parts) if parts else None


def _capture(model: nn.Module, policy: PrecisionPolicy, batch: Any, forward: Forward | None,
             device_type: str) -> _Outputs:
    outputs = _Outputs(model)  # registered before the policy; its fp32 cast-back runs after these
    try:
        with apply_policy(model, policy, device_type=device_type):
            _run(model, batch, forward)
    finally:
        outputs.remove()
    return outputs


def _layer_table(model: nn.Module, labelled: list[tuple[str, PrecisionPolicy]], batch: Any,
                 forward: Forward | None, device_type: str) -> pd.DataFrame:
    reference = _capture(model, PrecisionPolicy({"*": "fp32"}), batch, forward, device_type)
    rows = []
    for label, policy in labelled:
        if label != "fp32":
            got = _capture(model, policy, batch, forward, device_type)
            rows += _layer_errors(label, model, got, reference)
    return pd.DataFrame(rows, columns=_LAYER_COLUMNS)


def _layer_errors(label: str, model: nn.Module, got: _Outputs, ref: _Outputs) -> list[dict[str, Any]]:
    rows = []
    for name, mod in model.named_modules():
        a, b = got.flat(name), ref.flat(name)
        if a is None or b is None or a.shape != b.shape:
            continue  # never called, or a different output structure
        diff = a.double() - b.double()
        ref_norm = float(torch.linalg.vector_norm(b.double()))
        err_norm = float(torch.linalg.vector_norm(diff))
        rel = err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else math.inf)
        rows.append({
            "precision": label, "layer": name, "type": type(mod).__name__,
            "dtype": dtype_name(got.dtypes[name]),
            "rel_l2": rel, "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
            "nonfinite": int((~torch.isfinite(a)).sum()),
        })
    return rows


# ----------------------------------------------------------------------------- memory


def _storage_key(t: torch.Tensor) -> tuple[Any, int]:
    """(identity of the memory ``t`` lives in, its size in bytes): views share one key."""
    try:
        st = t.untyped_storage()
        return (t.device, st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return ("id", id(t)), t.numel() * t.element_size()


@contextlib.contextmanager
def _running_modules(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules running now, innermost last, kept up to date by hooks."""
    names = {id(m): n for n, m in model.named_modules()}
    running: list[str] = []

    def push(mod: nn.Module, args: Any) -> None:
        running.append(names.get(id(mod), ""))

    def pop(mod: nn.Module, args: Any, out: Any) -> None:
        if running:
            running.pop()

    hooks = []
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(push))
        hooks.append(m.register_forward_hook(pop, always_call=True))
    try:
        yield running
    finally:
        for h in hooks:
            h.remove()


def _saved_bytes(model: nn.Module, policy: PrecisionPolicy, batch: Any, forward: Forward,
                 device_type: str) -> dict[str, int]:
    """Bytes autograd saves for backward during one forward, per innermost running module."""
    params = {_storage_key(p)[0] for p in model.parameters()}
    seen: set[Any] = set()
    saved: dict[str, int] = defaultdict(int)
    with _running_modules(model) as running:
        def pack(t: torch.Tensor) -> torch.Tensor:
            key, nbytes = _storage_key(t)
            if key not in params and key not in seen:  # parameters are not activations; count once
                seen.add(key)
                saved[running[-1] if running else ""] += nbytes
            return t

        with apply_policy(model, policy, device_type=device_type), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(model, batch)
        del out  # frees the graph and what it saved
    return dict(saved)


def _one_input(model: nn.Module, batch: Any) -> Any:
    """memory_report's default: a pair or a dict as in evaluate, anything else as the one input."""
    return _run(model, batch, None) if isinstance(batch, Mapping) or _is_pair(batch) else model(batch)


@_eager
def memory_report(model: nn.Module, policy: str | Mapping[str, str] | PrecisionPolicy, batch: Any,
                  device_type: str | None = None, forward: Forward | None = None) -> pd.DataFrame:
    """Per layer: parameter bytes and activation bytes saved for backward, under ``policy`` and fp32.

    Measured on one forward (gradients on, the model's own train/eval mode): each tensor autograd
    keeps counts once per storage, at the innermost module running when it was saved; autocast's
    weight copies count, parameters do not. Emulated fp8 layers keep fp32 copies: their figures
    are the emulation's. Columns ``layer, type, precision, param_bytes, saved_activation_bytes,
    saved_activation_bytes_fp32``; sums and ``ratio`` (policy / fp32) in ``df.attrs["totals"]``.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> df = memory_report(model, {"*": "bf16"}, torch.randn(4, 16))
        >>> df["saved_activation_bytes_fp32"].tolist()
        [0, 256, 512, 0]
    """
    policy = policy if isinstance(policy, PrecisionPolicy) else PrecisionPolicy(policy)
    resolved = resolve_policy(model, policy)
    device = _device(model)
    device_type = device_type or device.type
    batch = _to(batch, device)
    forward = forward or _one_input
    under_policy = _saved_bytes(model, policy, batch, forward, device_type)
    under_fp32 = _saved_bytes(model, PrecisionPolicy({"*": "fp32"}), batch, forward, device_type)
    own = _own_param_bytes(resolved.modules, resolved.names)
    # Ops run by the root module itself are the root's row ("").
    df = pd.DataFrame([{
        "layer": name, "type": type(resolved.modules[name]).__name__,
        "precision": resolved.decisions[name].precision, "param_bytes": own[name],
        "saved_activation_bytes": under_policy.get(name, 0),
        "saved_activation_bytes_fp32": under_fp32.get(name, 0),
    } for name in resolved.names])
    df.attrs["totals"] = _totals(df)
    return df


def _own_param_bytes(modules: Mapping[str, nn.Module], names: list[str]) -> dict[str, int]:
    """Bytes of each module's own parameters; a shared parameter counts at its first owner."""
    counted: set[int] = set()
    out = {}
    for name in names:
        own = 0
        for p in modules[name].parameters(recurse=False):
            if id(p) not in counted:
                counted.add(id(p))
                own += p.numel() * p.element_size()
        out[name] = own
    return out


def _totals(df: pd.DataFrame) -> dict[str, Any]:
    totals: dict[str, Any] = {c: int(df[c].sum()) for c in _MEMORY_COLUMNS}
    fp32 = totals["saved_activation_bytes_fp32"]
    totals["ratio"] = totals["saved_activation_bytes"] / fp32 if fp32 else math.nan
    return totals
