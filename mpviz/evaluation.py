"""Evaluate a model at several precisions, and measure what a precision policy saves in memory.

``evaluate`` is what Keras users do when they evaluate one model in float32 and float16: the
loss and metric per precision, plus each layer's output error against fp32 on one batch, so
the layers that lose most stand out. ``memory_report`` measures (does not estimate) the bytes
autograd keeps for backward per layer, under a policy and under all-fp32.

A batch is an ``(x, y)`` pair (the model is called as ``model(x)``), a dict of keyword arguments
(``model(**batch)``, e.g. a Hugging Face batch with ``input_ids``, ``attention_mask``,
``labels``), or anything a ``forward(model, batch)`` callable you pass handles. An output with
``.loss`` / ``.logits`` (a Hugging Face ``ModelOutput``) is read as such.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from mpviz import compat, tree
from mpviz.formats import dtype_name
from mpviz.metrics import accuracy
from mpviz.precision import PrecisionPolicy, apply_policy, canonical, resolve_policy

__all__ = ["Evaluation", "evaluate", "memory_report"]

Forward = Callable[[nn.Module, Any], Any]

_BATCHES = ("Batches are (x, y) pairs (called as model(x)) or dicts of keyword arguments (called as "
            "model(**batch); labels, if any, under 'labels'). For anything else pass "
            "forward=lambda model, batch: model(...), which returns the model's output.")


@dataclass
class Evaluation:
    """What :func:`evaluate` returns.

    ``summary``: one row per precision: ``precision, loss, metric, samples, batches``.
    ``layers``: one row per (precision other than fp32, layer): ``precision, layer, type, dtype,
    rel_l2, max_abs, nonfinite`` -- the layer's output on the first batch against the same
    layer's fp32 output (errors accumulate through the model: a layer's error includes what
    it received from the layers before it).
    """

    summary: pd.DataFrame
    layers: pd.DataFrame

    def worst_layers(self, precision: str, n: int = 10) -> pd.DataFrame:
        """The ``n`` layers with the largest relative error at ``precision``."""
        rows = self.layers[self.layers["precision"] == precision]
        return rows.sort_values("rel_l2", ascending=False).head(n)


def _default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Flattened so the same loss serves (B, C) classifiers and (B, T, V) sequence models.
    if not y.is_floating_point():
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
    return nn.functional.mse_loss(out.float(), y.float())


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)  # e.g. a Hugging Face BatchEncoding (a UserDict)
    return tree.map_tensors(lambda t: t.to(device), batch)


def _run(model: nn.Module, batch: Any, forward: Forward | None) -> Any:
    """The model's output on one batch (see the module docstring for what a batch is)."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if _is_pair(batch):
        return model(batch[0])
    raise ValueError(f"Cannot run a batch of type {type(batch).__name__}. {_BATCHES}")


def _labels(batch: Any) -> Any:
    """``y`` of an ``(x, y)`` pair, ``batch["labels"]`` of a dict, else None."""
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return batch[1] if _is_pair(batch) else None


def _samples(batch: Any, y: Any) -> int:
    """Samples in a batch: the length of its labels, else of its first tensor."""
    if isinstance(y, (list, tuple)) or (isinstance(y, torch.Tensor) and y.dim() > 0):
        return len(y)
    first = next(tree.tensors(batch), None)
    return len(first) if first is not None and first.dim() > 0 else 1


