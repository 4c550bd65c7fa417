"""Price a counted step for a precision per layer on a named GPU: time and memory (no torch).

Each kernel takes ``max(flops / peak, bytes / bandwidth, floor)`` (peak and bandwidth at the
share torchao measured reachable, :mod:`mpviz.cost.gpus`); a step is the sum of its kernels.

The recorded ops are replayed, following the dtype each tensor would have under the policy as
mpviz applies it (:mod:`mpviz.precision`) on a GPU:

- **fp16/bf16 layers run under autocast**: GEMMs, convolutions and attention compute in 16 bits,
  the ops CUDA autocast runs in fp32 (``layer_norm``, ``softmax``, ``log_softmax``, ``pow``,
  ``exp``, ``sum``, the losses: torch.amp's list, by the aten ops they lower to) in fp32, and
  the others in the widest dtype of their inputs (an fp32 residual stream stays fp32). Each
  input in another dtype is cast first, a kernel of its own, and autograd casts its gradient
  back in the backward; a weight is cast once per forward (autocast's cache). Outputs leaving a
  16-bit layer for code outside any autocast are cast to fp32, as mpviz's policy does.
- **fp32/tf32 layers** run without autocast; inside a 16-bit layer, their 16-bit inputs are cast
  to fp32 on the way in. tf32 GEMMs, and fp32 convolutions (cuDNN's default,
  ``torch.backends.cudnn.allow_tf32``), run at the tf32 peak.
- **fp8 layers** are bf16 layers whose GEMMs with a weight run in fp8 (torchao converts
  ``nn.Linear`` s only), reading fp8 and writing bf16, with torchao's tensorwise scaling as its
  roofline models it (``torchao/testing/training/roofline_utils.py``): input and grad_output
  each take an amax pass, a second small kernel and a cast writing row- and column-major fp8;
  the weight is read from its fp32 master and cast once for the forward and once, transposed,
  for the backward.
- Backward kernels compute in the dtype of the forward op they belong to. Then **the optimizer
  step**: the foreach kernels torch's optimizers run (``_multi_tensor_adam``: 8 passes over
  parameters, gradients and two moments for AdamW), plus GradScaler's unscale pass when a layer
  is in fp16.

Memory (bytes): ``weights`` (parameters and buffers as stored: fp32 master weights under AMP),
``grads`` (of the trainable parameters, in their dtype), ``optimizer`` (its states, in the
parameters' dtype), ``activations`` (what autograd saves for backward, in the dtype it would have,
with the 16-bit copies of weights autocast saves), ``total`` (their sum: the peak at the start of
backward of a step after the first, without the allocator's fragmentation and workspaces).

Not in the estimate: casts written in the model's code (``x.float()`` is no op on an fp32
count), kernels fused by ``torch.compile``, and eager PyTorch's host time per op (a few µs, which
a small model's kernels do not hide: it runs slower than predicted).

    >>> from mpviz.cost.records import Counts, LayerCount, OpCount
    >>> n = 4096
    >>> mm = OpCount("fc", "forward", "mm", "linear", 2 * n**3, 0,
    ...              ((1, n * n, "float32", False),), ((2, n * n, "float32", True),),
    ...              ((3, n * n, "float32", False),), 0)
    >>> counts = Counts("M", "meta", (LayerCount("fc", "Linear", 1),), (mm,), (), ())
    >>> fp32, bf16 = predict(counts, "fp32", optimizer=None), predict(counts, "bf16", optimizer=None)
    >>> round(fp32.step_time_s / bf16.step_time_s, 1)  # H100: 67 vs 989.5 TFLOP/s, less the casts
    9.5
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from mpviz.cost.gpus import COST_PRECISIONS, Device, get_device
from mpviz.cost.records import LOSS, Call, Counts, OpCount, Saved, Tensor
from mpviz.formats import canonical, did_you_mean

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Estimate", "predict", "cost_precision", "OPTIMIZERS", "OPTIMIZER_ROW"]

OPTIMIZER_ROW = "(optimizer)"

_SIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}  # bytes; fp8 dtypes: 1
_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}  # precision -> 16-bit dtype
_PRECISION = {"float64": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_GEMMS = ("linear", "matmul", "conv", "attention")
# The aten ops CUDA autocast runs in fp32 (torch.amp's "CUDA ops that can autocast to float32",
# by the aten ops they lower to; softmax and cross_entropy lower to _softmax, _log_softmax and
# nll_loss_forward).
_FP32_OPS = frozenset({
    "pow", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "exp", "expm1", "log", "log10", "log1p",
    "log2", "reciprocal", "rsqrt", "softplus", "native_layer_norm", "native_group_norm", "norm",
    "linalg_vector_norm", "_softmax", "_log_softmax", "nll_loss_forward", "nll_loss2d_forward",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits",
    "kl_div", "cumsum", "cumprod", "sum", "prod", "dist", "_cdist_forward", "_pdist_forward", "renorm",
    "logsumexp", "soft_margin_loss", "multi_margin_loss", "multilabel_margin_loss_forward",
})
# Normalizations take weights (and running statistics) in fp32 with 16-bit inputs, and write
# their input's dtype.
_INPUT_DTYPE_OPS = frozenset({
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm",
    "native_layer_norm", "native_group_norm", "_fused_rms_norm",
})
# Bytes a GEMM reads per operand element and writes per result element, per compute precision.
_OPERAND = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_RESULT = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 2}

# Per foreach kernel torch's optimizers run (torch/optim/adam.py _multi_tensor_adam, sgd.py
# _multi_tensor_sgd, not capturable): (reads, writes) per parameter element. AdamW: decay
# mul_, lerp_ (first moment), mul_ + addcmul_ (second), sqrt, div_, add_ (eps), addcdiv_ (update).
_ADAM = ((2, 1), (1, 1), (3, 1), (1, 1), (1, 1), (1, 1), (3, 1))
OPTIMIZERS: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {  # name -> (states, kernels)
    "adamw": (2, ((1, 1), *_ADAM)),
    "adamw_fused": (2, ((4, 3),)),  # AdamW(fused=True): one pass over param, grad and moments
    "adam": (2, _ADAM),
    "sgd": (0, ((2, 1),)),
    "sgd_momentum": (1, ((1, 1), (2, 1), (2, 1))),
}
_UNSCALE = (1, 1)  # GradScaler's _amp_foreach_non_finite_check_and_unscale_ over the gradients
# ATen's multi_tensor_apply (MultiTensorApply.cuh) launches a kernel per 48 tensors (3 lists)
# and per 320 blocks of 65,536 elements.
_TENSORS_PER_LAUNCH = 48
_ELEMENTS_PER_LAUNCH = 320 * 65536


def _size(dtype: str) -> int:
    return 1 if dtype.startswith("float8") else _SIZE.get(dtype, 4)


def _promote(dtypes: Iterable[str]) -> str | None:
    """The dtype an op computes in without autocast: the widest of its inputs'."""
    ds = set(dtypes)
    if not ds:
        return None
    if "float64" in ds:
        return "float64"
    if "float32" in ds or {"bfloat16", "float16"} <= ds:
        return "float32"
    return max(ds, key=_size)


