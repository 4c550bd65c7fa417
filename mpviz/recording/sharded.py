"""FSDP2's sharded tensors measured as if whole, and each FSDP unit's precision.

:func:`sharded_stats` gives the statistics :mod:`mpviz.stats` gives for ordinary tensors (one
``[n, ROW]`` row per tensor: norm, max |x|, smallest nonzero |x|, numel, elements measured, the
log2 histogram) of the *full* tensors behind ``DTensor`` shards, with nothing gathered: each rank
measures its own shard and two all-reduces combine the parts:

- SUM of one float64 ``[n, 3 + N_BINS]`` tensor: sum of squares, element count, elements
  measured, histogram;
- MAX of one float64 ``[n, 2]`` tensor: max |x|, and minus the smallest nonzero |x|.

That is ``n * (3 + N_BINS + 2) * 8`` bytes per rank (about 2 KiB per tensor), whatever the
tensors' sizes. By default every element is measured (the rows say ``sampled == numel``), so
counts and histograms are exact; ``sample=`` bounds the work on big tensors as mpviz.stats does.
Norm and max |x| are always over every element.
Every rank of the shard group must call it with the same tensors (it is a collective).

:func:`fsdp_units` reports each FSDP unit's ``MixedPrecisionPolicy`` as it acts (the dtype it
computes in, reduces gradients in, casts outputs to) and its sharded parameters' storage dtype.

The Recorder's FSDP2 path: :class:`Sharding` (what it needs to know of the model, at attach) and
:class:`ShardedStats` (its statistics collectives, which every rank joins on the same steps, and
which stop on every rank at once if they fail on one).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..formats import N_BINS, dtype_name
from ..stats import N_HEAD, ROW, SAMPLE_CAP

__all__ = ["sharded_stats", "shard_group", "FSDPUnit", "fsdp_units", "Sharding", "ShardedStats"]

_SUMS = 3 + N_BINS  # sum of squares, numel, elements measured, histogram


def shard_group(tensors: list[torch.Tensor]) -> Any:
    """The process group over which ``tensors`` (DTensors) are sharded: the one mesh dimension
    they are sharded on (FSDP: the mesh's only dimension; HSDP: its second). Raises ValueError
    for tensors on different meshes or sharded on several dimensions."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Shard

    dims: set[tuple[Any, int]] = set()  # (mesh, dim): each fully_shard makes its own equal mesh
    for t in tensors:
        if not isinstance(t, DTensor):
            raise ValueError(f"sharded_stats takes DTensors (FSDP2's parameters and gradients), "
                             f"got a {type(t).__name__}; pass group= for plain local shards")
        if any(isinstance(p, Partial) for p in t.placements):
            raise ValueError("a DTensor with a Partial placement holds unreduced values: "
                             "measure it after its reduction")
        sharded = [d for d, p in enumerate(t.placements) if isinstance(p, Shard)]
        if len(sharded) != 1:
            raise ValueError(f"a DTensor sharded on mesh dimensions {sharded} (placements "
                             f"{t.placements}): sharded_stats reduces over one; pass group=")
        dims.add((t.device_mesh, sharded[0]))
    if len(dims) != 1:
        raise ValueError("the tensors are sharded over different meshes or mesh dimensions: "
                         "call sharded_stats once per mesh")
    mesh, dim = next(iter(dims))
    return mesh.get_group(dim)


def sharded_stats(tensors: list[torch.Tensor], group: Any = None,
                  scaled: tuple[int, int, Any] | None = None, dst: int | None = None,
                  sample: int | None = None, offset: int = 0) -> torch.Tensor | None:
    """Statistics of the full tensors behind ``tensors``: float64 ``[len(tensors), ROW]`` on
    their device, laid out as :func:`mpviz.stats.tensor_stats`.

    - ``tensors``: DTensors (FSDP2's sharded parameters or their ``.grad``), or plain local
      shards with ``group`` given.
    - ``group``: the process group they are sharded over (default: :func:`shard_group`).
    - ``scaled=(i, j, scale)``: tensors ``i..j-1`` are measured divided by ``scale`` (a
      GradScaler's loss scale), as in :func:`mpviz.stats.tensor_stats`.
    - ``dst``: a rank of ``group`` that alone gets the result (two ``reduce`` instead of two
      ``all_reduce``; the others get None).
    - ``sample``: None measures every element (exact counts). A number N takes the histogram
      and smallest nonzero |x| of a tensor from about N evenly strided elements, spread over
      the shards in proportion to their sizes and moved along by ``offset`` (the step), as
      :mod:`mpviz.stats` does above ``SAMPLE_CAP``; norm and max |x| stay exact.

    Two collectives (a SUM and a MAX) whatever the number of tensors. Written to need no host
    sync on an accelerator (device-side reductions, cached index tensors); the tests run on the
    CPU.

        >>> grads = [p.grad for p in fsdp_model.parameters()]     # doctest: +SKIP
        >>> rows = sharded_stats(grads)                            # doctest: +SKIP
        >>> rows[:, 0]    # the full gradients' norms, the same on every rank  # doctest: +SKIP
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if not tensors:
        return torch.zeros(0, ROW, dtype=torch.float64)
    if group is None:
        group = shard_group(tensors)
    local = [(t.to_local() if isinstance(t, DTensor) else t).detach() for t in tensors]
    full = [t.numel() if isinstance(t, DTensor) else t.numel() * dist.get_world_size(group)
            for t in tensors]
    sums, maxes = local_parts(local, full, scaled, sample, offset)
    if dst is None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    else:
        dist.reduce(sums, dist.get_global_rank(group, dst), op=dist.ReduceOp.SUM, group=group)
        dist.reduce(maxes, dist.get_global_rank(group, dst), op=dist.ReduceOp.MAX, group=group)
        if dist.get_rank(group) != dst:
            return None
    return combine(sums, maxes)


def local_parts(local: list[torch.Tensor], full_numel: list[int],
                scaled: tuple[int, int, Any] | None = None, sample: int | None = None,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's parts: float64 ``[n, 3 + N_BINS]`` (sum of squares, numel, elements
    measured, histogram) to be summed over the ranks, ``[n, 2]`` (max |x|, minus the smallest
    nonzero |x|) to be maxed. ``full_numel``: each whole tensor's size (for ``sample``)."""
    n = len(local)
    device = local[0].device
    sums = torch.zeros(n, _SUMS, dtype=torch.float64, device=device)
    maxes = torch.full((n, 2), -math.inf, dtype=torch.float64, device=device)
    maxes[:, 0] = 0.0
    present = [k for k in range(n) if local[k].numel()]
    numel = tuple(t.numel() for t in local)
    if not present:
        sums[:, 1] = _const(numel, device, torch.float64)
        return sums, maxes
    div = torch.ones(n, dtype=torch.float64, device=device)
    if scaled is not None:  # a scale on the device is read there, without a sync
        i, j, scale = scaled
        div[i:j] = scale
    div32 = div.float()
    idx = _const(tuple(present), device)
    flat = [local[k].reshape(-1) for k in present]
    # every element: norm and max |x| (inf and nan propagate)
    norms, tops = _norms(flat)
    sums[idx, 0] = (norms / div[idx]) ** 2
    # nan is carried by the sum of squares (nan there; inf for an inf alone), not by the MAX,
    # whose handling of nan differs between backends: max |x| goes as inf, comes back nan.
    maxes[idx, 0] = torch.nan_to_num(tops.double() / div[idx], nan=math.inf, posinf=math.inf)
    # the (sampled) elements of each shard, binned in batches of small ones
    samples, measured = _sampled(flat, present, n, full_numel, sample, offset)
    for rows in _batches([s.numel() for s in samples]):
        at = _const(tuple(present[r] for r in rows), device)
        hist, zeros, mins = _bins([samples[r] for r in rows],
                                  div32[at] if scaled is not None else None)
        sums[at, 3] = zeros
        sums[at, 4] = hist[:, 0] - zeros
        sums[at, 5:] = hist[:, 1:]
        maxes[at, 1] = -mins.double()
    sums[:, 1] = _const(numel, device, torch.float64)
    sums[:, 2] = _const(tuple(measured), device, torch.float64)
    return sums, maxes


def _sampled(flat: list[torch.Tensor], present: list[int], n: int, full_numel: list[int],
             sample: int | None, offset: int) -> tuple[list[torch.Tensor], list[int]]:
    """The elements to bin of each nonempty shard (all, or its share of about ``sample`` per
    whole tensor, evenly strided from ``offset``), and how many are measured of each of the
    ``n`` tensors."""
    samples, measured = [], [0] * n
    for r, k in enumerate(present):
        f = flat[r]
        if sample is not None:
            cap = max(1, math.ceil(sample * f.numel() / full_numel[k]))
            if f.numel() > cap:
                stride = -(-f.numel() // cap)
                f = f[offset % stride::stride][: f.numel() // stride]
        measured[k] = f.numel()
        samples.append(f)
    return samples, measured


_SMALL = 1 << 16  # shards (or samples) up to this size are binned together ...
_BATCH = 1 << 20  # ... this many elements at a time


def _batches(lengths: list[int]) -> list[list[int]]:
    """Rows binned together: small ones in batches of at most _BATCH elements, others alone."""
    out, cur, size = [], [], 0
    for r, n in enumerate(lengths):
        if n > _SMALL:
            out.append([r])
            continue
        if cur and size + n > _BATCH:
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    return out + ([cur] if cur else [])


def _bins(samples: list[torch.Tensor], div: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor: the counts of each float32 biased exponent of |x| (or |x| / div) in float64
    ``[m, 256]`` (zeros and subnormals share exponent 0, inf and nan 255), the zeros, and the
    smallest nonzero finite |x| (inf if none). A batch is one concatenation and a few
    segmented reductions."""
    m = len(samples)
    device = samples[0].device
    x = (torch.cat([s.reshape(-1) for s in samples]) if m > 1 else samples[0]).float().abs()
    seg = _segments(tuple(s.numel() for s in samples), device) if m > 1 else None
    if div is not None:
        x /= div[seg] if seg is not None else div[0]
    bits = x.view(torch.int32)
    key = bits >> 23
    if seg is not None:
        key = key + seg * 256
    if device.type == "cpu":
        hist = torch.bincount(key, minlength=m * 256).double()
    else:  # bincount on an accelerator reads its range back to the host: a sync
        hist = torch.zeros(m * 256, dtype=torch.float64, device=device).index_add_(
            0, key, _ones(device).expand(key.numel()))
    if seg is None:
        zeros = (x.numel() - torch.count_nonzero(x)).double().reshape(1)
    else:
        zeros = torch.zeros(m, dtype=torch.float64, device=device).index_add_(
            0, seg, (x == 0).double())
    # On the int32 bits (ordered like the magnitudes), x - 1 sends zero to the largest int32,
    # so the minimum skips zeros (in place: x is not needed any more).
    low = bits.sub_(1).bitwise_and_(0x7FFFFFFF)
    if seg is None:
        low = low.amin().reshape(1)
    else:
        low = torch.full((m,), 0x7FFFFFFF, dtype=torch.int32, device=device).scatter_reduce_(
            0, seg, low, "amin")
    mins = (low + 1).view(torch.float32)
    mins = torch.where((mins > 0) & torch.isfinite(mins), mins, math.inf)
    return hist.view(m, 256), zeros, mins


@functools.lru_cache(maxsize=256)
def _const(values: tuple, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small constant tensor, cached: a fresh host -> device copy would wait for the device."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _segments(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Each element's tensor (row) in a concatenation."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)


def combine(sums: torch.Tensor, maxes: torch.Tensor) -> torch.Tensor:
    """Rows as :func:`mpviz.stats.tensor_stats` from the reduced parts."""
    n = sums.shape[0]
    out = torch.zeros(n, ROW, dtype=torch.float64, device=sums.device)
    out[:, 0] = sums[:, 0].sqrt()
    out[:, 1] = torch.where(torch.isnan(sums[:, 0]), math.nan, maxes[:, 0])
    out[:, 2] = -maxes[:, 1]
    out[:, 3:5] = sums[:, 1:3]
    out[:, N_HEAD:] = sums[:, 3:]
    return out


def _norms(flat: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms (float64) and max |x| of each tensor. In float32 the squares of values below
    about 1e-19 vanish and those above 1e19 overflow: on the CPU a tensor whose max |x| is
    outside [2**-30, 2**50] is measured again in float64 (reading the max there is no sync);
    on an accelerator all are measured in float64 (one fused pass, bound by memory)."""
    if flat[0].device.type != "cpu":
        norms = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float64))
        return norms, torch.stack(torch._foreach_norm(flat, math.inf, dtype=torch.float32))
    norms = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float32)).double()
    # (an inf-norm is much slower than aminmax on the CPU; nan propagates through both)
    tops = torch.stack([torch.stack(torch.aminmax(t)) for t in flat]).float().abs().amax(1)
    for r, m in enumerate(tops.tolist()):
        if 0 < m < 2.0 ** -30 or 2.0 ** 50 < m < math.inf:
            norms[r] = torch.linalg.vector_norm(flat[r], dtype=torch.float64)
    return norms, tops


