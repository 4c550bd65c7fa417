"""Record a Lightning run: add one callback, change nothing else.

    >>> from mpviz.integrations.lightning import MpvizCallback
    >>> trainer = lightning.Trainer(precision="bf16-mixed",
    ...                             callbacks=[MpvizCallback(run_dir="runs/pl1")])  # doctest: +SKIP
    >>> trainer.fit(module, loader)                                                 # doctest: +SKIP
    >>> mpviz.load_run("runs/pl1").steps                                            # doctest: +SKIP

On ``on_train_start`` a :class:`mpviz.Recorder` is attached to the LightningModule, the first
optimizer (``trainer.optimizers[0]``) and the precision plugin's GradScaler when there is one
(``trainer.precision_plugin.scaler``: ``precision="16-mixed"``; ``"bf16-mixed"`` has none). A
recorded step is one optimizer step; its loss is the mean of the ``training_step`` losses of its
micro-batches (Lightning divides them by ``accumulate_grad_batches``; this undoes it). Recorded
per layer: the LightningModule's submodules, whether ``training_step`` calls ``self(x)`` or a
child (``self.net(x)``); gradients before Lightning's clipping. Manual optimization and several
optimizers: only the first optimizer's steps are recorded. ``pip install "mpviz[lightning]"``.
"""
from __future__ import annotations

from typing import Any

from . import require

_pl = require("lightning.pytorch", "lightning", "mpviz.integrations.lightning")

import torch  # noqa: E402  (after the check, so a missing extra is named first)

from .. import tree  # noqa: E402
from .callback import RecorderCallback  # noqa: E402


class MpvizCallback(RecorderCallback, _pl.Callback):
    """A Lightning ``Callback`` that records training with :class:`mpviz.Recorder`; arguments as
    :class:`~mpviz.integrations.callback.RecorderCallback`."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None:
            self._close()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._start(pl_module, optimizer, scaler, {
            "trainer": "lightning.Trainer", "lightning_version": _pl.__version__,
            "lightning_precision": str(trainer.precision_plugin.precision)})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rec = self.recorder
        if rec is None:
            return
        loss, samples = None, None
        try:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                loss = loss.detach().float() * int(trainer.accumulate_grad_batches)
            else:
                loss = None
            first = next(tree.tensors(batch), None)
            samples = int(first.shape[0]) if first is not None and first.dim() > 0 else None
        except Exception as e:  # noqa: BLE001 - never into the training loop
            rec.record_error("lightning callback", e)
        rec.step(loss=loss, samples=samples)  # contains its own errors

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.close(error=exception)  # the run is marked failed, the hooks removed
            self.recorder = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
