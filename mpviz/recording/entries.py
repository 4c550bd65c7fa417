"""Where a step's forward is seen: forward pre-hooks on the modules the training loop calls.

The model gets one at attach; after a watched step, so does each module the loop called
directly (one whose parent did not run: Lightning's ``training_step`` calls ``self.net(x)``, GAN
loops call ``G`` and ``D``). Inside compiled code a pre-hook only stores its inputs on a plain
object, which dynamo repeats after each compiled call with no graph break.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from .. import compat
from .layers import Layers


class _Traced:
    """What a pre-hook traced into compiled code stores on each call."""
    inputs: tuple[int, tuple, dict] | None = None  # (entry module index, args, kwargs)
    autocast: tuple[bool, torch.dtype] | None = None


class Entries:
    def __init__(self, layers: Layers, on_forward: Callable[[int, tuple, dict], None],
                 replaying: Callable[[], bool], contained: Callable[..., Callable]) -> None:
        self.layers, self.on_forward, self.replaying = layers, on_forward, replaying
        self.seen = contained("forward", self._seen)
        self.traced = _Traced()
        self.in_root = False  # inside the model's own forward
        self.hooked: set[int] = {0}

    def attach(self, model: nn.Module, keep: Callable[[Any], None],
               undo: contextlib.ExitStack) -> None:
        keep(model.register_forward_pre_hook(self._pre(0), with_kwargs=True, prepend=True))
        keep(model.register_forward_hook(self._root_end, always_call=True))
        if getattr(model, "_compiled_call_impl", None) is not None:
            _wrap_compiled_call(model, self._pre(0), undo)  # model.compile()

    def add(self, fired: set[int], keep: Callable[[Any], None]) -> None:
        """After a watched step: hook the modules the loop called directly."""
        if not fired or 0 in fired:
            return
        for i in sorted(fired):
            if i not in self.hooked and self.layers.parent[i] not in fired:
                self.hooked.add(i)
                keep(self.layers.modules[i].register_forward_pre_hook(
                    self._pre(i), with_kwargs=True, prepend=True))

    def take_traced(self) -> tuple[tuple[int, tuple, dict], Any] | None:
        """(inputs, autocast state) a compiled forward's pre-hook stored, once."""
        t = self.traced
        if t.inputs is None:
            return None
        found = (t.inputs, t.autocast)
        t.inputs = t.autocast = None
        return found

    def _pre(self, idx: int) -> Callable:
        traced, device_type, seen = self.traced, self.layers.device.type, self.seen

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if compat.is_compiling():
                # plain stores, which the compiled code repeats on every call
                traced.inputs = (idx, args, kwargs)
                traced.autocast = compat.autocast_state(device_type)
                return None
            return seen(idx, args, kwargs)
        return pre

    def _seen(self, idx: int, args: tuple, kwargs: dict) -> None:
        if self.replaying() or not torch.is_grad_enabled():
            return  # evaluation forwards under no_grad are not recorded
        if idx:
            if self.in_root:
                return  # a child entry called inside the model's own forward
        else:
            self.in_root = True
        self.on_forward(idx, args, kwargs)

    def _root_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not compat.is_compiling():
            self.in_root = False


def _wrap_compiled_call(model: nn.Module, pre: Callable, undo: contextlib.ExitStack) -> None:
    """``model.compile()`` runs the model's hooks inside compiled code: see its calls from
    outside (``pre`` eager), and put the original back on close."""
    original = model._compiled_call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        pre(model, args, kwargs)
        return original(*args, **kwargs)

    model._compiled_call_impl = call
    undo.callback(setattr, model, "_compiled_call_impl", original)
