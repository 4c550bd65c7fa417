"""torch.distributed: which rank's gradients went inf/nan first, and which ranks take statistics.

Under DDP the all-reduce spreads one rank's inf/nan to every rank. :func:`watch` registers a DDP
communication hook that does what DDP does without one (scale each bucket by 1/world size,
all-reduce it: bit-identical to DDP's own) and, before the all-reduce, checks each bucket's
*local* gradients, with no extra host sync; ``run.overflows.origin`` says where this rank's own
gradients were non-finite. The Recorder attaches it when given a ``DistributedDataParallel``.

DDP takes one communication hook per model and cannot remove it: after ``Recorder.close()`` the
hook only does the plain all-reduce (a later Recorder takes it over), and a model with a hook of
its own is refused at attach, with the fix (:func:`checked`).

Under FSDP2 (``fully_shard``) each rank's local gradients are checked before the reduce-scatter
(:class:`ShardOrigin`, over :class:`mpviz.recording.fsdp_hooks.LocalGradCheck`); FSDP1
(``FullyShardedDataParallel``) is refused at attach (:func:`check_supported`). Statistics on a
sample of ranks: ``stats_ranks=[0, 7]`` or ``"sample:8"`` (:func:`stats_ranks`); docs/SCALE.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from . import compat


def stats_ranks(spec: Any, world_size: int) -> list[int]:
    """The ranks that record per-layer statistics for ``Recorder(stats_ranks=spec)``.

    ``None``: every rank. A list of ranks (ranks the job does not have are left out).
    ``"sample:K"``: K ranks spread evenly from 0 to the last (always rank 0 and the last).

        >>> stats_ranks("sample:4", 1000)
        [0, 333, 666, 999]
    """
    if spec is None:
        return list(range(world_size))
    if isinstance(spec, str):
        head, _, k = spec.partition(":")
        if head != "sample" or not k.isdigit() or int(k) < 1:
            raise ValueError(f"stats_ranks={spec!r}: use 'sample:K' (K >= 1 ranks spread evenly), "
                             "a list of ranks such as [0, 7], or None for every rank")
        k = min(int(k), world_size)
        if k == 1:
            return [0]
        return sorted({round(i * (world_size - 1) / (k - 1)) for i in range(k)})
    try:
        ranks = sorted({int(r) for r in spec})
    except (TypeError, ValueError):
        raise ValueError(f"stats_ranks={spec!r}: use a list of ranks such as [0, 7], "
                         "'sample:K', or None for every rank") from None
    if any(r < 0 for r in ranks):
        raise ValueError(f"stats_ranks={spec!r}: ranks are >= 0")
    return [r for r in ranks if r < world_size]


def check_supported(model: nn.Module) -> None:
    """Refuse, before anything is attached, what mpviz cannot record: FSDP1, and a DDP model
    with a communication hook of the user's own (see :func:`checked`)."""
    if is_ddp(model):
        _registered(model)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            "mpviz does not record FSDP1 models (FullyShardedDataParallel): their parameters are "
            "flat 1-D slices of the layers (FlatParameter), not the layers' own tensors, and its "
            "hooks are not FSDP2's. mpviz records FSDP2: call "
            "torch.distributed.fsdp.fully_shard(block, mp_policy=MixedPrecisionPolicy(...)) on "
            "each block and then on the model (or mpviz.fsdp.shard(model, policy)) instead of "
            "wrapping the model in FullyShardedDataParallel.")


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was called on the model or one of its modules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _registered(ddp: nn.Module) -> "OriginWatch | None":
    """mpviz's watch already registered on ``ddp`` (by :func:`checked` or an earlier Recorder),
    or None when it has no comm hook; a hook of the user's own is refused with the fix."""
    hooks = getattr(ddp, "_comm_hooks", [])
    if not hooks:
        return None
    w = getattr(hooks[0][0], "_mpviz_watch", None)
    if w is None:
        name = getattr(hooks[0][0], "__qualname__", "?")
        raise ValueError(
            f"this DDP model already has a communication hook ({name}) and DDP takes only one, "
            "so mpviz cannot add its per-rank inf/nan check. Register yours through mpviz: "
            "ddp.register_comm_hook(state, mpviz.distributed.checked(your_hook)), which runs the "
            "check and then your hook.")
    if w.active:
        raise RuntimeError("this DDP model is already watched by another mpviz Recorder: close "
                           "it first (one Recorder per model)")
    return w