def _logits(out: Any) -> Any:
    """What loss_fn and metric get: the output if a tensor, its ``.logits``, else its first float."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else tree.first_float(out)


def _default_metric(logits: Any, y: Any, paired: bool) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """Accuracy where it is well defined, else None (the metric is NaN).

    Integer ``y`` of an ``(x, y)`` pair is taken as aligned with the logits' rows. A dict's
    ``labels`` only when there is one per example (logits ``(B, C)``, labels ``(B,)``): a causal
    LM's labels are shifted inside the model, so a token accuracy on them would be wrong.
    """
    if not (isinstance(logits, torch.Tensor) and isinstance(y, torch.Tensor)) or y.is_floating_point():
        return None
    if logits.dim() == 0 or logits.shape[:-1] != y.shape:
        return None
    if not paired and (logits.dim() != 2 or y.dim() != 1):
        return None
    return accuracy


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


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A compiled model is measured as its eager module: layers by your own names, and the hooks
    that measure them run (inside compiled code they do not)."""
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
    metric: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device_type: str | None = None,
    max_batches: int | None = None,
    forward: Forward | None = None,
) -> Evaluation:
    """Loss and metric of ``model`` on ``data`` at each precision, and per-layer error vs fp32.

    ``data`` yields batches (a list, a DataLoader, or a one-shot iterator, which is read once
    and kept): ``(x, y)`` pairs, dicts called as ``model(**batch)`` (labels under
    ``"labels"``), or anything ``forward(model, batch)`` handles (labels are still looked up
    as ``batch[1]`` of a pair or ``batch["labels"]`` of a dict). Each precision runs the whole
    model under the policy ``{"*": p}`` (a dict or :class:`PrecisionPolicy` works too, e.g. a
    mixed policy to compare), in eval mode and without gradients; per-layer errors are taken
    on the first batch. Modes and hooks are as before afterwards.

    The loss is the output's ``.loss`` when it has one (Hugging Face models given labels),
    else ``loss_fn(logits, y)``: cross-entropy for integer labels, MSE otherwise. The logits are
    the output if it is a tensor, its ``.logits``, else its first floating tensor.
    ``metric(logits, y)`` defaults to accuracy for integer labels of ``(x, y)`` pairs, and for
    dict batches with one label per example (a classifier); it is NaN where it cannot be
    computed (no labels; a causal LM, whose labels the model shifts). ``loss`` and ``metric``
    are means over batches weighted by their samples (the length of the labels, else of the
    batch's first tensor).

        >>> from mpviz.tasks import TASKS
        >>> task = TASKS["digits"]
        >>> model = task.model(seed=0)
        >>> x, y = task.eval_batch()
        >>> ev = evaluate(model, [(x[:64], y[:64])], precisions=["fp32", "bf16"])
        >>> ev.summary["precision"].tolist()
        ['fp32', 'bf16']
        >>> ev.worst_layers("bf16", 1)["layer"].tolist()  # doctest: +SKIP
        ['head']

    A Hugging Face model takes its tokenizer's batches as they are (``labels`` included)::

        ev = evaluate(hf_model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    """
    labelled = [_label(p) for p in precisions]
    if not labelled:
        raise ValueError("precisions is empty; pass e.g. ['fp32', 'bf16', 'fp16', 'fp8_e4m3'].")
    for _, policy in labelled:
        resolve_policy(model, policy)  # bad names fail before any work is done
    if isinstance(data, (Mapping, torch.Tensor)):
        raise TypeError(f"data is one {type(data).__name__}, not an iterable of batches; pass a list "
                        f"of batches, e.g. [batch]. {_BATCHES}")
    loss_fn = loss_fn or _default_loss
    device = _device(model)
    device_type = device_type or device.type
    if iter(data) is data:  # a one-shot iterator: keep it to read once per precision
        data = list(itertools.islice(data, max_batches))
    elif max_batches is not None:
        data = list(itertools.islice(data, max_batches))

    modes = _modes(model)
    model.eval()
    summary, layers = [], []
    metric_name = None
    try:
        with torch.no_grad():
            first: Any = None
            for label, policy in labelled:
                loss_sum = metric_sum = 0.0
                samples = metric_samples = batches = 0
                with apply_policy(model, policy, device_type=device_type):
                    for i, batch in enumerate(data):
                        batch = _to(batch, device)
                        if first is None:
                            first = batch
                        out = _run(model, batch, forward)
                        y = _labels(batch)
                        n = _samples(batch, y)
                        loss_sum += _loss(out, y, loss_fn, i) * n
                        logits = _logits(out)
                        m_fn = (metric if metric is not None and y is not None
                                else _default_metric(logits, y, paired=not isinstance(batch, Mapping)))
                        if m_fn is not None:
                            metric_name = getattr(m_fn, "__name__", "metric").strip("_")
                            metric_sum += float(m_fn(logits, y)) * n
                            metric_samples += n
                        samples += n
                        batches += 1
                if batches == 0:
                    raise ValueError(f"data yielded no batches. {_BATCHES}")
                summary.append({
                    "precision": label, "loss": loss_sum / samples,
                    "metric": metric_sum / metric_samples if metric_samples else math.nan,
                    "samples": samples, "batches": batches,
                })
            # Per-layer outputs on the first batch: fp32 reference, then each other precision.
            reference = _capture(model, PrecisionPolicy({"*": "fp32"}), first, forward, device_type)
            for label, policy in labelled:
                if label == "fp32":
                    continue
                got = _capture(model, policy, first, forward, device_type)
                layers += _layer_errors(label, model, got, reference)
    finally:
        for m, mode in modes.items():
            m.training = mode
    summary_df = pd.DataFrame(summary, columns=["precision", "loss", "metric", "samples", "batches"])
    summary_df.attrs["metric"] = metric_name
    layer_cols = ["precision", "layer", "type", "dtype", "rel_l2", "max_abs", "nonfinite"]
    return Evaluation(summary_df, pd.DataFrame(layers, columns=layer_cols))