def cost_precision(name: str) -> str:
    """One of :data:`~mpviz.cost.gpus.COST_PRECISIONS` for a precision name or alias
    (``"fp8_e4m3"`` and ``"fp8_e5m2"`` both cost as ``"fp8"``)."""
    key = str(name).strip().lower()
    if key in COST_PRECISIONS:
        return key
    p = canonical(name)
    return "fp8" if p.startswith("fp8") else p


class _Tally:
    """One row's kernels: FLOPs, bytes and time, and time by what bound each kernel."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.flops = 0
        self.bytes = 0.0
        self.time = {"compute": 0.0, "memory": 0.0, "overhead": 0.0}

    def kernel(self, flops: float, nbytes: float, peak: float | None) -> None:
        dev = self.dev
        t_compute = flops / (peak * dev.matmul_efficiency) if flops and peak else 0.0
        t_memory = nbytes / (dev.bandwidth * dev.memory_efficiency)
        t_floor = dev.launch_us * 1e-6
        if t_floor >= max(t_compute, t_memory):
            self.time["overhead"] += t_floor
        elif t_compute >= t_memory:
            self.time["compute"] += t_compute
        else:
            self.time["memory"] += t_memory
        self.flops += int(flops)
        self.bytes += nbytes

    def cast(self, n: int, src: str, dst: str, grad: bool) -> None:
        """A cast of ``n`` elements, and of its gradient back in the backward."""
        for _ in range(2 if grad else 1):
            self.kernel(0, n * (_size(src) + _size(dst)), None)

    @property
    def seconds(self) -> float:
        return sum(self.time.values())

    @property
    def bound(self) -> str | None:
        return max(self.time, key=self.time.get) if self.seconds else None


@dataclass(eq=False)
class Estimate:
    """What a training step is predicted to cost on one GPU (see :func:`mpviz.estimate`).

    ``layers``: one row per module, then ``(loss)`` (ops outside the modules) and ``(optimizer)``:
    ``layer, type, precision, flops, bytes, time_s, bound, activation_bytes``. Each op counts
    once, at the innermost module that ran it (a block's row holds its own ops, not its
    children's), with the casts it makes; ``bound`` is what most of the row's time waits on
    (``compute``, ``memory``, ``overhead``: the floor per kernel), missing (NaN) for a row
    without kernels.
    ``step_time_s`` is the sum of ``time_s``. ``counts``: the records it was priced from
    (:func:`predict` prices them again for another policy or GPU).
    """

    step_time_s: float
    layers: "pd.DataFrame"
    memory: dict[str, int]
    fits: bool
    device: Device
    precision: str  # the policy in a word: a precision when all layers share it, else "mixed"
    counts: Counts

    def __repr__(self) -> str:
        t = self.layers.groupby("bound")["time_s"].sum() / self.step_time_s if self.step_time_s else {}
        split = ", ".join(f"{b} {t[b]:.0%}" for b in ("compute", "memory", "overhead") if b in t)
        gb = self.memory["total"] / 1e9
        return (f"<Estimate {self.counts.model} on {self.device.title}, {self.precision}: "
                f"{self.step_time_s * 1e3:.3g} ms per step ({split}); {gb:.3g} GB of "
                f"{self.device.memory_gb:g} GB: {'fits' if self.fits else 'does not fit'}>")


class _Replay:
    """The step replayed under a policy: the dtype of each tensor, and each row's kernels."""

    def __init__(self, counts: Counts, prec: dict[str, str], dev: Device) -> None:
        self.prec, self.dev = prec, dev
        self.rows = {lc.name: _Tally(dev) for lc in counts.layers}
        self.dtype: dict[int, str] = {}
        self.overrides: list[dict[int, str]] = []  # fp32 copies of an fp32 layer's 16-bit inputs
        self.context: list[str] = []  # precisions of the calls under way
        self.nodes: dict[int, tuple[str | None, str | None]] = {}  # node -> (GEMM precision, dtype)
        self.weight_copies: set[tuple[int, str]] = set()  # autocast's cast cache
        self.saved = defaultdict(list)
        for s in counts.saved:
            self.saved[s.node].append(s)
        self.saved_seen: set[tuple[int, str]] = set()
        self.activations: dict[str, int] = defaultdict(int)

    def now(self, t: Tensor) -> str:
        return self._dtype_of(t[0], t[2])

    def _dtype_of(self, tid: int, counted: str) -> str:
        for o in reversed(self.overrides):
            if tid in o:
                return o[tid]
        return self.dtype.get(tid, counted)

    # --------------------------------------------------------------- module calls
    def enter(self, call: Call) -> None:
        p = self.prec[call.layer]
        outer = self.context[-1] if self.context else None
        copies: dict[int, str] = {}
        if p in ("fp32", "tf32") and outer in _AUTOCAST:
            for t in call.inputs:  # mpviz's pre-hook: 16-bit inputs to fp32
                d = self.now(t)
                if _size(d) < 4 and t[0] not in copies:
                    self.rows[call.layer].cast(t[1], d, "float32", t[3])
                    copies[t[0]] = "float32"
        self.context.append(p)
        self.overrides.append(copies)

    def leave(self, call: Call) -> None:
        p = self.context.pop()
        self.overrides.pop()
        outer = self.context[-1] if self.context else None
        if p in _AUTOCAST and outer not in _AUTOCAST:
            for t in call.outputs:  # mpviz's forward hook: 16-bit outputs back to fp32
                d = self.now(t)
                if _size(d) < 4:
                    self.rows[call.layer].cast(t[1], d, "float32", t[3])
                    self.dtype[t[0]] = "float32"

    # --------------------------------------------------------------- ops
    def forward(self, op: OpCount) -> None:
        p, row = self.prec[op.layer], self.rows[op.layer]
        ins = [self.now(t) for t in op.inputs]
        in_ids = {t[0] for t in op.inputs} | {t[0] for t in op.params}
        if op.kind == "view":
            self._view(op, ins, in_ids)
            return
        gemm = op.kind in _GEMMS
        fp8 = p == "fp8" and op.kind == "linear"
        target = (_AUTOCAST[p] if gemm else "float32" if op.op in _FP32_OPS else None) if p in _AUTOCAST else None
        reads, copies, used, counted = self._read(op, ins, target, fp8)
        cp, out = _computed_in(op, p, ins, target, fp8, used, counted)
        writes = self._write(op, in_ids, out)
        row.kernel(op.flops, reads + writes + op.fixed_bytes, self.dev.peak(cp) if gemm else None)
        if fp8:
            _fp8_casts(row, op)
        self._made(op, cp if gemm else None, out, copies)

    def _view(self, op: OpCount, ins: list[str], in_ids: set[int]) -> None:
        first = ins[0] if ins else (op.params[0][2] if op.params else None)
        for t in op.outputs:
            if t[0] not in in_ids:  # a new allocation: like its input (empty_like), or as counted
                same = op.inputs and op.inputs[0][2] == t[2]
                self.dtype[t[0]] = first if same else t[2]
        self._made(op, None, first, {})

    def _read(self, op: OpCount, ins: list[str], target: str | None, fp8: bool
              ) -> tuple[float, dict[int, str], list[str], list[str]]:
        """The bytes the op reads, its inputs and weights cast to ``target`` first as autocast
        does: (bytes, {tensor id: dtype of its cast copy}, dtypes it computes from, dtypes as
        counted)."""
        row = self.rows[op.layer]
        reads, copies, used, counted = 0.0, {}, [], []
        for t, d in zip(op.inputs, ins):
            if target and d != target and d in _SIZE:
                row.cast(t[1], d, target, t[3])  # autocast's cast of an activation
                copies[t[0]] = d = target
            if t[1]:  # an empty tensor's dtype was set by code the count cannot see (a cache's start)
                used.append(d)
                counted.append(t[2])
            reads += t[1] * (1 if fp8 else _size(d))
        for pid, n, d, grad in op.params:
            counted.append(d)
            if fp8:
                reads += n  # the fp8 copy made by the scaling kernels below
                continue
            if target and d != target:
                if (pid, target) not in self.weight_copies:  # autocast's cast, once per forward
                    self.weight_copies.add((pid, target))
                    row.cast(n, d, target, grad)
                copies[pid] = d = target
            used.append(d)
            reads += n * _size(d)
        return reads, copies, used, counted

    def _write(self, op: OpCount, in_ids: set[int], out: str) -> float:
        """The bytes the op writes; its new outputs take dtype ``out``."""
        writes = 0.0
        for t in op.outputs:
            if t[0] in in_ids:  # written in place: it keeps its dtype
                writes += t[1] * _size(self.dtype.get(t[0], t[2]))
            else:
                self.dtype[t[0]] = out
                writes += t[1] * _size(out)
        return writes

    def _made(self, op: OpCount, cp: str | None, dtype: str | None, copies: dict[int, str]) -> None:
        """The op made autograd node ``op.node`` (the first op to carry it): what its backward
        computes in, and what it saved, in the dtype saved."""
        if op.node is None or op.node in self.nodes:
            return
        self.nodes[op.node] = (cp, dtype)
        fp8 = self.prec[op.layer] == "fp8" and op.kind == "linear"
        for s in self.saved.pop(op.node, ()):
            if s.param:  # the weight itself, unless autocast saved its 16-bit copy
                if s.id not in copies or fp8:
                    continue
                key = (s.id, copies[s.id])
            else:
                key = (s.id, copies.get(s.id) or self._dtype_of(s.id, s.dtype))
            self._keep(s, key)

    def _keep(self, s: Saved, key: tuple[int, str]) -> None:
        if key not in self.saved_seen:  # once per tensor and dtype, at the first layer saving it
            self.saved_seen.add(key)
            self.activations[s.layer] += s.elements * _size(key[1])

    def backward(self, op: OpCount) -> None:
        if op.kind == "view":
            return
        cp, dtype = self.nodes.get(op.node, (None, None)) if op.node is not None else (None, None)
        row = self.rows[op.layer]
        tensors = [*op.inputs, *op.outputs]
        if op.kind in _GEMMS:
            cp = cp or _PRECISION.get(dtype or (tensors[0][2] if tensors else "float32"), "fp32")
            nbytes = (sum(t[1] for t in op.inputs) + sum(t[1] for t in op.params)) * _OPERAND[cp] \
                + sum(t[1] for t in op.outputs) * _RESULT[cp]
            row.kernel(op.flops, nbytes + op.fixed_bytes, self.dev.peak(cp))
            return
        nbytes = sum(t[1] * _size(dtype or t[2]) for t in tensors) + sum(t[1] * _size(t[2]) for t in op.params)
        row.kernel(op.flops, nbytes + op.fixed_bytes, None)

    def finish(self) -> None:
        for node, rest in self.saved.items():  # saved for a node no recorded op made
            for s in rest:
                if not s.param:
                    self._keep(s, (s.id, self.dtype.get(s.id, s.dtype)))


def _computed_in(op: OpCount, p: str, ins: list[str], target: str | None, fp8: bool,
                 used: list[str], counted: list[str]) -> tuple[str, str]:
    """(the precision a forward op computes in, the dtype of its outputs)."""
    if fp8:
        return "fp8", "bfloat16"
    as_counted = op.outputs[0][2] if op.outputs else "float32"
    # Without autocast an op computes in the widest of its inputs' dtypes, unless it
    # produced another dtype in the count too (a cast written in the model's code).
    if target is None and op.op in _INPUT_DTYPE_OPS and ins:
        out = ins[0]
    else:
        out = target or (_promote(used) if _promote(counted) in (as_counted, None) else as_counted) \
            or as_counted
    cp = _PRECISION.get(out, "fp32")
    if op.kind in _GEMMS and cp == "fp32" and (p == "tf32" or op.kind == "conv"):
        cp = "tf32"
    return cp, out


def _fp8_casts(row: _Tally, op: OpCount) -> None:
    """torchao's tensorwise recipe, kernel by kernel as its roofline counts them (activations and
    gradients in bf16; the weight read from its master copy, fp32 under AMP)."""
    _, w, dtype, _ = max(op.params, key=lambda t: t[1])  # the weight; a bias is added in bf16
    master = _size(dtype)
    for n in (sum(t[1] for t in op.inputs), sum(t[1] for t in op.outputs)):  # input, grad_output
        row.kernel(0, 2 * n, None)          # amax, stage 1
        row.kernel(0, 0, None)              # amax, stage 2 (tiny)
        row.kernel(0, 2 * n + 2 * n, None)  # cast, writing fp8 row- and column-major
    row.kernel(0, master * w, None)
    row.kernel(0, 0, None)
    row.kernel(0, master * w + w, None)     # fp8 weight for the forward
    row.kernel(0, master * w + w, None)     # and, transposed, for the backward


def _layer_precisions(counts: Counts, precisions: str | Mapping[str, str] | None) -> dict[str, str]:
    """A cost precision for every layer: a name for all, or a mapping of layer names (a layer
    without an entry takes its nearest ancestor's; the default is fp32). The loss outside the
    model runs in fp32."""
    names = [lc.name for lc in counts.layers]
    if precisions is None or isinstance(precisions, str):
        p = cost_precision(precisions or "fp32")
        return {name: (p if name != LOSS else "fp32") for name in names}
    for name in precisions:
        if name not in names:
            close = did_you_mean(name, names)
            raise ValueError(f"Layer {name!r} is not in the counted model{f' ({close})' if close else ''}.")
    given = {k: cost_precision(v) for k, v in precisions.items()}
    out = {}
    for name in names:
        probe = name
        while probe not in given and probe and name != LOSS:
            probe = probe.rpartition(".")[0]
        out[name] = given.get(probe, "fp32")
    return out


def _optimizer_step(row: _Tally, counts: Counts, kernels: tuple[tuple[int, int], ...]) -> None:
    n = sum(lc.trainable for lc in counts.layers)
    if not n:
        return
    size = sum(lc.trainable_bytes for lc in counts.layers) / n
    tensors = sum(lc.trainable_tensors for lc in counts.layers)
    launches = max(math.ceil(tensors / _TENSORS_PER_LAUNCH), math.ceil(n / _ELEMENTS_PER_LAUNCH))
    for reads, writes in kernels:
        for _ in range(launches):
            row.kernel(0, n * size * (reads + writes) / launches, None)


def _check_optimizer(optimizer: str | None) -> None:
    if optimizer is not None and optimizer not in OPTIMIZERS:
        close = did_you_mean(str(optimizer), list(OPTIMIZERS))
        raise ValueError(f"Unknown optimizer {optimizer!r}{f' ({close})' if close else ''}; "
                         f"known: {', '.join(OPTIMIZERS)}, or None for no optimizer step.")


def predict(counts: Counts, precisions: str | Mapping[str, str] | None = None,
            device: str | Device = "h100", optimizer: str | None = "adamw") -> Estimate:
    """Price ``counts`` (:func:`mpviz.cost.counting.count`) with ``precisions`` on ``device``.

    ``precisions``: None (fp32), one precision for every layer (``"bf16"``, ``"fp16"``,
    ``"fp8"``, ``"tf32"``, or any alias mpviz knows), or ``{layer name: precision}``, where a
    layer without an entry takes its nearest ancestor's (``""`` is the whole model).
    ``optimizer``: one of :data:`OPTIMIZERS`, or None for no optimizer step.
    """
    import pandas as pd

    dev = get_device(device)
    _check_optimizer(optimizer)
    prec = _layer_precisions(counts, precisions)
    for p in set(prec.values()):
        dev.peak(p)  # refuses fp8 on a GPU without fp8 tensor cores
    replay = _replayed(counts, prec, dev)
    opt, states = _optimizer_tally(counts, prec, dev, optimizer)
    layers = pd.DataFrame(_rows(counts, prec, replay, opt, optimizer))
    memory = _memory(counts, states, int(layers["activation_bytes"].sum()))
    model_prec = {prec[lc.name] for lc in counts.layers if lc.name != LOSS and (lc.calls or lc.params)}
    word = model_prec.pop() if len(model_prec) == 1 else "mixed"
    step = float(layers["time_s"].sum())
    return Estimate(step, layers, memory, memory["total"] <= dev.memory_bytes, dev, word, counts)


def _replayed(counts: Counts, prec: dict[str, str], dev: Device) -> _Replay:
    """The ops replayed in order, each layer call entered before its first op and left after
    its last."""
    replay = _Replay(counts, prec, dev)
    enters = defaultdict(list)
    leaves = defaultdict(list)
    for call in counts.calls:  # in the order they were entered: outer first
        enters[call.start].append(call)
        leaves[call.end].insert(0, call)  # inner first
    for i, op in enumerate(counts.ops):
        for call in leaves.pop(i, ()):
            replay.leave(call)
        for call in enters.pop(i, ()):
            replay.enter(call)
        (replay.forward if op.phase == "forward" else replay.backward)(op)
    for call in leaves.pop(len(counts.ops), ()):
        replay.leave(call)
    replay.finish()
    return replay


def _optimizer_tally(counts: Counts, prec: dict[str, str], dev: Device,
                     optimizer: str | None) -> tuple[_Tally, int]:
    """The optimizer step's kernels (GradScaler's unscale first when a layer is in fp16), and
    how many states per parameter it keeps."""
    opt = _Tally(dev)
    states = 0
    if optimizer is not None:
        states, kernels = OPTIMIZERS[optimizer]
        if "fp16" in prec.values():
            kernels = (_UNSCALE, *kernels)
        _optimizer_step(opt, counts, kernels)
    return opt, states


def _rows(counts: Counts, prec: dict[str, str], replay: _Replay, opt: _Tally,
          optimizer: str | None) -> list[dict]:
    """One row per layer, then the optimizer's."""
    rows = []
    for lc in counts.layers:
        t = replay.rows[lc.name]
        rows.append({"layer": lc.name, "type": lc.type, "precision": prec[lc.name], "flops": t.flops,
                     "bytes": int(t.bytes), "time_s": t.seconds, "bound": t.bound,
                     "activation_bytes": replay.activations.get(lc.name, 0) + lc.saved_fixed_bytes})
    rows.append({"layer": OPTIMIZER_ROW, "type": optimizer or "", "precision": "fp32", "flops": 0,
                 "bytes": int(opt.bytes), "time_s": opt.seconds, "bound": opt.bound, "activation_bytes": 0})
    return rows


def _memory(counts: Counts, states: int, activations: int) -> dict[str, int]:
    trainable_bytes = sum(lc.trainable_bytes for lc in counts.layers)
    memory = {
        "weights": sum(lc.param_bytes + lc.buffer_bytes for lc in counts.layers),
        "grads": trainable_bytes,
        "optimizer": states * trainable_bytes,
        "activations": activations,
    }
    memory["total"] = sum(memory.values())
    return memory
