"""Record a Hugging Face ``Trainer`` run: add one callback, change nothing else.

    >>> from mpviz.integrations.hf import MpvizCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
    ...                   callbacks=[MpvizCallback(run_dir="runs/hf1")])   # doctest: +SKIP
    >>> trainer.train()                                                    # doctest: +SKIP
    >>> mpviz.load_run("runs/hf1").steps                                   # doctest: +SKIP

On ``on_train_begin`` a :class:`mpviz.Recorder` is attached to the Trainer's model, its optimizer
(accelerate's ``AcceleratedOptimizer`` is unwrapped) and its GradScaler when there is one
(accelerate keeps it on the optimizer: ``trainer.optimizer.scaler``, the same object as
``trainer.accelerator.scaler``). A recorded step is one optimizer step (``state.global_step``);
its loss is the one the Trainer logs: the model's ``loss`` output of each micro-batch, summed
when the Trainer normalised it over the whole step (``num_items_in_batch``), averaged otherwise.
Unlike the Trainer's log, a nan/inf loss is recorded as it was (``logging_nan_inf_filter`` does
not apply). ``pip install "mpviz[hf]"``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import require

_transformers = require("transformers", "hf", "mpviz.integrations.hf")

import torch  # noqa: E402  (after the check, so a missing extra is named first)

from .. import tree  # noqa: E402
from .callback import RecorderCallback  # noqa: E402


class MpvizCallback(RecorderCallback, _transformers.TrainerCallback):
    """A ``TrainerCallback`` that records the run with :class:`mpviz.Recorder`; arguments as
    :class:`~mpviz.integrations.callback.RecorderCallback`.

    ``callback.recorder`` is the Recorder while training (``callback.recorder.run``: the live run);
    ``callback.run_dir`` where the run is.

    The Trainer has no event for a ``train()`` that raises: ``with callback: trainer.train()``
    then marks the run "failed" with the error and removes the hooks (without it, the run stays
    "running" and the hooks stay on the model until the next ``train()``).
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, every: int | None = None,
                 policy: Any = None, **recorder_kwargs: Any) -> None:
        super().__init__(run_dir, every, policy, **recorder_kwargs)
        self._hooks: list[Any] = []
        self._losses: list[torch.Tensor] = []
        self._normalized = False  # the model's loss was divided by the step's item count
        self._samples = 0
        self._in_step = False  # the recorder's overflow replay runs a forward inside rec.step()

    def __enter__(self) -> "MpvizCallback":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._close(error=exc)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.recorder is not None:  # a second train() call: a new run_dir is needed
            self._close()
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer
        self._start(model, optimizer, scaler, {"trainer": "transformers.Trainer",
                                               "transformers_version": _transformers.__version__})
        self._hooks = [model.register_forward_hook(self._on_forward, with_kwargs=True)]
        autocast = _accelerate_autocast(model)
        if autocast is not None:
            # accelerate enters autocast inside model.forward, after the forward pre-hooks, so
            # the recorder's pre-hook would see it off: enter the same autocast around the whole
            # call (ours runs before the recorder's pre-hook). Nested, it changes nothing.
            entered: list[Any] = []

            def enter(module: Any, args: Any) -> None:
                ctx = torch.autocast(*autocast)
                ctx.__enter__()
                entered.append(ctx)

            def leave(module: Any, args: Any, output: Any) -> None:
                if entered:
                    entered.pop().__exit__(None, None, None)

            self._hooks += [model.register_forward_pre_hook(enter, prepend=True),
                            model.register_forward_hook(leave, prepend=True, always_call=True)]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rec = self.recorder
        if rec is None:
            return
        try:
            losses, self._losses = self._losses, []
            loss = None
            if losses:
                total = torch.stack([l.float().reshape(()) for l in losses]).sum()
                loss = total if self._normalized else total / len(losses)
            samples, self._samples = self._samples, 0
        except Exception as e:  # noqa: BLE001 - never into the training loop
            rec.record_error("hf callback", e)
            loss, samples = None, 0
        self._in_step = True
        try:
            rec.step(loss=loss, samples=samples or None)  # contains its own errors
        finally:
            self._in_step = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    # ------------------------------------------------------------------ internals
    def _on_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """Keep each training micro-batch's loss and batch size (evaluation runs under no_grad)."""
        if self._in_step or not torch.is_grad_enabled() or not module.training:
            return
        try:
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor):
                self._losses.append(loss.detach())
                self._normalized = kwargs.get("num_items_in_batch") is not None
            first = next(tree.tensors((args, kwargs)), None)
            if first is not None and first.dim() > 0:
                self._samples += int(first.shape[0])
        except Exception as e:  # noqa: BLE001
            if self.recorder is not None:
                self.recorder.record_error("hf callback", e)

    def _close(self, error: BaseException | None = None) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.recorder is not None:
            self.recorder.close(error=error)
            self.recorder = None
        self._losses, self._samples = [], 0


def _accelerate_autocast(model: Any) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the autocast accelerate wraps ``model.forward`` in, if it did."""
    if getattr(model, "_original_forward", None) is None:  # set by Accelerator.prepare_model
        return None
    try:
        from accelerate.state import AcceleratorState

        state = AcceleratorState()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(state.mixed_precision))
        return None if dtype is None else (state.device.type, dtype)
    except Exception:  # noqa: BLE001 - then the recorder sees autocast as the pre-hook does
        return None
