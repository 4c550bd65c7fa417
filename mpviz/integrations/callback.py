"""What the trainer callbacks (:mod:`.hf`, :mod:`.lightning`) share: their arguments, and
starting a :class:`mpviz.Recorder` from them."""
from __future__ import annotations

import os
from typing import Any

from ..recording import Recorder


class RecorderCallback:
    """Errors inside a callback are recorded in ``run.meta["recorder_errors"]``, never raised
    into training.

    Args:
        run_dir: where the run is written (default ``runs/<time>``); with several processes each
            rank writes its own store in it.
        every: per-layer statistics exactly every ``every`` optimizer steps; None (the
            default): at most every 10, within the recorder's cost budget (``stats_budget``).
        policy: an optional :class:`mpviz.PrecisionPolicy` (or rules dict) applied while training.
        **recorder_kwargs: passed to :class:`mpviz.Recorder` (``meta``, ``flush_every_s``, ...).
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, every: int | None = None,
                 policy: Any = None, **recorder_kwargs: Any) -> None:
        self.run_dir, self.every, self.policy = run_dir, every, policy
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None

    def _start(self, model: Any, optimizer: Any, scaler: Any, meta: dict[str, Any]) -> Recorder:
        """Attach a Recorder (all or nothing: a bad policy is refused before training starts)."""
        meta = {**meta, **self.recorder_kwargs.get("meta", {})}
        kwargs = {k: v for k, v in self.recorder_kwargs.items() if k != "meta"}
        rec = Recorder(model, optimizer=optimizer, scaler=scaler, run_dir=self.run_dir,
                       every=self.every, policy=self.policy, meta=meta, **kwargs)
        rec.attach()
        self.recorder, self.run_dir = rec, rec.run_dir
        return rec