def _loss(out: Any, y: Any, loss_fn: Callable[[Any, Any], torch.Tensor], i: int) -> float:
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


def _capture(model: nn.Module, policy: PrecisionPolicy, batch: Any, forward: Forward | None,
             device_type: str) -> _Outputs:
    outputs = _Outputs(model)  # registered before the policy; its fp32 cast-back runs after these
    try:
        with apply_policy(model, policy, device_type=device_type):
            _run(model, batch, forward)
    finally:
        outputs.remove()
    return outputs


# ----------------------------------------------------------------------------- memory


def _storage_key(t: torch.Tensor) -> tuple[Any, int]:
    """(identity of the memory ``t`` lives in, its size in bytes): views share one key."""
    try:
        st = t.untyped_storage()
        return (t.device, st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return ("id", id(t)), t.numel() * t.element_size()


def _saved_bytes(model: nn.Module, policy: PrecisionPolicy, batch: Any, forward: Forward,
                 device_type: str) -> dict[str, int]:
    """Bytes autograd saves for backward during one forward, per innermost running module."""
    names = {id(m): n for n, m in model.named_modules()}
    params = {_storage_key(p)[0] for p in model.parameters()}
    running: list[str] = []
    seen: set[Any] = set()
    saved: dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in params and key not in seen:  # parameters are not activations; count once
            seen.add(key)
            saved[running[-1] if running else ""] += nbytes
        return t

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
        with apply_policy(model, policy, device_type=device_type), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(model, batch)
        del out  # frees the graph and what it saved
    finally:
        for h in hooks:
            h.remove()
    return dict(saved)


def _one_input(model: nn.Module, batch: Any) -> Any:
    """memory_report's default: a pair or a dict as in evaluate, anything else as the one input."""
    return _run(model, batch, None) if isinstance(batch, Mapping) or _is_pair(batch) else model(batch)


@_eager
def memory_report(model: nn.Module, policy: str | Mapping[str, str] | PrecisionPolicy, batch: Any,
                  device_type: str | None = None, forward: Forward | None = None) -> pd.DataFrame:
    """Per layer: parameter bytes and activation bytes saved for backward, under ``policy`` and fp32.

    Measured by running one forward (gradients on, the model's current train/eval mode) with
    ``torch.autograd.graph.saved_tensors_hooks``: each tensor autograd keeps is counted once per
    storage, at the innermost module running when it was saved; parameters themselves are not
    counted, but the low-precision weight copies autocast makes and autograd keeps are.
    ``batch`` is an ``(x, y)`` pair (``model(x)`` runs), a dict (``model(**batch)``), anything
    ``forward(model, batch)`` handles, or else the model's one input (``model(batch)``). Emulated fp8
    layers compute in fp32 and keep rounded fp32 copies of their inputs and weights, so their
    figures show the emulation's memory, not what real fp8 kernels would use.

    Columns: ``layer, type, precision, param_bytes`` (the layer's own parameters),
    ``saved_activation_bytes``, ``saved_activation_bytes_fp32``. Totals are in
    ``df.attrs["totals"]`` (a dict with the same keys and ``ratio`` = policy / fp32).

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

    counted: set[int] = set()
    rows = []
    for name in resolved.names:
        mod = resolved.modules[name]
        own = 0
        for p in mod.parameters(recurse=False):
            if id(p) not in counted:  # a shared parameter counts once, at its first owner
                counted.add(id(p))
                own += p.numel() * p.element_size()
        rows.append({
            "layer": name, "type": type(mod).__name__, "precision": resolved.decisions[name].precision,
            "param_bytes": own, "saved_activation_bytes": under_policy.get(name, 0),
            "saved_activation_bytes_fp32": under_fp32.get(name, 0),
        })
    # Root-level ops are listed under "" as the root row; nothing is lost.
    df = pd.DataFrame(rows)
    totals = {c: int(df[c].sum()) for c in ("param_bytes", "saved_activation_bytes", "saved_activation_bytes_fp32")}
    totals["ratio"] = (totals["saved_activation_bytes"] / totals["saved_activation_bytes_fp32"]
                       if totals["saved_activation_bytes_fp32"] else math.nan)
    df.attrs["totals"] = totals
    return df
