"""Count one training step: what every aten op reads, writes and computes, per module.

One real forward and backward of the batch runs under a ``TorchDispatchMode`` that sees each
aten op. FLOPs are ``torch.utils.flop_counter``'s formulas (the ones ``FlopCounterMode`` uses).
Each op goes to the innermost module running it: in the forward, the one whose forward is on the
stack; in the backward, the module whose forward made the autograd node being run (matched by
the node's sequence number, so q, k and v projections sharing one input are told apart).
Tensors are recorded by an id per storage (views share it), so that a later pricing can follow
the dtype each would have under a policy. What autograd saves for backward is recorded with
``saved_tensors_hooks``, as :func:`mpviz.memory_report` measures it.

Only shapes matter, so the step runs on a copy of the model on the meta device: no weight data,
nothing computed (a Llama-7B step is counted without its 27 GB of weights). There the output
shapes of an op seen before with the same input shapes are reused (torch's meta kernels are
Python, most of a meta step's time), and ``scaled_dot_product_attention`` runs the fused kernel a
GPU would run instead of the math path the meta device takes. A model whose forward reads values
runs for real instead.

The model is left as it was: gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is
written); buffers (BatchNorm statistics), the RNG state and train/eval flags are restored.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from mpviz import compat, tree
from mpviz.cost.records import LOSS, Call, Counts, LayerCount, OpCount, Saved, Tensor

__all__ = ["count", "Forward"]

Forward = Callable[[nn.Module, Any], Any]

_BATCHES = ("A batch is an (x, y) pair (model(x) runs), a dict of keyword arguments (model(**batch)), "
            "the model's one input, or anything forward=lambda model, batch: model(...) handles.")


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    formulas = dict(flop_counter.flop_registry)
    # On the CPU, SDPA runs a flash kernel of its own that flop_counter does not list; it does
    # the work of the GPU's SDPA kernels, so it is counted with their formulas.
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    count_fwd = getattr(flop_counter, "sdpa_flop_count", None)
    count_bwd = getattr(flop_counter, "sdpa_backward_flop_count", None)
    if fwd is not None and count_fwd is not None:
        formulas[fwd] = flop_counter.shape_wrapper(
            lambda q, k, v, *a, out_shape=None, **kw: count_fwd(q, k, v))
    if bwd is not None and count_bwd is not None:
        formulas[bwd] = flop_counter.shape_wrapper(
            lambda g, q, k, v, *a, out_shape=None, **kw: count_bwd(g, q, k, v))
    return formulas


_FLOPS = _flop_formulas()
# Ops that run no kernel although their schema says they make a new tensor.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
              "_local_scalar_dense", "lift_fresh", "set_", "resize_", "_fused_sdp_choice"}


@dataclass(frozen=True)
class _OpInfo:
    name: str
    view: bool   # runs no kernel: a view, or an allocation
    pure: bool   # writes no argument and returns no alias: its outputs depend on input shapes only
    formula: Callable[..., int] | None


_OPS: dict[Any, _OpInfo] = {}


def _op_info(func: Any) -> _OpInfo:
    schema, name = func._schema, func._overloadpacket.__name__
    returns = schema.returns
    info = _OpInfo(
        name=name,
        view=name in _NO_KERNEL or (bool(returns) and all(
            r.alias_info is not None and not r.alias_info.is_write for r in returns)),
        pure=not schema.is_mutable and not any(r.alias_info is not None for r in returns),
        formula=_FLOPS.get(func._overloadpacket),
    )
    _OPS[func] = info
    return info


def _kind(name: str, flops: int) -> str:
    if not flops:
        return "other"
    if "attention" in name:
        return "attention"
    return "conv" if "conv" in name else "matmul"


def _flat(args: Any, kwargs: Any) -> list[Any]:
    """An aten op's arguments, lists opened (they nest no deeper)."""
    out: list[Any] = []
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()._cdata  # one per storage: views share it, on meta too
    except (RuntimeError, NotImplementedError, AttributeError):  # tensor subclasses
        return ("id", id(t))


