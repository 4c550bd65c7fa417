"""``Recorder``: turns an AMP training loop into per-step, per-layer records on disk.

    rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir="runs/exp1")
    with rec:
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update(); opt.zero_grad()
            rec.step(loss=loss, samples=len(x))

What it costs, and where the host syncs are:
- every step: a forward pre-hook and hook on the model (inputs, autocast and RNG state kept for a
  replay), a hook in the optimizer's step (or, with a GradScaler or without an optimizer, a tensor
  hook at the end of backward) that reads the gradients, and :meth:`Recorder.step`. Without a
  GradScaler, one fused inf/nan check of all gradients (GradScaler's own kernel) and one sync in
  the optimizer's step pre-hook, to find an overflow's culprit before the weights change. On an
  accelerator, ONE host copy per step (loss, loss scale, flags, statistics); on the CPU the values
  are read where they lie.
- on "watched" steps (statistics steps, and steps where dtypes may change): a forward hook per
  module (dtypes, activations).
- every ``every`` steps: activation, gradient and weight statistics (:mod:`mpviz.stats`): on an
  accelerator a few kernels for all tensors; on the CPU the training thread copies each tensor's
  (sampled) elements once and measures norm and max |x| of big tensors, and the writer thread
  does the rest.
- steps with inf/nan: the forward of that step is replayed once with checks on (:mod:`mpviz.overflow`).
Rows go to a background writer thread (:mod:`mpviz.store`); nothing is written on this thread.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import compat, overflow
from .run import Run
from .stats import ROW, HostSample, by_layer, tensor_stats_device
from .store import RunWriter, db_path, pack_hists


def _first_float(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a (nested) output or argument structure."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_float(o)
            if t is not None:
                return t
    elif isinstance(obj, dict):
        return _first_float(list(obj.values()))
    return None


def _closure(args: tuple, kwargs: dict) -> Any:
    """The closure given to ``optimizer.step`` (its step hooks see ``args = (optimizer, ...)``)."""
    return args[1] if len(args) > 1 else kwargs.get("closure")


def _dtype_name(dt: torch.dtype | None) -> str | None:
    return None if dt is None else str(dt).replace("torch.", "")


class Recorder:
    """Record a mixed-precision training run, per layer and per step, to ``run_dir``.

    Args:
        model: the ``nn.Module`` being trained.
        optimizer: optional; used to know which steps GradScaler skipped.
        scaler: optional ``torch.amp.GradScaler``; gradients are recorded *unscaled*.
        run_dir: where the run is written (default ``runs/<time>``); must not hold a run yet.
        every: per-layer tensor statistics every ``every`` steps (loss, scale, skips, overflow
            events, dtypes and timing are recorded every step).
        policy: an :class:`mpviz.PrecisionPolicy` (or its rules dict) to apply while recording;
            its changes are recorded in ``run.policy_changes``.
        meta: extra JSON-able facts stored in ``run.meta``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scaler: Any = None, run_dir: str | os.PathLike | None = None, every: int = 10,
                 policy: Any = None, name: str | None = None, flush_every_s: float = 2.0,
                 meta: dict[str, Any] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Recorder needs an nn.Module, got {type(model).__name__}")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1 (statistics every N steps), got {every}")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.every = int(every)
        self.flush_every_s = flush_every_s
        self.name = name or type(model).__name__
        self._extra_meta = dict(meta or {})
        self._policy_arg = policy
        if run_dir is None:
            run_dir = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = compat.dist_rank_world()
        self.policy = None  # PolicyHandle while attached
        self._writer: RunWriter | None = None
        self._handles: list[Any] = []
        self._run: Run | None = None
        self._attached = False
        self._closed = False

    # ----------------------------------------------------------------- attach / detach
    def __enter__(self) -> "Recorder":
        self.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(error=exc)

    def attach(self) -> "Recorder":
        if self._attached:
            return self
        if self._closed:
            raise RuntimeError("this Recorder was closed; create a new one (with a new run_dir)")
        model = self.model
        self._modules = [m for _, m in model.named_modules()]
        self._names = [n for n, _ in model.named_modules()]
        self._name_idx = {n: i for i, n in enumerate(self._names)}
        # Each parameter belongs to the first module (in named_modules order) that owns it.
        self._params: list[nn.Parameter] = []
        self._param_layer: list[int] = []
        seen: set[int] = set()
        for i, m in enumerate(self._modules):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    self._params.append(p)
                    self._param_layer.append(i)
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        # CPU tensors are read in place and measured with numpy; on an accelerator statistics
        # are kernels there and one host copy per step (tests switch this off on the CPU).
        self._on_host = self.device.type == "cpu"

        layers = []
        for i, (name, m) in enumerate(zip(self._names, self._modules)):
            ps = list(m.parameters(recurse=False))
            layers.append((i, name, type(m).__name__, sum(p.numel() for p in ps),
                           _dtype_name(ps[0].dtype) if ps else None,
                           0 if name == "" else name.count(".") + 1,
                           int(not any(True for _ in m.children()))))
        meta = {
            "model": self.name, "device": str(self.device), "torch_version": torch.__version__,
            "autocast_dtype": None, "scaler": compat.scaler_settings(self.scaler),
            "optimizer": type(self.optimizer).__name__ if self.optimizer else None,
            "every": self.every, "start_time": time.time(), "end_time": None, "status": "running",
            "host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "rank": self.rank, "world_size": self.world_size, **self._extra_meta,
        }
        self._writer = RunWriter(db_path(self.run_dir, self.rank), meta, layers,
                                 flush_every_s=self.flush_every_s)

        # step state
        self._step = 0
        self._t_last = time.perf_counter()
        self._optim_steps = 0
        self._last_dtypes: dict[tuple[int, str], str] = {}
        self._dtypes_seen: Any = None
        self._fwd_dtypes: dict[int, tuple[str | None, str | None]] = {}
        self._fwd_order: list[int] | None = None
        self._order_acc: list[int] | None = []
        self._inputs: tuple | None = None
        self._autocast: tuple[bool, torch.dtype] | None = None
        self._rng: Any = None
        self._acts: dict[int, tuple[torch.Tensor, int]] = {}  # output, its version counter
        # Modules whose output is changed in place later in the forward (ReLU(inplace=True)
        # after a conv): their outputs are copied when they are made.
        self._clone_acts: set[int] = set()
        self._stats: Any = None  # a HostSample (CPU) or a device tensor, see mpviz.stats
        self._stats_owners: dict[str, list[int]] = {}
        self._act_rows: list[int] = []
        self._views: dict = {}  # the parameters' numpy views (mpviz.stats.HostSample.take)
        self._grads: list[torch.Tensor | None] | None = None
        self._grad_bad: torch.Tensor | None = None
        self._found_inf = torch.zeros(1, device=self.device)
        self._scale_used: Any = None  # a float on the CPU, a device tensor elsewhere
        self._precheck: list[tuple[int, int]] | None = None
        self._replaying = False
        self._backward_queued = False
        # Per-module hooks cost microseconds per module per call, so they are only attached on
        # "watched" steps: statistics steps, and any step where the dtypes may have changed (the
        # first, after a policy change, or when autocast / the input dtype changed).
        self._module_handles: list[Any] = []
        self._watching = False
        self._watch_next = True
        self._watch_key: Any = None

        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True,
                                                             prepend=True))
        self._handles.append(model.register_forward_hook(self._root_hook))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._optim_pre_hook))
            self._handles.append(self.optimizer.register_step_post_hook(self._optim_post_hook))
        if self._policy_arg is not None:
            from .precision import PrecisionPolicy, apply_policy

            pol = self._policy_arg
            if isinstance(pol, dict):
                pol = PrecisionPolicy(pol)
            self.policy = apply_policy(model, pol, device_type=self.device.type)
            self.policy.add_listener(self._on_policy_change)
        self._attached = True
        return self

    def close(self, error: BaseException | None = None) -> None:
        """Detach every hook, restore the model, and finish the run on disk. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles + self._module_handles:
            h.remove()
        self._handles.clear()
        self._module_handles.clear()
        if self.policy is not None:
            self.policy.remove()
        self._inputs = self._grads = None
        self._acts, self._views = {}, {}
        if self._writer is not None:
            status = "finished" if error is None else "failed"
            extra = {} if error is None else {"error": f"{type(error).__name__}: {error}"}
            self._writer.set_meta(status=status, end_time=time.time(), **extra)
            self._writer.close()
        self._attached = False

    # ----------------------------------------------------------------- reading
    @property
    def run(self) -> Run:
        """The live :class:`mpviz.Run` of this recording (pending rows are flushed before reads)."""
        if self._run is None:
            if self._writer is None:
                raise RuntimeError("the recorder has not been attached yet: use `with rec:` first")
            self._run = Run(self._writer.path, before_read=self.flush)
        return self._run

    def flush(self) -> None:
        if self._writer is not None and not self._closed:
            self._writer.flush()

    def set_precision(self, rules: dict[str, str]) -> None:
        """Change per-layer precision from now on (same as ``rec.policy.update(rules)``)."""
        if self.policy is None:
            raise RuntimeError("this Recorder was created without a policy: pass "
                               "policy=mpviz.PrecisionPolicy({}) to steer precision while recording")
        self.policy.update(rules)

    # ----------------------------------------------------------------- hooks
    def _recording_stats(self) -> bool:
        return self._step % self.every == 0

    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._replaying or not torch.is_grad_enabled():
            return
        # Kept for replaying this step's forward if it produces inf/nan.
        self._inputs = (args, kwargs)
        self._autocast = compat.autocast_state(self.device.type)
        self._rng = compat.get_rng_state(self.device)
        self._acts = {}
        first = _first_float(args)
        key = (self._autocast, first.dtype if first is not None else None)
        self._watching = self._watch_next or key != self._watch_key or self._recording_stats()
        if self._watching:
            self._watch_key, self._watch_next = key, False
            if not self._module_handles:
                self._module_handles = [
                    m.register_forward_hook(self._make_hook(i), prepend=m is self.model)
                    for i, m in enumerate(self._modules)]

    def _make_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._replaying:
                return
            out = _first_float(output)
            inp = _first_float(args)
            self._fwd_dtypes[idx] = (inp.dtype if inp is not None else None,
                                     out.dtype if out is not None else None)
            if self._order_acc is not None:
                self._order_acc.append(idx)
            if out is not None and torch.is_grad_enabled() and self._recording_stats():
                if idx in self._clone_acts:
                    out = out.detach().clone()
                # a module called twice: its last output
                self._acts[idx] = (out, out._version)
        return hook

    def _root_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._replaying or not torch.is_grad_enabled():
            return
        if self._order_acc is not None:
            self._fwd_order, self._order_acc = self._order_acc, None
        if self.optimizer is not None and not self._scaling():
            return  # gradients are read in the optimizer's step pre-hook (_optim_pre_hook)
        # A GradScaler may skip the optimizer's step (then the gradients are needed to name the
        # layers that went non-finite), and without an optimizer there is none: read the
        # gradients at the end of backward (a tensor hook costs ~10 us a step).
        out = output if isinstance(output, torch.Tensor) else _first_float(output)
        if out is not None and out.requires_grad:
            out.register_hook(self._on_backward_start)

    def _on_backward_start(self, grad: torch.Tensor) -> None:
        if not self._backward_queued:
            self._backward_queued = True
            # Re-queue from inside the first final callback so ours runs after every callback
            # queued during backward, e.g. DDP's, which writes the all-reduced gradients.
            compat.queue_backward_callback(
                lambda: compat.queue_backward_callback(self._on_backward_end))

    def _on_backward_end(self) -> None:
        """All ``.grad`` are accumulated (and still multiplied by the loss scale)."""
        self._backward_queued = False
        self._grads = [p.grad for p in self._params]
        present = [g for g in self._grads if g is not None]
        scale = compat.scaler_scale(self.scaler)
        if scale is None:
            self._scale_used = None
        else:  # reading a CPU tensor is no sync; elsewhere keep a device copy for step()
            self._scale_used = float(scale) if self._on_host else scale.detach().clone()
        if present and scale is None:
            # No GradScaler watches for inf/nan: check the gradients here (on device, no sync).
            # Which ones are bad is worked out only on a bad step (_nonfinite_params).
            self._grad_bad = self._found_inf  # zero but after a bad step (reset in step())
            compat.check_nonfinite(present, self._grad_bad)
        if self._recording_stats():
            self._compute_stats(present)

    def _compute_stats(self, present: list[torch.Tensor]) -> None:
        """Activations, (unscaled) gradients and weights of this step: one batched computation."""
        acts = {}
        for idx, (t, version) in self._acts.items():
            if t._version == version:
                acts[idx] = t
            else:  # changed in place since: not what the module returned. Copied from now on.
                self._clone_acts.add(idx)
        self._acts = {}
        grads_of = [self._param_layer[i] for i, g in enumerate(self._grads or []) if g is not None]
        self._stats_owners = {"activation": list(acts), "grad": grads_of,
                              "weight": self._param_layer if present else []}
        # A container's output is often its last child's very tensor: measure it once.
        unique: dict[int, int] = {}
        self._act_rows = [unique.setdefault(id(t), len(unique)) for t in acts.values()]
        act_tensors = list({id(t): t for t in acts.values()}.values())
        tensors = act_tensors + present + (self._params if present else [])
        if tensors:
            scaled = (len(act_tensors), len(act_tensors) + len(present), self._scale_used)
            if self._scale_used is None:
                scaled = None
            if self._on_host:  # the rest is computed on the writer thread
                self._stats = HostSample.take(tensors, scaled, cache=self._views,
                                              stable_from=len(act_tensors) + len(present),
                                              offset=self._step)
            else:
                self._stats = tensor_stats_device(tensors, scaled, offset=self._step)

    def _scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _optim_pre_hook(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if _closure(args, kwargs) is not None:
            return  # the closure computes the gradients: read them after it (_optim_post_hook)
        # Not read at the end of backward (see _root_hook). (With a GradScaler they were: its
        # step() has unscaled them by now, or, with a fused optimizer, not.)
        if self._grads is None and not self._scaling():
            self._on_backward_end()
        # Without GradScaler nothing stops a non-finite update: find the culprit while the
        # weights are still the ones the bad forward ran with.
        if self._grad_bad is not None:  # (only set when no GradScaler runs)
            if self._grad_bad.item():
                self._precheck = self._find_forward_culprits()

    def _optim_post_hook(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        self._optim_steps += 1
        if _closure(args, kwargs) is not None and not self._scaling():
            # step(closure) (LBFGS): the gradients of its last evaluation; the weights are
            # already updated, so a culprit is looked for with the new weights.
            self._on_backward_end()

    def _on_policy_change(self, changes: list[tuple[str, str | None, str | None]]) -> None:
        self._watch_next = True
        rows = [(self._step, self._name_idx[layer], prec, rule) for layer, prec, rule in changes
                if layer in self._name_idx]
        if self._writer is not None:
            self._writer.put("policy_changes", rows)

    def _find_forward_culprits(self) -> list[tuple[int, int]]:
        if self._inputs is None:
            return []
        self._replaying = True
        try:
            return overflow.replay_forward(self.model, self._modules, self._inputs,
                                           self._autocast, self._rng, self.device)
        finally:
            self._replaying = False

    # ----------------------------------------------------------------- the step
    def step(self, loss: Any = None, samples: int | None = None) -> int:
        """Close the current training step and record it. Returns its index.

        On an accelerator, one host copy: loss, loss scale, non-finite flags and this step's
        statistics together. On the CPU these are read where they lie (no copy is needed).
        """
        if not self._attached:
            raise RuntimeError("Recorder.step() called outside the recorder: use `with rec:` "
                               "(or rec.attach()) before training")
        now = time.perf_counter()
        step_time = now - self._t_last
        step = self._step
        if self._grads is None and self._recording_stats() and not self._scaling() and any(
                p.grad is not None for p in self._params):
            self._on_backward_end()  # no optimizer step this step: read the gradients now
        if self._acts and self._recording_stats():  # a forward with no backward this step
            self._compute_stats([])

        scale_now = compat.scaler_scale(self.scaler)
        has_scale = self._scale_used is not None and scale_now is not None
        loss_t = None
        if isinstance(loss, torch.Tensor):
            loss_t = loss if loss.numel() == 1 else loss.detach().reshape(-1)[0]
        (loss_v, scale_used, scale_after, bad), stats = self._to_host(
            [loss_t, self._scale_used if has_scale else None, scale_now if has_scale else None,
             self._grad_bad], self._stats)
        if loss_t is None and loss is not None:
            loss_v = float(loss)
        any_bad = bool(bad)
        if self.optimizer is not None:
            skipped = self._optim_steps == 0
        else:
            skipped = has_scale and scale_after < scale_used
        self._optim_steps = 0
        # Which parameters went non-finite: worked out on bad steps only (GradScaler skipped the
        # step, or our own check found inf/nan).
        bad_params = self._nonfinite_params() if any_bad or (skipped and has_scale) else []
        loss_bad = loss_v is not None and not math.isfinite(loss_v)

        # ---- rows, to the writer thread
        w = self._writer
        assert w is not None
        w.put("steps", [(step, loss_v, scale_used, scale_after, int(skipped),
                         int(bool(bad_params)), step_time, samples,
                         (samples / step_time) if samples and step_time > 0 else None,
                         time.time())])
        if self._watching:
            w.put("dtypes", self._dtype_rows(step))
        if stats is not None:
            owners, act_rows = self._stats_owners, self._act_rows
            dtypes = self._last_dtypes  # replaced, never changed in place (see _dtype_rows)
            w.put_later(_stat_rows, (step, stats, owners, act_rows, dtypes),
                        nbytes=getattr(stats, "nbytes", 0))
        if bad_params or loss_bad:
            w.put("overflows", self._overflow_rows(step, bad_params, skipped))

        # ---- reset per-step state
        if any_bad:
            self._found_inf.zero_()
        self._grad_bad = self._grads = self._stats = self._scale_used = None
        self._precheck = self._inputs = None
        self._step += 1
        if self._module_handles and not self._watch_next and not self._recording_stats():
            for h in self._module_handles:
                h.remove()
            self._module_handles = []
        self._watching = False
        self._t_last = time.perf_counter()
        return step

    def _to_host(self, values: list[Any], stats: Any) -> tuple[list[Any], Any]:
        """Floats of ``values`` (0-d tensors, floats or None), and the statistics on the host
        (numpy rows, or a :class:`HostSample` whose rows the writer thread computes).

        On the CPU reading a tensor is no copy and no sync. On an accelerator everything goes
        into one tensor and comes back in one copy (one sync per step)."""
        if self._on_host or not any(isinstance(v, torch.Tensor) for v in values):
            vals = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
            if isinstance(stats, torch.Tensor):
                stats = stats.double().cpu().numpy()
            return vals, stats
        parts = [v.detach().reshape(1).float().to(self.device) if isinstance(v, torch.Tensor)
                 else torch.tensor([float(v)], device=self.device) for v in values if v is not None]
        if stats is not None:
            parts.append(stats.reshape(-1))
        host = torch.cat(parts).cpu().numpy()
        vals, pos = [], 0
        for v in values:
            vals.append(None if v is None else float(host[pos]))
            pos += v is not None
        if stats is not None:
            stats = host[pos:].astype(np.float64).reshape(-1, ROW)
        return vals, stats

    def _nonfinite_params(self) -> list[int]:
        grads = self._grads or []
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return []
        flags = ~torch.isfinite(torch.stack(torch._foreach_norm([grads[i] for i in present])))
        return [present[k] for k in flags.nonzero().flatten().tolist()]

    def _dtype_rows(self, step: int) -> list[tuple]:
        """Rows for the dtypes that changed since they were last recorded."""
        grads = self._grads or []
        seen = (self._fwd_dtypes, [p.dtype for p in self._params],
                [None if g is None else g.dtype for g in grads])
        if seen == self._dtypes_seen:  # the common case: nothing changed
            return []
        self._dtypes_seen = (dict(self._fwd_dtypes), seen[1], seen[2])
        current: dict[tuple[int, str], str] = {}
        for idx, (i_dt, o_dt) in self._fwd_dtypes.items():
            if i_dt is not None:
                current[(idx, "input")] = _dtype_name(i_dt)
            if o_dt is not None:
                current[(idx, "output")] = _dtype_name(o_dt)
        for i, p in enumerate(self._params):
            layer = self._param_layer[i]
            current.setdefault((layer, "weight"), _dtype_name(p.dtype))
            g = grads[i] if i < len(grads) else None
            if g is not None:
                current.setdefault((layer, "grad"), _dtype_name(g.dtype))
        rows = [(step, key[0], key[1], dt) for key, dt in current.items()
                if self._last_dtypes.get(key) != dt]
        if rows:  # a new dict: the writer thread may still be reading the old one
            self._last_dtypes = {**self._last_dtypes, **{(r[1], r[2]): r[3] for r in rows}}
        if step == 0 and self._writer is not None and self._autocast is not None:
            enabled, dt = self._autocast
            self._writer.set_meta(autocast_dtype=_dtype_name(dt) if enabled else None)
        return rows

    def _overflow_rows(self, step: int, bad_params: list[int], skipped: bool) -> list[tuple]:
        rows = []
        culprits = self._precheck if self._precheck is not None else self._find_forward_culprits()
        for k, (layer, count) in enumerate(culprits):
            rows.append((step, layer, "activation", "forward", int(k == 0), count, int(skipped)))
        if bad_params:
            counts: dict[int, int] = {}
            grads = self._grads or []
            for i in bad_params:
                g = grads[i]
                n = int((~torch.isfinite(g)).sum()) if g is not None else 0
                counts[self._param_layer[i]] = counts.get(self._param_layer[i], 0) + n
            # Backward runs in reverse forward order: the first layer to receive a non-finite
            # gradient is the one that ran last in the forward pass.
            order = {l: k for k, l in enumerate(self._fwd_order or [])}
            layers = sorted(counts, key=lambda l: -order.get(l, -1))
            for k, layer in enumerate(layers):
                rows.append((step, layer, "grad", "backward", int(k == 0), counts[layer],
                             int(skipped)))
        return rows


def _stat_rows(items: list[tuple]) -> list[tuple[str, list[tuple]]]:
    """``layer_stats`` and ``histograms`` rows of many steps, from their statistics (run on the
    writer thread: the training thread only hands over the numbers). Each item is
    ``(step, statistics, owners, act_rows, dtypes)``; one merge per layer for all of them."""
    kinds = ("activation", "grad", "weight")
    role = {"activation": "output", "grad": "grad", "weight": "weight"}
    blocks, keys, steps, dts = [], [], [], []
    for n, (step, stats, owners, act_rows, dtypes) in enumerate(items):
        if isinstance(stats, HostSample):
            stats = stats.rows()
        n_act = max(act_rows, default=-1) + 1
        # activations of a tensor shared by several modules: the same row for each
        blocks += [stats[:n_act][act_rows], stats[n_act:]]
        # a (step, kind, layer)'s rows share a key: one merge for everything
        keys += [(n * 3 + k) * _KIND + layer for k, kind in enumerate(kinds)
                 for layer in owners[kind]]
        steps.append(step)
        dts.append(dtypes)
    if not keys:
        return []
    merged, d = by_layer(np.concatenate(blocks), keys)
    item, layers = [key // _KIND for key in merged], [key % _KIND for key in merged]
    step_of = [steps[i // 3] for i in item]
    kind_of = [kinds[i % 3] for i in item]
    ints = [d[c].astype(np.int64).tolist() for c in (
        "zeros", "nonfinite", "underflow_fp16", "overflow_fp16", "underflow_bf16",
        "overflow_bf16", "numel")]
    mins = np.where(np.isfinite(d["min_abs_nonzero"]), d["min_abs_nonzero"], np.nan)
    rows = list(zip(step_of, layers, kind_of,
                    [dts[i // 3].get((layer, role[kind]))
                     for i, layer, kind in zip(item, layers, kind_of)],
                    d["norm"].tolist(), d["max_abs"].tolist(), mins.tolist(), *ints))
    hists = [(st, layer, kind, lo, blob)
             for st, layer, kind, (lo, blob) in zip(step_of, layers, kind_of, pack_hists(d["hist"]))]
    return [("layer_stats", rows), ("histograms", hists)]


_KIND = 1 << 32  # (kind, layer) -> one merge key