class OriginWatch:
    """State of the comm hook: each bucket's local max |g| per parameter, before all-reduce."""

    def __init__(self) -> None:
        self.active = False
        self.flag: torch.Tensor | None = None  # nonzero once a local gradient was non-finite
        self.buckets: list[tuple[list[int], torch.Tensor]] = []
        self.check: Callable[[Any], Any] = lambda bucket: None

    def bind(self, params: list[nn.Parameter], param_layer: list[int], device: torch.device,
             contained: Callable[[str, Callable], Callable]) -> None:
        """Start checking for a Recorder (its parameters, and its error containment)."""
        self._index = {id(p): i for i, p in enumerate(params)}
        self._param_layer = param_layer
        self.flag = torch.zeros(1, device=device)
        # CPU: read flags in the hook (no sync there); tests switch it off to run the other path
        self.on_host = device.type == "cpu"
        self.buckets = []
        self.check = contained("overflow origin", self._check)
        self.active = True

    def remove(self) -> None:
        """Stop checking: the hook goes on doing the plain all-reduce (DDP cannot remove it)."""
        self.active = False
        self.buckets = []
        self.check = lambda bucket: None

    def _check(self, bucket: Any) -> None:
        if self.on_host:
            # Reading a CPU tensor is no sync: one fused check of the whole bucket (about one
            # pass over it), and the per-parameter values only for a bucket that holds inf/nan.
            found = torch.zeros(1, device=self.flag.device)
            compat.check_nonfinite([bucket.buffer()], found)
            if not found.item():
                return
            self.flag += found
        grads = bucket.gradients()
        if not grads:
            return
        idx = [self._index.get(id(p), -1) for p in bucket.parameters()]
        # max |g| per parameter in one fused call (on an accelerator); inf and nan propagate,
        # and unlike a 2-norm it cannot overflow on finite values.
        local = torch.stack(torch._foreach_norm(grads, math.inf)).float()
        if not self.on_host:
            compat.check_nonfinite([local], self.flag)
        self.buckets.append((idx, local))

    def bad_layers(self) -> set[int]:
        """Layers whose local gradients on this rank were non-finite (call on bad steps only:
        it reads the per-parameter values, one host copy)."""
        out: set[int] = set()
        for idx, local in self.buckets:
            for k in (~torch.isfinite(local)).nonzero().flatten().tolist():
                if idx[k] >= 0:
                    out.add(self._param_layer[idx[k]])
        return out

    def end_step(self, flagged: bool) -> None:
        self.buckets = []
        if flagged and self.flag is not None:
            self.flag.zero_()


def _allreduce(process_group: Any, bucket: Any) -> torch.futures.Future:
    """What DDP does without a hook: scale by 1/world size, then all-reduce.

    DDP's reducer multiplies by 1/world size while copying a gradient into the bucket; it
    divides in place instead only for a gradient that already is the bucket's view
    (``gradient_as_bucket_view=True`` with ``zero_grad(set_to_none=False)``), which this cannot
    see. There, for a world size that is not a power of two, a value can differ from DDP's by one
    unit in the last place (for powers of two, multiplying and dividing agree exactly)."""
    dist = torch.distributed
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    buf.mul_(1.0 / group.size())
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


def _hook_of(watch: OriginWatch, inner: Callable | None) -> Callable:
    # No annotations: DDP compares them literally (and this module's are strings).
    def mpviz_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
        if watch.active:
            watch.check(bucket)
        if inner is not None:
            return inner(state, bucket)
        return _allreduce(state, bucket)

    mpviz_allreduce_hook._mpviz_watch = watch  # type: ignore[attr-defined]
    return mpviz_allreduce_hook


def checked(hook: Callable) -> Callable:
    """Your own DDP communication hook, with mpviz's local inf/nan check run before it.

        >>> ddp.register_comm_hook(state, mpviz.distributed.checked(my_hook))   # doctest: +SKIP
        >>> rec = mpviz.Recorder(ddp, ...)   # finds the check and uses it     # doctest: +SKIP
    """
    return _hook_of(OriginWatch(), hook)


class ShardOrigin:
    """FSDP2: each rank's local gradients checked before the reduce-scatter, with
    :class:`OriginWatch`'s interface (``flag``, ``bad_layers``, ``end_step``, ``remove``)."""

    def __init__(self, model: nn.Module, layers: Any,
                 contained: Callable[[str, Callable], Callable]) -> None:
        from .recording.fsdp_hooks import LocalGradCheck

        self.index = layers.index
        self.check = LocalGradCheck(model, wrap=lambda fn: contained("overflow origin", fn))
        self.check.attach()

    @property
    def flag(self) -> Any:
        return self.check.flag()

    def bad_layers(self) -> set[int]:
        """Layers whose local gradients on this rank were non-finite (on a CPU no copy; on an
        accelerator one host copy: call on bad steps only)."""
        found = (self.index.get(name.rpartition(".")[0]) for name in self.check.bad_params())
        return {i for i in found if i is not None}

    def end_step(self, flagged: bool) -> None:
        self.check.end_step()

    def remove(self) -> None:
        self.check.remove()


def watch(model: nn.Module, parts: Any) -> "OriginWatch | ShardOrigin | None":
    """Check each DDP bucket's (or FSDP2 unit's) local gradients for the recorder whose
    ``parts`` (:class:`mpviz.recording.step.Parts`) are given (None: neither DDP nor FSDP2).
    Called by the Recorder at attach; ``remove()`` stops it."""
    if is_fsdp(model):
        return ShardOrigin(model, parts.layers, parts.contained)
    if not is_ddp(model):
        return None
    w = _registered(model)
    if w is None:
        w = OriginWatch()
        hook = _hook_of(w, None)
        try:
            model.register_comm_hook(model.process_group, hook)
        except RuntimeError as e:  # a built-in hook (register_builtin_comm_hook) is there
            raise ValueError(f"mpviz cannot register its DDP communication hook ({e}): this model "
                             "has a built-in one already. Remove it (DDP takes one hook), or "
                             "wrap a Python hook with mpviz.distributed.checked.") from None
    w.bind(parts.layers.params, parts.layers.param_layer, parts.layers.device, parts.contained)
    return w
