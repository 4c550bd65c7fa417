"""Diagnostics measured while training (``run.lost_updates()``, ``run.shadow()``; judged by
:func:`mpviz.diagnose`). Neither changes training: tensors are only read and copied, and the RNG
state is put back.

- **lost updates** (on by default when the model holds bf16/fp16 parameters): on statistics
  steps, per layer, the fraction of elements with a nonzero gradient whose stored value
  ``optimizer.step()`` left unchanged (the update was below half a unit in the last place).
  One host read per statistics step.
- **fp32 shadow** (``shadow=["fc1"], shadow_every=50``): a hook-free fp32 copy of each chosen
  layer reruns its forward on the very inputs (upcast) and RNG state it saw: relative error and
  SQNR of the output; when the layer's upstream gradient arrives, the copy's weight gradients
  from that very gradient against the layer's own (``grad_rel_err``, ``grad_sqnr_db``).
"""
from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any, Sequence

import torch
from torch import nn

from .. import compat, tree
from ..formats import did_you_mean
from ..schema import DiagnosticRow
from .step import Parts

LOW = (torch.bfloat16, torch.float16)


class LostUpdates:
    """Optimizer step pre/post hooks measuring rounded-away updates of low-precision weights."""

    def __init__(self, rec: Parts) -> None:
        self.rec = rec
        self.before: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def pre(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        s = self.rec.state()
        self.before = []
        if s is None or not s.stats_step or (len(args) > 1 or kwargs.get("closure")):
            return
        for i, p in enumerate(self.rec.layers.params):
            if p.dtype in LOW and p.grad is not None:
                self.before.append((i, p.detach().clone(), p.grad.detach() != 0))

    def post(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if not self.before:
            return
        before, self.before = self.before, []
        layer_of = self.rec.layers.param_layer
        counts = []
        for i, old, nonzero in before:
            p = self.rec.layers.params[i]
            counts.append(torch.stack([(nonzero & (p.detach() == old)).sum(), nonzero.sum()]))
        values = torch.stack(counts).tolist()  # one host read (a sync on an accelerator)
        per: dict[int, list[float]] = {}
        for (i, _, _), (lost, eligible) in zip(before, values):
            acc = per.setdefault(layer_of[i], [0.0, 0.0])
            acc[0] += lost
            acc[1] += eligible
        step = self.rec.state().index
        rows = []
        for layer, (lost, eligible) in per.items():
            rows.append(DiagnosticRow(step, layer, "lost_updates", "lost_frac",
                                      lost / eligible if eligible else None))
            rows.append(DiagnosticRow(step, layer, "lost_updates", "eligible", eligible))
        self.rec.write(rows)


def _bare_fp32_copy(module: nn.Module) -> nn.Module:
    """An fp32 copy of ``module`` with no hooks (ours, the policy's, the user's) and no policy
    ``forward`` wrapper, not requiring grad. They are taken off the original for the time of the
    copy and put back."""
    saved = []
    for m in module.modules():
        # hooks, and an instance `forward` (a precision policy's wrapper)
        taken = {k: v for k, v in vars(m).items()
                 if ("hooks" in k and isinstance(v, dict)) or k == "forward"}
        saved.append((m, taken))
        for k, v in taken.items():
            if k == "forward":
                del m.__dict__[k]
            else:
                setattr(m, k, type(v)())
    try:
        c = copy.deepcopy(module)
    finally:
        for m, taken in saved:
            for k, v in taken.items():
                if k == "forward":
                    m.__dict__[k] = v
                else:
                    setattr(m, k, v)
    c.float().requires_grad_(False)
    for p in c.parameters():
        p.grad = None
    return c


def _is_fsdp_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


class Shadow:
    """Forward (pre-)hooks on chosen layers that rerun them in fp32 every ``every`` steps."""

    def __init__(self, rec: Parts, patterns: Sequence[str], every: int) -> None:
        if int(every) < 1:
            raise ValueError(f"shadow_every must be >= 1, got {every}")
        names = rec.layers.names
        self.layers: list[int] = []
        for pat in patterns:
            hit = [i for i, n in enumerate(names) if n and fnmatch.fnmatchcase(n, pat)]
            if not hit:
                close = did_you_mean(pat, names)
                raise ValueError(f"shadow pattern {pat!r} matches no layer of the model"
                                 + (f"; {close}" if close else "")
                                 + ". Patterns are fnmatch globs over named_modules() names.")
            self.layers += [i for i in hit if i not in self.layers]
        units = [names[i] for i in self.layers if _is_fsdp_unit(rec.layers.modules[i])]
        if units:
            raise ValueError(f"shadow= names FSDP units ({', '.join(map(repr, units))}), which "
                             "cannot be copied (FSDP refuses deepcopy): name the layers inside "
                             f"them instead, e.g. '{units[0]}.*'" if units[0] else
                             "shadow= names the FSDP root, which cannot be copied: name layers")
        self.rec, self.every = rec, int(every)
        self.copies: dict[int, nn.Module] = {}
        self.rng: dict[int, Any] = {}
        self.done: set[tuple[int, int]] = set()
        # per layer: the step and backward hooks (output, parameters) of its last shadow step,
        # removed at the layer's next forward
        self.pending: dict[int, tuple[int, list[Any]]] = {}

    def _on(self) -> int | None:
        rec = self.rec
        s = rec.state()
        if s is None or rec.replaying() or not torch.is_grad_enabled() or s.index % self.every:
            return None
        return s.index

    def attach(self, hook: Any) -> None:
        hook(self)  # removes the pending backward hooks
        for i in self.layers:
            m = self.rec.layers.modules[i]
            hook(m.register_forward_pre_hook(self.rec.contained("shadow", self._pre(i))))
            hook(m.register_forward_hook(self.rec.contained("shadow", self._post(i)),
                                         with_kwargs=True))

    def _pre(self, i: int) -> Any:
        def pre(module: nn.Module, args: tuple) -> None:
            s = self.rec.state()
            if i in self.pending and (s is None or self.pending[i][0] != s.index):
                for h in self.pending.pop(i)[1]:
                    h.remove()
            step = self._on()
            if step is not None and (step, i) not in self.done:
                self.rng[i] = compat.get_rng_state(self.rec.layers.device)
        return pre

    def _post(self, i: int) -> Any:
        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            step = self._on()
            if step is None or (step, i) in self.done or i not in self.rng:
                return
            self.done = {k for k in self.done if k[0] == step} | {(step, i)}
            y = tree.first_float(output)
            if y is None:
                return
            self._shadow(i, module, args, kwargs, y, step)
        return post

    def _shadow(self, i: int, module: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor,
                step: int) -> None:
        c = self.copies.get(i)
        if c is None:
            c = self.copies[i] = compat.bare_copy(module).float().requires_grad_(False)
        device = self.rec.layers.device
        after = compat.get_rng_state(device)
        rng = self.rng.pop(i)
        up = lambda t: t.detach().float()  # noqa: E731
        args, kwargs = tree.map_floats(up, args), tree.map_floats(up, kwargs)
        try:
            with torch.no_grad():
                for dst, src in zip(c.parameters(), module.parameters()):
                    dst.copy_(src.detach())
                for dst, src in zip(c.buffers(), module.buffers()):
                    dst.copy_(src.detach())
                c.train(module.training)
                compat.set_rng_state(rng, device)  # the same dropout mask
                with torch.autocast(device.type, enabled=False):
                    ref = tree.first_float(c(*args, **kwargs))
                if ref is None or ref.shape != y.shape:
                    return
                ref = ref.float()
                sq = torch.stack([((y.detach().float() - ref) ** 2).sum(), (ref ** 2).sum()]).double()
                err2, ref2 = sq.tolist()  # one host read per layer and shadow step
        finally:
            compat.set_rng_state(after, device)
        rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
        sqnr = 10 * math.log10(ref2 / err2) if err2 > 0 else math.inf
        self.rec.write([DiagnosticRow(step, i, "shadow", "rel_err", rel),
                        DiagnosticRow(step, i, "shadow", "sqnr_db", sqnr)])
        if y.requires_grad:
            self._backward(i, module, c, args, kwargs, rng, y, step)

    def _backward(self, i: int, module: nn.Module, c: nn.Module, args: Any, kwargs: Any,
                  rng: Any, y: torch.Tensor, step: int) -> None:
        """The backward shadow: when the upstream gradient of the layer's output arrives, the
        fp32 copy computes its weight gradients from that very gradient; the layer's own weight
        gradients of this backward (hooks on its parameters, before accumulation into .grad)
        are compared with them. A parameter shared with other layers gets their gradient too."""
        live = [p for p in module.parameters() if p.requires_grad]
        if not live:
            return
        mine = [cp for cp, p in zip(c.parameters(), module.parameters()) if p.requires_grad]
        ref: list[torch.Tensor | None] = []
        got: dict[int, torch.Tensor] = {}
        device = self.rec.layers.device

        def on_output(g: torch.Tensor) -> None:
            if ref:
                return
            after = compat.get_rng_state(device)
            try:
                c.requires_grad_(True)
                with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    compat.set_rng_state(rng, device)
                    out = tree.first_float(c(*args, **kwargs))
                    ref.extend(torch.autograd.grad(out, mine, g.detach().float(), allow_unused=True))
            finally:
                c.requires_grad_(False)
                compat.set_rng_state(after, device)

        def on_param(k: int) -> Any:
            def h(g: torch.Tensor) -> None:
                if k in got or len(ref) != len(live):
                    return  # a later backward (the hooks go at the layer's next forward)
                got[k] = g.detach().float()
                if len(got) == len(live):
                    self._grad_rows(i, step, [got[j] for j in range(len(live))], ref)
            return h

        for h in self.pending.pop(i, (0, []))[1]:
            h.remove()
        hooks = [y.register_hook(self.rec.contained("shadow", on_output))]
        hooks += [p.register_hook(self.rec.contained("shadow", on_param(k)))
                  for k, p in enumerate(live)]
        self.pending[i] = (step, hooks)

    def _grad_rows(self, i: int, step: int, got: list[torch.Tensor],
                   ref: list[torch.Tensor | None]) -> None:
        pairs = [(a, b.float()) for a, b in zip(got, ref) if b is not None and a.shape == b.shape]
        if not pairs:
            return
        sq = torch.stack([sum(((a - b) ** 2).sum() for a, b in pairs),
                          sum((b ** 2).sum() for _, b in pairs)]).double()
        err2, ref2 = sq.tolist()
        rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
        sqnr = 10 * math.log10(ref2 / err2) if err2 > 0 else math.inf
        self.rec.write([DiagnosticRow(step, i, "shadow", "grad_rel_err", rel),
                        DiagnosticRow(step, i, "shadow", "grad_sqnr_db", sqnr)])

    def remove(self) -> None:
        for _, hooks in self.pending.values():
            for h in hooks:
                h.remove()
        self.pending = {}


def attach_diagnostics(rec: Parts, optimizer: Any, hook: Any, lost_updates: bool | None,
                       shadow: Sequence[str] | None, shadow_every: int) -> None:
    """Wire the diagnostics into a recorder being attached, through its ``Parts`` (``hook``
    keeps each handle for removal); errors are contained per part (``rec.contained``)."""
    if lost_updates is None:
        lost_updates = any(p.dtype in LOW for p in rec.layers.params)
    if lost_updates and optimizer is not None:
        lu = LostUpdates(rec)
        hook(optimizer.register_step_pre_hook(rec.contained("lost updates", lu.pre)))
        hook(optimizer.register_step_post_hook(rec.contained("lost updates", lu.post)))
    if shadow:
        Shadow(rec, [shadow] if isinstance(shadow, str) else list(shadow), shadow_every).attach(hook)
