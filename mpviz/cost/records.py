"""What a counted training step leaves: plain records of its ops, module calls and saved tensors
(no torch).

:func:`mpviz.cost.counting.count` makes them from one real forward and backward;
:func:`mpviz.cost.pricing.predict` prices them for any per-layer precision and GPU, so a stored
:class:`Counts` (``to_dict`` is JSON) is enough to predict again without the model.

The step is counted in the model's own dtypes, without autocast. The records keep which tensor
each op reads and writes (an id per storage), so that ``predict`` can follow the dtype each
tensor would have under a policy: where autocast would cast it, and what the cast costs.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["Tensor", "OpCount", "Call", "Saved", "LayerCount", "Counts", "LOSS", "COUNTS_FILE",
           "save_counts", "load_counts"]

LOSS = "(loss)"  # where ops outside the model's modules go: the loss, and a forward='s own code

# A floating tensor an op reads or writes: (id of its storage, elements touched, torch dtype
# name as counted, requires grad).
Tensor = tuple[int, int, str, bool]


@dataclass(frozen=True)
class OpCount:
    """One aten op, at the innermost module that ran it.

    ``kind``: ``"linear"`` (a GEMM with a weight, or in the backward of one), ``"matmul"``,
    ``"conv"``, ``"attention"`` (tensor-core work), ``"other"``, or ``"view"`` (runs no kernel:
    views and allocations). ``node``: the sequence number of the autograd node the op made (in
    the forward) or runs in (in the backward). ``inputs``: floating tensors read that are not
    parameters (activations, gradients); ``params``: parameters read; ``outputs``: floating
    tensors written; ``fixed_bytes``: integer and bool tensors read and written (indices, masks),
    whose size no precision changes.
    """

    layer: str
    phase: str  # "forward" | "backward"
    op: str     # the aten op, e.g. "mm", "native_layer_norm"
    kind: str
    flops: int
    node: int | None
    inputs: tuple[Tensor, ...]
    params: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    fixed_bytes: int


@dataclass(frozen=True)
class Call:
    """One forward call of a module: ``Counts.ops[start:end]`` ran inside it (its children's
    too); the floating tensors it was given and returned."""

    layer: str
    start: int
    end: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True)
class Saved:
    """A floating tensor autograd saved for backward (``elements``: of its whole storage), in the
    forward of ``layer``, for the node ``node``; ``param``: a parameter (under autocast, a
    16-bit copy of it is saved instead)."""

    layer: str
    node: int | None
    id: int
    elements: int
    dtype: str
    param: bool


@dataclass(frozen=True)
class LayerCount:
    """One module (``named_modules()`` name, shared modules once).

    ``calls``: forward calls (0: a container that is iterated, not called). ``params`` and
    ``param_bytes``: its own parameters (a shared one counts at its first owner);
    ``trainable``, ``trainable_bytes``, ``trainable_tensors``: those that require grad;
    ``saved_fixed_bytes``: integer/bool tensors it saved for backward.
    """

    name: str
    type: str
    calls: int
    params: int = 0
    param_bytes: int = 0
    trainable: int = 0
    trainable_bytes: int = 0
    trainable_tensors: int = 0
    buffer_bytes: int = 0
    saved_fixed_bytes: int = 0


@dataclass(frozen=True)
class Counts:
    """A counted training step: its layers (model order, then :data:`LOSS`), ops, module calls
    and saved tensors; ``device``: where it ran (``"meta"``: shapes only)."""

    model: str
    device: str
    layers: tuple[LayerCount, ...]
    ops: tuple[OpCount, ...]
    calls: tuple[Call, ...]
    saved: tuple[Saved, ...]

    def layer(self, name: str) -> LayerCount:
        for lc in self.layers:
            if lc.name == name:
                return lc
        raise KeyError(name)

    def flops(self, phase: str | None = None, layer: str | None = None) -> int:
        """FLOPs of the step, or of one ``phase`` (``"forward"``, ``"backward"``) or ``layer``."""
        return sum(o.flops for o in self.ops
                   if (phase is None or o.phase == phase) and (layer is None or o.layer == layer))

    def scaled(self, factor: int) -> "Counts":
        """The same step with a batch ``factor`` times larger: FLOPs, activations, their
        gradients, saved tensors and index/mask bytes times ``factor``; parameters, their
        gradients (and so the optimizer step) unchanged.

            >>> op = OpCount("fc", "forward", "mm", "linear", 2 * 8 * 16 * 4, 0,
            ...              ((1, 8 * 16, "float32", False),), ((2, 16 * 4, "float32", True),),
            ...              ((3, 8 * 4, "float32", False),), 0)
            >>> c = Counts("M", "meta", (LayerCount("fc", "Linear", 1),), (op,), (), ()).scaled(4)
            >>> c.ops[0].flops, c.ops[0].inputs[0][1], c.ops[0].params[0][1]
            (4096, 512, 64)
        """
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a whole number >= 1, not {factor!r}")
        k = int(factor)
        fixed = _param_sized(self.ops)

        def grow(ts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(t if t[0] in fixed else (t[0], t[1] * k, t[2], t[3]) for t in ts)

        def op(o: OpCount) -> OpCount:
            batched = any(t[0] not in fixed for t in (*o.inputs, *o.outputs))
            return replace(o, flops=o.flops * k if batched else o.flops, inputs=grow(o.inputs),
                           outputs=grow(o.outputs), fixed_bytes=o.fixed_bytes * k)

        return replace(
            self,
            layers=tuple(replace(lc, saved_fixed_bytes=lc.saved_fixed_bytes * k) for lc in self.layers),
            ops=tuple(op(o) for o in self.ops),
            calls=tuple(replace(c, inputs=grow(c.inputs), outputs=grow(c.outputs)) for c in self.calls),
            saved=tuple(s if s.param or s.id in fixed else replace(s, elements=s.elements * k)
                        for s in self.saved))

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON): ``Counts.from_dict(json.loads(json.dumps(c.to_dict())))``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Counts":
        def tensors(xs: Any) -> tuple[Tensor, ...]:
            return tuple((int(i), int(n), str(dt), bool(g)) for i, n, dt, g in xs)

        def build(kind: type, x: dict[str, Any]) -> Any:
            known = {f.name for f in fields(kind)}
            x = {k: v for k, v in x.items() if k in known}
            for k in ("inputs", "params", "outputs"):
                if kind in (OpCount, Call) and k in x:
                    x[k] = tensors(x[k])
            return kind(**x)

        return cls(d["model"], d["device"], tuple(build(LayerCount, x) for x in d["layers"]),
                   tuple(build(OpCount, x) for x in d["ops"]), tuple(build(Call, x) for x in d["calls"]),
                   tuple(build(Saved, x) for x in d["saved"]))


def _param_sized(ops: tuple[OpCount, ...]) -> set[int]:
    """Ids of the tensors whose size is not the batch's: the parameters, and the gradients of
    the parameters. A parameter's gradient is made in the backward, has the elements of a
    parameter, and is read by no later kernel except one that only adds it into another
    parameter gradient of its size (a shared weight's two gradients). Gradients of activations
    are read again by the backward of the layer before, so the rule tells them apart even when
    their size happens to be a parameter's."""
    ids = {t[0] for o in ops for t in o.params}
    sizes = {t[1] for o in ops for t in o.params}
    made_in_forward = {t[0] for o in ops if o.phase == "forward" for t in (*o.inputs, *o.outputs)}
    backward = [o for o in ops if o.phase == "backward" and o.kind != "view"]
    readers: dict[int, list[OpCount]] = {}
    for o in backward:
        for t in o.inputs:
            readers.setdefault(t[0], []).append(o)
    for o in reversed(backward):  # a gradient's readers come after it: decided first
        for t in o.outputs:
            if t[0] in ids or t[0] in made_in_forward or t[1] not in sizes:
                continue
            if all(all(u[0] in ids and u[1] == t[1] for u in r.outputs)
                   for r in readers.get(t[0], ()) if r is not o):
                ids.add(t[0])
    return ids


COUNTS_FILE = "counts.json.gz"  # beside the run's store: written once, read without torch


def save_counts(counts: Counts, run_dir: str | os.PathLike) -> Path:
    """Keep ``counts`` with the run in ``run_dir``, so ``mpviz.advise(run, device=...)`` and the
    apps can price policies later without the model. Written whole or not at all (a temporary
    file renamed over), so a killed process never leaves half a file."""
    path = Path(run_dir) / COUNTS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(counts.to_dict(), f, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def load_counts(run_dir: str | os.PathLike) -> Counts | None:
    """The counts kept with the run in ``run_dir``, or None if it has none."""
    path = Path(run_dir) / COUNTS_FILE
    if not path.exists():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return Counts.from_dict(json.load(f))