_ONES: dict[torch.device, torch.Tensor] = {}


def _ones(device: torch.device) -> torch.Tensor:
    if device not in _ONES:
        _ONES[device] = torch.ones(1, dtype=torch.float64, device=device)
    return _ONES[device]


@dataclass(frozen=True)
class FSDPUnit:
    """One FSDP unit (one ``fully_shard`` call) as it acts, as plain names.

    ``param_dtype``: the dtype its parameters are all-gathered and computed in;
    ``reduce_dtype``: the dtype its gradients are reduce-scattered in; ``output_dtype``: the
    dtype its floating outputs are cast to (None: left as computed); ``storage_dtype``: the
    sharded parameters' own dtype (what the optimizer steps); ``params``: the parameters it
    manages, by ``model.named_parameters()`` names."""

    modules: tuple[str, ...]
    param_dtype: str | None
    reduce_dtype: str | None
    output_dtype: str | None
    cast_forward_inputs: bool
    storage_dtype: str | None
    params: tuple[str, ...]
    numel: int


def fsdp_units(model: nn.Module) -> list[FSDPUnit]:
    """Each FSDP2 unit of ``model`` (modules on which ``fully_shard`` was called, the root
    included), in ``named_modules()`` order; [] for a model without FSDP2.

        >>> for u in fsdp_units(model):                                   # doctest: +SKIP
        ...     print(u.modules, u.param_dtype, u.reduce_dtype)
        ('layers.0',) bfloat16 float32
    """
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch built without distributed
        return []
    states: dict[int, tuple[Any, list[str]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FSDPModule):
            state = fully_shard.state(mod)
            states.setdefault(id(state), (state, []))[1].append(name)
    unit_of = {id(_module(model, m)): sid for sid, (_, mods) in states.items() for m in mods}
    by_name = dict(model.named_parameters())
    managed: dict[int | None, list[str]] = {}
    for n in by_name:
        managed.setdefault(_managing_state(model, n, unit_of), []).append(n)
    out = []
    for sid, (state, mods) in states.items():
        params = managed.get(sid, [])
        ps = [by_name[n] for n in params]
        storage = {p.dtype for p in ps if p.requires_grad} or {p.dtype for p in ps}
        storage_dtype = next(iter(storage)) if len(storage) == 1 else None
        # No public accessor: the policy given to fully_shard, as its FSDPState keeps it.
        mp = state._mp_policy
        param_dtype = mp.param_dtype or storage_dtype
        reduce_dtype = mp.reduce_dtype or param_dtype
        out.append(FSDPUnit(
            modules=tuple(mods), param_dtype=dtype_name(param_dtype),
            reduce_dtype=dtype_name(reduce_dtype), output_dtype=dtype_name(mp.output_dtype),
            cast_forward_inputs=bool(mp.cast_forward_inputs and mp.param_dtype is not None),
            storage_dtype=dtype_name(storage_dtype), params=tuple(params),
            numel=sum(p.numel() for p in ps)))
    return out


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _managing_state(model: nn.Module, param_name: str, unit_of: dict[int, int]) -> int | None:
    """The unit managing a parameter: the innermost unit module above its owner."""
    parts = param_name.split(".")[:-1]
    found = unit_of.get(id(model))
    mod = model
    for p in parts:
        mod = getattr(mod, p)
        found = unit_of.get(id(mod), found)
    return found


@dataclass(frozen=True)
class Sharding:
    """An FSDP2 model as the Recorder sees it: its units, the dtype each parameter's layer
    computes with (its unit's ``param_dtype``; not the sharded storage dtype), the modules
    ``fully_shard`` was called on (their activation hooks go before FSDP's output cast), and the
    process group the parameters are sharded over."""

    units: list[FSDPUnit]
    compute_dtypes: list[str]  # per parameter (in the order given to :meth:`of`)
    fsdp_modules: set[int]  # indices (in the order given to :meth:`of`)
    group: Any

    @classmethod
    def of(cls, model: nn.Module, modules: list[nn.Module],
           params: list[torch.Tensor]) -> "Sharding | None":
        """None for a model without FSDP2."""
        try:
            from torch.distributed.fsdp import FSDPModule
            from torch.distributed.tensor import DTensor
        except ImportError:
            return None
        fsdp_mods = {i for i, m in enumerate(modules) if isinstance(m, FSDPModule)}
        if not fsdp_mods:
            return None
        units = fsdp_units(model)
        compute = {n: u.param_dtype for u in units for n in u.params}
        name_of = {id(p): n for n, p in model.named_parameters()}
        dtypes = [compute.get(name_of.get(id(p), ""), None) or dtype_name(p.dtype) for p in params]
        group = shard_group([p for p in params if isinstance(p, DTensor)])
        return cls(units, dtypes, fsdp_mods, group)

    def meta(self) -> list[dict[str, Any]]:
        """The units for ``run.meta["fsdp_units"]`` (plain JSON)."""
        return [{"modules": list(u.modules), "param_dtype": u.param_dtype,
                 "reduce_dtype": u.reduce_dtype, "output_dtype": u.output_dtype,
                 "storage_dtype": u.storage_dtype, "cast_forward_inputs": u.cast_forward_inputs,
                 "n_params": len(u.params), "numel": u.numel} for u in self.units]


class ShardedStats:
    """Statistics of an FSDP2 model's gradients and weights as whole tensors, for the Recorder:
    :func:`sharded_stats` over every parameter at once, with the rules a collective needs.

    - Every rank of the group calls :meth:`rows` on the same steps (the Recorder's statistics
      steps, a fixed ``every``), also ranks that store no statistics, and always with the same
      number of rows: one per parameter's gradient (an absent gradient adds nothing) and one
      per weight.
    - What a rank computes alone (its shards' parts) can fail; it then joins the collectives
      anyway, with a flag in the summed tensor. Every rank reads the summed flag, so all stop
      together (``stopped``) and no rank waits for a collective that will not come.
    - Parameters outside every FSDP unit (plain tensors, the same on every rank) are counted
      once, from the group's first rank.

    Reading the flag is the one host read it adds (a sync on an accelerator, per statistics
    step). Histograms and smallest nonzero |x| of tensors above ``sample`` elements are taken
    from a strided sample, as :mod:`mpviz.stats` does; norms, max |x| and counts of elements
    are exact."""

    def __init__(self, group: Any, sample: int | None = SAMPLE_CAP) -> None:
        import torch.distributed as dist

        self.group, self.sample = group, sample
        self.first = dist.get_rank(group) == 0
        self.stopped = False  # the same on every rank
        self.failed_ranks = 0

    def rows(self, make: Any, n: int, device: torch.device, offset: int,
             on_error: Any) -> torch.Tensor | None:
        """float64 ``[n, ROW]`` rows of the ``n`` tensors ``make()`` returns as
        ``(tensors, scaled)`` (a tensor may be None: no rows from it), or None once the
        statistics stopped. ``on_error(exc)``: this rank's own failure, told before it joins."""
        import torch.distributed as dist

        if self.stopped:
            return None
        failed = 0.0
        try:
            tensors, scaled = make()
            if len(tensors) != n:
                raise ValueError(f"{len(tensors)} tensors to measure, {n} expected")
            sums, maxes = self._local(tensors, scaled, device, offset)
        except Exception as e:  # noqa: BLE001 - joined anyway (the others wait for it)
            on_error(e)
            failed = 1.0
            sums = torch.zeros(n, _SUMS, dtype=torch.float64, device=device)
            maxes = torch.zeros(n, 2, dtype=torch.float64, device=device)
        flag = torch.zeros(1, _SUMS, dtype=torch.float64, device=device)
        flag[0, 0] = failed
        sums = torch.cat([sums, flag])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group)
        self.failed_ranks = int(sums[n, 0].item())
        if self.failed_ranks:
            self.stopped = True
            return None
        return combine(sums[:n], maxes)

    def _local(self, tensors: list[torch.Tensor | None], scaled: Any, device: torch.device,
               offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        none = torch.zeros(0, device=device)
        local, full = [], []
        for t in tensors:
            if t is None:
                local.append(none)
                full.append(0)
            elif isinstance(t, DTensor):
                local.append(t.to_local().detach())
                full.append(t.numel())
            else:  # not sharded: counted once
                local.append(t.detach() if self.first else t.detach().reshape(-1)[:0])
                full.append(t.numel())
        return local_parts(local, full, scaled, self.sample, offset)