def _storage_elements(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes() // t.element_size()
    except (RuntimeError, NotImplementedError, AttributeError):
        return t.numel()


def _touched(t: torch.Tensor) -> int:
    """Elements an op reads from ``t``: a broadcast (stride 0) dimension is read once."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _sequence_nr() -> int | None:
    get = getattr(torch._C._autograd, "_get_sequence_nr", None)
    return get() - 1 if get is not None else None  # the number of the node made last


def _current_node() -> Any:
    get = getattr(torch._C, "_current_autograd_node", None)
    return get() if get is not None else None


def _meta_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta":
            raise TypeError  # only meta results are reused
        return (tuple(x.shape), x.stride(), x.dtype, x.storage_offset())
    if isinstance(x, (list, tuple)):
        return tuple(map(_meta_key, x))
    hash(x)
    return x


class _Ids:
    """An id per storage while it lives: an op's output in a storage none of its inputs had is a
    new tensor (a freed storage's address can come back), one in an input's storage is that
    input (a view, or written in place)."""

    def __init__(self) -> None:
        self._ids: dict[Any, int] = {}
        self._next = 0

    def of(self, t: torch.Tensor) -> int:
        key = _storage(t)
        if key not in self._ids:
            self._ids[key] = self._next
            self._next += 1
        return self._ids[key]

    def new(self, t: torch.Tensor) -> int:
        self._ids[_storage(t)] = self._next
        self._next += 1
        return self._next - 1


class _Counter(TorchDispatchMode):
    """Sees each op: who ran it, its FLOPs, the tensors it reads and writes."""

    def __init__(self, params: dict[Any, tuple[str, int, bool, int]], ids: _Ids) -> None:
        super().__init__()
        self.params = params  # storage -> (owner, bytes per element, requires grad, elements)
        self.ids = ids
        self.stack: list[str] = []  # forwards under way, innermost last
        self.node_layer: dict[int, str] = {}  # autograd node sequence number -> module
        self.linear_nodes: set[int] = set()  # nodes of GEMMs with a weight: their backward is one too
        self.ops: list[OpCount] = []
        self._meta: dict[Any, Any] = {}

    def where(self) -> tuple[str, str, int | None]:
        """(phase, module, sequence number of the autograd node: made by this op in the forward,
        being run in the backward)."""
        if torch._C._current_graph_task_id() != -1:
            node = _current_node()
            if node is None:
                return "backward", LOSS, None
            seq = node._sequence_nr()
            return "backward", self.node_layer.get(seq, LOSS), seq
        layer = self.stack[-1] if self.stack else LOSS
        seq = _sequence_nr()
        if seq is not None:
            # Autograd made this op's node (if it needs one) just before dispatching the op to
            # us, and the first op to see a sequence number is the one that made it.
            self.node_layer.setdefault(seq, layer)
        return "forward", layer, seq

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        phase, layer, seq = self.where()
        info = _OPS.get(func) or _op_info(func)
        out = self._run(func, info, args, kwargs)
        flops = int(info.formula(*args, **kwargs, out_val=out)) if info.formula is not None else 0
        kind = "view" if info.view else _kind(info.name, flops)
        inputs: list[Tensor] = []
        params: list[Tensor] = []
        keys = set()
        fixed = 0
        for t in _flat(args, kwargs):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage(t)
            keys.add(key)
            if key in self.params:
                params.append((self.ids.of(t), _touched(t), _dtype(t), t.requires_grad))
            elif t.is_floating_point():
                inputs.append((self.ids.of(t), _touched(t), _dtype(t), t.requires_grad))
            else:
                fixed += _touched(t) * t.element_size()
        outputs: list[Tensor] = []
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                tid = self.ids.of(t) if _storage(t) in keys else self.ids.new(t)
                if t.is_floating_point():
                    outputs.append((tid, t.numel(), _dtype(t), False))
                else:
                    fixed += t.numel() * t.element_size()
        if kind == "matmul" and (params if phase == "forward" else seq in self.linear_nodes):
            kind = "linear"
            if phase == "forward" and seq is not None:
                self.linear_nodes.add(seq)
        self.ops.append(OpCount(layer, phase, info.name, kind, flops, seq, tuple(inputs), tuple(params),
                                tuple(outputs), 0 if kind == "view" else fixed))
        return out

    def _run(self, func: Any, info: _OpInfo, args: Any, kwargs: Any) -> Any:
        """``func(*args, **kwargs)``; on the meta device, the outputs' shapes are reused for ops
        seen before with the same inputs."""
        if not info.pure:
            return func(*args, **kwargs)
        try:
            key = (func, tuple(map(_meta_key, args)), tuple((k, _meta_key(v)) for k, v in kwargs.items()))
            hit = self._meta.get(key)
        except TypeError:  # not all on the meta device, or an argument that is no key
            return func(*args, **kwargs)
        if hit is not None:
            many, metas = hit
            outs = [torch.empty_strided(sh, st, dtype=dt, device="meta") for sh, st, dt in metas]
            return many(outs) if many is not None else outs[0]
        out = func(*args, **kwargs)
        many = type(out) if isinstance(out, (tuple, list)) else None
        outs = out if many is not None else (out,)
        if all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in outs):
            self._meta[key] = (many, [(tuple(t.shape), t.stride(), t.dtype) for t in outs])
        return out


class _FusedAttention(TorchFunctionMode):
    """A GPU runs ``scaled_dot_product_attention`` as one fused kernel (flash or memory-efficient
    attention, dropout included), where the meta device, and the CPU with dropout, take the math
    path (the S x S scores in memory). So that the count is the GPU's, SDPA calls the fused
    kernel: memory-efficient attention on meta (its meta kernel is torch's own), the CPU's flash
    kernel on the CPU, without dropout (the values a count computes do not matter). Only calls
    from Python code are seen: one made inside another torch function
    (``nn.MultiheadAttention``'s) takes its own path."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is nn.functional.scaled_dot_product_attention:
            bound = _SDPA.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            q, k, v = a["query"], a["key"], a["value"]
            if isinstance(q, torch.Tensor) and q.device.type in ("meta", "cpu") and q.dim() == 4:
                if k.shape[-3] != q.shape[-3]:  # grouped-query attention: the kernel wants all heads
                    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
                    v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
                bias = a["attn_mask"]
                if bias is not None and bias.dtype == torch.bool:
                    bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, -math.inf)
                if bias is not None:
                    bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
                if q.device.type == "cpu":
                    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        q, k, v, 0.0, a["is_causal"], attn_mask=bias, scale=a["scale"])[0]
                grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, bias, grad, a["dropout_p"], a["is_causal"], scale=a["scale"])[0]
        return func(*args, **kwargs)


_SDPA = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                          scale=None, enable_gqa=False: None)


