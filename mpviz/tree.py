"""One walker for the nested structures a model takes and returns: tuples, lists, dicts,
namedtuples, dataclasses and Hugging Face ``ModelOutput`` s keep their type (``torch.utils._pytree``
plus ``dataclasses.fields`` for what pytree treats as a leaf).

    >>> import torch
    >>> from collections import namedtuple
    >>> Out = namedtuple("Out", "logits aux")
    >>> out = Out(torch.ones(2, dtype=torch.float16), {"ids": torch.arange(2)})
    >>> map_floats(lambda t: t.float(), out).logits.dtype, type(map_floats(lambda t: t, out)).__name__
    (torch.float32, 'Out')
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

__all__ = ["tensors", "first_float", "map_tensors", "map_floats"]

Fn = Callable[[torch.Tensor], torch.Tensor]


def _is_dataclass_instance(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, in order (containers, dataclass fields, dict values)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            yield leaf
        elif _is_dataclass_instance(leaf):
            for f in dataclasses.fields(leaf):
                yield from tensors(getattr(leaf, f.name, None))
        elif isinstance(leaf, (Mapping, list, tuple)):  # subclasses pytree does not know,
            # and mappings that are no dict (Hugging Face's BatchEncoding is a UserDict)
            yield from tensors(list(leaf.values()) if isinstance(leaf, Mapping) else list(leaf))


def first_float(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``obj``, or None."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if type(obj) is tuple and obj and isinstance(obj[0], torch.Tensor) and obj[0].is_floating_point():
        return obj[0]  # the common case, a forward's positional args: no walk
    for t in tensors(obj):
        if t.is_floating_point():
            return t
    return None


def map_tensors(fn: Fn, obj: Any, floats_only: bool = False) -> Any:
    """``obj`` with each tensor replaced by ``fn(tensor)``, every container keeping its type (the
    same object where nothing was replaced)."""
    if isinstance(obj, torch.Tensor):
        return _map_leaf(fn, obj, floats_only)
    flat, spec = pytree.tree_flatten(obj)
    new = [_map_leaf(fn, x, floats_only) for x in flat]
    if all(a is b for a, b in zip(new, flat)):
        return obj
    return pytree.tree_unflatten(new, spec)


def _map_leaf(fn: Fn, x: Any, floats_only: bool) -> Any:
    """A pytree leaf: a tensor, or a container pytree does not know, walked here."""
    if isinstance(x, torch.Tensor):
        return fn(x) if (x.is_floating_point() or not floats_only) else x
    if _is_dataclass_instance(x):
        return _map_dataclass(fn, x, floats_only)
    if isinstance(x, MutableMapping):  # a dict subclass pytree does not know, a UserDict
        new = {k: map_tensors(fn, v, floats_only) for k, v in x.items()}
        if all(new[k] is x[k] for k in new):
            return x
        out = copy.copy(x)
        out.update(new)
        return out
    if isinstance(x, list):
        items = [map_tensors(fn, v, floats_only) for v in x]
        if all(a is b for a, b in zip(items, x)):
            return x
        out = copy.copy(x)
        out[:] = items
        return out
    return x


def _map_dataclass(fn: Fn, x: Any, floats_only: bool) -> Any:
    new = {f.name: map_tensors(fn, getattr(x, f.name, None), floats_only)
           for f in dataclasses.fields(x) if hasattr(x, f.name)}
    if all(new[k] is getattr(x, k) for k in new):
        return x
    out = copy.copy(x)
    for k, v in new.items():
        object.__setattr__(out, k, v)  # frozen dataclasses too
    return out


def map_floats(fn: Fn, obj: Any) -> Any:
    """``obj`` with each floating-point tensor replaced by ``fn(tensor)`` (see map_tensors)."""
    return map_tensors(fn, obj, floats_only=True)