class _Modules:
    """Per-module forward bookkeeping: the stack the counter reads, calls, saved tensors."""

    def __init__(self, named: list[tuple[str, nn.Module]], counter: _Counter) -> None:
        self.counter = counter
        self.named = named
        self.names = {id(m): n for n, m in named}
        self.calls: list[Call | None] = []  # in the order they were entered: outer before inner
        self._open: list[tuple[int, str, int, tuple[Tensor, ...]]] = []
        self.saved: list[Saved] = []
        self.fixed: dict[str, int] = defaultdict(int)
        self._seen: set[Any] = set()

    def hooks(self, stack: contextlib.ExitStack) -> None:
        for _, mod in self.named:
            stack.callback(mod.register_forward_pre_hook(self._enter, with_kwargs=True).remove)
            stack.callback(mod.register_forward_hook(self._leave, always_call=True).remove)

    def _floats(self, obj: Any) -> tuple[Tensor, ...]:
        return tuple((self.counter.ids.of(t), t.numel(), _dtype(t), t.requires_grad)
                     for t in tree.tensors(obj) if t.is_floating_point())

    def _enter(self, mod: nn.Module, args: Any, kwargs: Any) -> None:
        name = self.names.get(id(mod), "")
        self.counter.stack.append(name)
        self._open.append((len(self.calls), name, len(self.counter.ops), self._floats((args, kwargs))))
        self.calls.append(None)

    def _leave(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self.counter.stack:
            self.counter.stack.pop()
        if self._open:
            i, name, start, inputs = self._open.pop()
            self.calls[i] = Call(name, start, len(self.counter.ops), inputs, self._floats(out))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        layer = self.counter.stack[-1] if self.counter.stack else LOSS
        key = _storage(t)
        if not t.is_floating_point():
            if key not in self._seen:
                self.fixed[layer] += _storage_elements(t) * t.element_size()
        else:
            self.saved.append(Saved(layer, _sequence_nr(), self.counter.ids.of(t), _storage_elements(t),
                                    _dtype(t), key in self.counter.params))
        self._seen.add(key)
        return t


def _call(model: nn.Module, batch: Any, forward: Forward | None) -> Any:
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return model(batch[0])
    return model(batch)


def _loss(out: Any, batch: Any) -> torch.Tensor | None:
    """What backward starts from: ``out.loss``; else cross-entropy (integer labels) or MSE
    against ``y`` / ``batch["labels"]`` where the shapes allow; else the sum of the output."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        logits = tree.first_float(out)
    if logits is None or not logits.requires_grad:
        return None
    y = batch.get("labels") if isinstance(batch, Mapping) else (
        batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None)
    if isinstance(y, torch.Tensor) and logits.dim() > 0:
        if not y.is_floating_point() and logits.shape[:-1].numel() == y.numel():
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        if y.is_floating_point() and y.numel() == logits.numel():
            return nn.functional.mse_loss(logits.float(), y.reshape(logits.shape).float())
    return logits.float().sum()


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)  # e.g. a Hugging Face BatchEncoding (a UserDict)
    return tree.map_tensors(lambda t: t.to(device), batch)


def _param_table(named: list[tuple[str, nn.Module]]
                 ) -> tuple[dict[Any, tuple[str, int, bool, int]], dict[str, list[int]]]:
    """Each parameter's storage -> (first owner, bytes per element, requires grad, elements);
    per owner: [elements, bytes, trainable elements, trainable bytes, trainable tensors, buffer bytes]."""
    table: dict[Any, tuple[str, int, bool, int]] = {}
    own: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    seen_buffers: set[Any] = set()
    for name, mod in named:
        for p in mod.parameters(recurse=False):
            key = _storage(p)
            if key in table:
                continue  # a shared parameter counts once, at its first owner
            table[key] = (name, p.element_size(), p.requires_grad, p.numel())
            o = own[name]
            o[0] += p.numel()
            o[1] += p.numel() * p.element_size()
            if p.requires_grad:
                o[2] += p.numel()
                o[3] += p.numel() * p.element_size()
                o[4] += 1
        for b in mod.buffers(recurse=False):
            if _storage(b) not in seen_buffers:
                seen_buffers.add(_storage(b))
                own[name][5] += b.numel() * b.element_size()
    return table, own




def _meta_batch(model: nn.Module, batch: Any) -> Any:
    """The batch for the meta copy. A Hugging Face model's ``attention_mask`` of all ones is left
    out: it means no mask, and the model reads its values to find that out, which the meta
    device cannot answer."""
    hf = any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
    if hf and isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.device.type != "meta" and bool(mask.all()):
            return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def count(model: nn.Module, batch: Any, forward: Forward | None = None, meta: bool = True) -> Counts:
    """Run one training step's forward and backward of ``batch`` through ``model`` and record it
    (see the module docstring). Batches are taken as by :func:`mpviz.memory_report`; backward
    starts from the output's ``.loss``, else cross-entropy or MSE against the labels, else the
    output's sum. The step runs in train mode.

    Only shapes matter, so the step runs on a copy of the model on the meta device, without its
    weights' data and in no time; a model whose forward reads values (``if mask.any():``, which
    the meta device cannot answer) is run for real instead, on a hook-free copy on its own
    device, as with ``meta=False``.

        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> c = count(model, (torch.randn(4, 16), torch.randint(0, 8, (4,))))
        >>> c.flops("forward"), c.flops(layer="2"), c.layer("2").params, c.device
        (6144, 6144, 264, 'meta')
    """
    model = compat.user_module(model)
    if meta and _device(model).type != "meta":
        try:
            with compat.force_eager():
                return _count(compat.bare_copy(model, meta=True), _meta_batch(model, batch), forward)
        except Exception:  # noqa: BLE001 - values were needed (or the copy failed): count for real
            pass
    # For real, on a hook-free copy: a recorder or a policy on the model sees nothing of it.
    return _count(compat.bare_copy(model), batch, forward)


def _count(model: nn.Module, batch: Any, forward: Forward | None) -> Counts:
    with compat.force_eager():
        device = _device(model)
        batch = _to(batch, device)
        named = compat.named_modules(model)
        table, own = _param_table(named)
        ids = _Ids()
        for p in model.parameters():
            ids.of(p)
        counter = _Counter(table, ids)
        modules = _Modules(named, counter)
        trainable = [p for p in model.parameters() if p.requires_grad]
        with contextlib.ExitStack() as stack, compat.preserved(model, device):
            model.train()   # the step as it trains; the flags go back afterwards
            modules.hooks(stack)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(modules.pack, lambda t: t), \
                    _FusedAttention(), counter:
                out = _call(model, batch, forward)
                loss = _loss(out, batch)
                if loss is not None and trainable:
                    torch.autograd.grad(loss, trainable, allow_unused=True)
            del out, loss
    if not any(op.kind != "view" for op in counter.ops):
        raise ValueError(f"Nothing ran: the model's forward did no tensor work on this batch. {_BATCHES}")
    calls = [c for c in modules.calls if c is not None]
    n_calls = Counter(c.layer for c in calls)
    layers = []
    for name, mod in [*named, (LOSS, None)]:
        o = own[name]
        layers.append(LayerCount(
            name=name, type=type(mod).__name__ if mod is not None else "loss", calls=n_calls[name],
            params=o[0], param_bytes=o[1], trainable=o[2], trainable_bytes=o[3], trainable_tensors=o[4],
            buffer_bytes=o[5], saved_fixed_bytes=modules.fixed.get(name, 0),
        ))
    return Counts(type(model).__name__, device.type, tuple(layers), tuple(counter.ops), tuple(calls),
                  tuple(modules.saved))
