"""`Trainer`: the one step runner behind the lab and ``python -m mpviz demo`` (autocast,
GradScaler, backward, optimizer step), recorded by `mpviz.Recorder` under a live precision
policy."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from mpviz import compat, tree
from mpviz.precision import PrecisionPolicy, apply_policy, canonical, validate_rules
from mpviz.tasks import Task, demo_parts, get_task
from mpviz.training.copies import copy_model, copy_optimizer
from mpviz.training.run_dirs import new_run_dir

__all__ = ["Trainer", "LossFn"]

LossFn = Callable[[nn.Module, Any], Any]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Train a model step by step, optionally recording it with `mpviz.Recorder`.

    Either a demo task (``Trainer(task="digits", precision="fp16")``, see `demo_parts`), or your
    own parts:

    - ``model``, ``optimizer``, ``data`` (any iterable of batches; iterated again when it ends);
    - ``loss_fn(model, batch) -> loss`` (forward only): the trainer owns autocast
      (``precision``), the GradScaler (``grad_scaler``, ``init_scale``, ``growth_interval``;
      by default on for fp16 only), backward, ``optimizer.step()`` and ``zero_grad``;
    - or ``train_step(model, batch) -> loss``, which does backward and the step itself (pass its
      ``scaler`` so skipped steps and the loss scale are recorded); the AMP settings are its own.

    ``precision``: ``"fp32"`` (no autocast), ``"bf16"``, ``"fp16"`` (autocast on the model's
    device), ``"fp8_e4m3"``/``"fp8_e5m2"`` (emulated through the policy ``{"*": precision}``).
    A precision policy is always applied (possibly empty), so ``t.set_rules({"head": "fp32"})``
    toggles a layer live from any thread. Batches are moved to the model's device. A recording
    trainer counts its first step (`mpviz.cost.count`) and keeps it with the run
    (``counts.json.gz``): the apps price it for any policy on a named GPU.

        >>> t = Trainer(task="mlp", precision="bf16", record=False, seed=0)
        >>> first = t.step()["loss"]
        >>> for _ in range(30): last = t.step()["loss"]
        >>> last < first
        True
        >>> t.close()
    """

    def __init__(
        self,
        task: "str | Task | None" = None,
        precision: str = "fp32",
        batch_size: int | None = None,
        lr: float | None = None,
        seed: int = 0,
        run_dir: str | os.PathLike[str] | None = None,
        every: int | None = None,
        policy: Mapping[str, str] | Any | None = None,
        record: bool = True,
        meta: Mapping[str, Any] | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn | None = None,
        train_step: LossFn | None = None,
        data: Iterable[Any] | None = None,
        scaler: Any = None,
        eval_fn: Callable[[nn.Module, Any], Any] | None = None,
        eval_data: Iterable[Any] | None = None,
        grad_scaler: bool | None = None,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        runs_root: str | os.PathLike[str] | None = None,
        run_name: str | None = None,
    ) -> None:
        self.precision = canonical(precision)  # also accepts float16, mixed_bfloat16, ...
        parts = {"model": model, "optimizer": optimizer, "loss_fn": loss_fn, "data": data,
                 "eval_fn": eval_fn, "eval_data": eval_data}
        info = self._take_parts(task, parts, train_step, seed, batch_size, lr)
        first = next(iter(self.model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.scaler = self._amp(scaler, grad_scaler, init_scale, growth_interval)
        self._batches = _Batches()
        self._step = 0
        self._closed = False
        self._eval_model: nn.Module | None = None
        self._rng: tuple[Any, Any] | None = None   # this trainer's own RNG state (race lanes)
        self.evals: list[tuple[int, float]] = []   # (step, eval metric) from run_eval()
        self.recorder: Any = None
        self.policy_handle: Any = None
        self.counts: Any = None   # the step as `mpviz.cost.count` saw it, once the first step ran
        self._counts_from: "Trainer | None" = None   # a race lane: its main trainer counted it
        # step() and evaluate() may be called from different threads (a dashboard's worker and
        # its UI); the lock keeps evaluate() from reading weights halfway through an update.
        self._lock = threading.Lock()
        self._attach(policy, record, info, meta,
                     run_dir=run_dir, runs_root=runs_root, run_name=run_name, every=every)

    # ------------------------------------------------------------------ setting up
    def _take_parts(self, task: "str | Task | None", parts: dict[str, Any], train_step: LossFn | None,
                    seed: int, batch_size: int | None, lr: float | None) -> dict[str, Any]:
        """A demo task's parts, or the user's, checked; returns the run's meta so far."""
        info: dict[str, Any] = {}
        if parts["model"] is None:
            parts = demo_parts(task if task is not None else "digits", seed, batch_size, lr)
            info = parts.pop("meta")
            self.task: Task | None = get_task(info["task"])
            self.batch_size, self.lr = info["batch_size"], info["lr"]
        else:
            self.task = None
            self.batch_size, self.lr = batch_size, lr
            _check_parts(task, parts["model"], parts["optimizer"], parts["loss_fn"], train_step,
                         parts["data"], self.precision)
        self.seed = int(seed)
        self.model, self.optimizer, self.data = parts["model"], parts["optimizer"], parts["data"]
        self.loss_fn, self.train_step, self.eval_fn = parts["loss_fn"], train_step, parts["eval_fn"]
        self.eval_data = parts["eval_data"]
        return info

    def _amp(self, scaler: Any, grad_scaler: bool | None, init_scale: float,
             growth_interval: int) -> Any:
        """The GradScaler the trainer runs with (none of its own with a ``train_step``: the
        user's ``scaler``, if any, is recorded, never driven by us)."""
        if self.train_step is not None or scaler is not None:
            return scaler
        on = self.precision == "fp16" if grad_scaler is None else bool(grad_scaler)
        return (torch.amp.GradScaler(self.device.type, init_scale=float(init_scale),
                                     growth_interval=int(growth_interval))
                if on else None)

    def _attach(self, policy: Mapping[str, str] | Any | None, record: bool, info: dict[str, Any],
                meta: Mapping[str, Any] | None, run_dir: str | os.PathLike[str] | None, runs_root: str | os.PathLike[str] | None,
                run_name: str | None, every: int | None) -> None:
        """Apply the policy (fp8: a ``{"*": precision}`` rule), through a recorder if ``record``."""
        rules: dict[str, str] = {"*": self.precision} if self.precision.startswith("fp8") else {}
        if policy is not None:
            rules.update(getattr(policy, "rules", policy))  # a PrecisionPolicy or a plain mapping
        pol = PrecisionPolicy(rules)
        # Check names and precisions before a run directory is created for a policy that cannot apply.
        validate_rules(self.model, pol.rules, self.device.type, pol.precisions())
        if not record:
            self.policy_handle = apply_policy(self.model, pol, device_type=self.device.type)
            return
        import mpviz

        info = {**info, "precision": self.precision if self.owns_step else "train_step", **(meta or {})}
        if run_dir is None:
            stem = run_name or (f"{info.get('task') or type(self.model).__name__}-{info['precision']}-"
                                f"{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir = new_run_dir(runs_root if runs_root is not None else "runs", stem)
        info.setdefault("amp", self.amp_settings())
        self.recorder = mpviz.Recorder(self.model, optimizer=self.optimizer, scaler=self.scaler,
                                       run_dir=run_dir, every=every, policy=pol, meta=info)
        try:
            self.recorder.__enter__()
        except BaseException as e:
            self.recorder.__exit__(type(e), e, e.__traceback__)  # no hooks left, run marked failed
            raise
        self.policy_handle = self.recorder.policy

    # ------------------------------------------------------------------ reading
    @property
    def run(self) -> Any:
        """The live `mpviz.Run` being written, or None when not recording."""
        return None if self.recorder is None else self.recorder.run

    @property
    def run_dir(self) -> Path | None:
        """Where the run is written, or None when not recording."""
        return None if self.recorder is None else Path(self.recorder.run_dir)

    @property
    def steps_done(self) -> int:
        return self._step

    @property
    def owns_step(self) -> bool:
        """True when the trainer runs autocast, the GradScaler and the optimizer (``loss_fn``)."""
        return self.train_step is None

    def amp_settings(self) -> dict[str, Any]:
        """What AMP does here: ``autocast`` (precision name or None), ``grad_scaler`` (bool),
        ``init_scale``, ``growth_interval`` (of the GradScaler, when enabled), ``owner``."""
        s = compat.scaler_settings(self.scaler) or {"enabled": False}
        # torch's GradScaler has no get_init_scale(): read the attribute it keeps.
        init = s.get("init_scale", getattr(self.scaler, "_init_scale", None)) if s["enabled"] else None
        return {"owner": "lab" if self.owns_step else "train_step",
                "autocast": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self._autocast_dtype),
                "grad_scaler": bool(s["enabled"]), "init_scale": None if init is None else float(init),
                "growth_interval": s.get("growth_interval")}

    def flush(self) -> None:
        """Commit the rows of the steps taken so far, for a reader of the run."""
        if self.recorder is not None:
            self.recorder.flush()

    # ------------------------------------------------------------------ precision policy
    def precision_in_force(self) -> dict[str, tuple[str | None, str | None]]:
        """``{layer: (precision or None, rule or None)}`` the policy decides now (None: the
        layer follows the surrounding autocast)."""
        return self.policy_handle.effective() if self.policy_handle is not None else {}

    def set_rules(self, changes: Mapping[str, str | None]) -> None:
        """Set (or, with None, remove) policy rules from any thread: checked now (ValueError
        names the fix), applied at the model's next forward."""
        self.policy_handle.update(changes)

    # ------------------------------------------------------------------ stepping
    @property
    def _autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST.get(self.precision) if self.owns_step else None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def next_batch(self) -> Any:
        """The next batch of ``data`` (iterated again from the start when it ends)."""
        return self._batches.next(self.data)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with this trainer's own RNG state, if it has one (race lanes: same dropout masks)."""
        if self._rng is None:
            yield
            return
        outer = compat.get_rng_state(self.device)
        compat.set_rng_state(self._rng, self.device)
        try:
            yield
        finally:
            self._rng = compat.get_rng_state(self.device)
            compat.set_rng_state(outer, self.device)

    def own_rng(self) -> None:
        """From now on, step with a private copy of the current RNG state (torch's default
        generators): trainers given it at the same moment draw the same dropout masks."""
        self._rng = compat.get_rng_state(self.device)

    def step(self, batch: Any = None) -> dict[str, Any]:
        """One real training step on ``batch`` (default: the next one of ``data``); returns
        ``{"step": i, "loss": float}``."""
        with self._lock:
            return self._train_step(batch)

    def _train_step(self, batch: Any) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("this Trainer is closed; create a new one to keep training")
        if batch is None:
            batch = self.next_batch()
        if self.device.type != "cpu":
            batch = tree.map_tensors(lambda t: t.to(self.device, non_blocking=True), batch)
        self._batches.last = batch
        if self.recorder is not None and self._step == 0:
            self._count_step(batch)
        with self._own_rng():
            if self.train_step is not None:
                loss = self.train_step(self.model, batch)
            else:
                with self._autocast():
                    loss = self.loss_fn(self.model, batch)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        first = next(tree.tensors(batch), None)
        samples = len(first) if first is not None and first.dim() > 0 else None
        if self.recorder is not None:
            index = self.recorder.step(loss=loss, samples=samples)
        else:
            index = self._step
        self._step += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        return {"step": int(index), "loss": value}

    def _count_step(self, batch: Any) -> None:
        """Count one step on the first batch (`mpviz.cost.count`) and keep it with the run, so
        that the apps can predict its speed on a GPU without the model (`count` works on a
        hook-free copy: the recorder and the policy see nothing of it). A failure is recorded as
        the recorder's error (with a warning) and training goes on."""
        try:
            from mpviz.cost import count, save_counts

            lead = self._counts_from
            counts = lead.counts if lead is not None else None
            if counts is None:
                counts = count(self.model, batch, self.loss_fn if self.owns_step else None)
            save_counts(counts, self.run_dir)
            self.counts = counts
        except Exception as e:  # noqa: BLE001 - no estimate, but never a stopped training
            self.recorder.record_error("counts", RuntimeError(
                f"this model's step could not be counted, so the apps show no speed estimate for "
                f"it ({type(e).__name__}: {e})"), internal=False)

    def fork(self, precision: str, **kwargs: Any) -> "Trainer":
        """A race lane: a new Trainer over copies of this one's model and optimizer state (now),
        the same loss, data source and evaluation, at another ``precision``. ``kwargs`` go to
        `Trainer` (run_dir, runs_root, run_name, every, policy, record, meta, grad_scaler...)."""
        if not self.owns_step:
            raise ValueError("a race needs loss_fn: a train_step drives its own optimizer (and "
                             "scaler), which a copy of the model cannot share. Pass "
                             "loss_fn=lambda model, batch: ... to race precisions")
        with self._lock:
            model = copy_model(self.model)
            opt = copy_optimizer(self.optimizer, self.model, model)
        meta = {k: v for k, v in (self.recorder.run.meta if self.recorder else {}).items()
                if k in ("task", "batch_size", "lr", "seed", "app", "source")}
        lane = Trainer(precision=precision, model=model, optimizer=opt, loss_fn=self.loss_fn,
                       data=self.data, eval_fn=self.eval_fn, eval_data=self.eval_data,
                       seed=self.seed, **{"meta": meta, **kwargs})
        lane._rng = self._rng   # the same RNG state (if any): the same dropout masks
        lane._counts_from = self   # the same model: counted once
        return lane

    # ------------------------------------------------------------------ evaluation
    def _fp32_copy(self) -> nn.Module:
        """A hook-free copy of the model with the current weights (made once, then refreshed)."""
        if self._eval_model is None:
            self._eval_model = (self.task.model(self.seed) if self.task is not None
                                else copy_model(self.model))
        self._eval_model.load_state_dict(self.model.state_dict())
        return self._eval_model

    def evaluate(self) -> dict[str, float]:
        """A demo's held-out loss and metric of the current weights, computed in plain fp32.

        Runs on a hook-free copy of the model, so it neither shows up in the recording nor
        depends on the training precision: runs at different precisions compare on one scale.
        """
        if self.task is None:
            raise ValueError("evaluate() is for demo tasks; for your model pass eval_fn= and "
                             "eval_data= and call run_eval()")
        with self._lock:
            return self.task.evaluate(self._fp32_copy())

    @torch.no_grad()
    def run_eval(self) -> float | None:
        """``eval_fn(model, batch)`` averaged over ``eval_data`` (default: the next batch of
        ``data``), in fp32 on a hook-free copy of the current weights in eval mode; appended to
        ``self.evals`` as ``(steps done, value)``. None without an ``eval_fn``."""
        if self.eval_fn is None:
            return None
        with self._lock, self._own_rng():
            model = self._fp32_copy().eval()
            if self.eval_data is None and self._batches.last is None:
                return None     # nothing trained yet and no eval_data
            batches = list(self.eval_data) if self.eval_data is not None else [self._batches.last]
            values = [float(self.eval_fn(model, tree.map_tensors(lambda t: t.to(self.device), b)))
                      for b in batches]
            value = sum(values) / max(len(values), 1)
            self.evals.append((self._step, value))
            return value

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Finish the recording (or remove the policy); safe to call twice, from any thread."""
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        with self._lock:  # never in the middle of a step
            if self._closed:
                return
            self._closed = True
            if self.recorder is not None:
                # Marks the run "failed" when leaving a `with Trainer(...)` block by an exception.
                self.recorder.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
            elif self.policy_handle is not None:
                self.policy_handle.remove()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._finish(exc)

    def __repr__(self) -> str:
        what = f"task={self.task.name!r}" if self.task is not None else f"model={type(self.model).__name__}"
        return (f"Trainer({what}, precision={self.precision!r}, batch_size={self.batch_size}, "
                f"lr={self.lr}, seed={self.seed}, steps={self._step}, recording={self.recorder is not None})")


class _Batches:
    """Batches of ``data`` one after another, from the start again when it ends; ``last``: the
    last batch trained on."""

    def __init__(self) -> None:
        self._it: Iterator[Any] | None = None
        self.last: Any = None

    def next(self, data: Iterable[Any]) -> Any:
        if self._it is None:
            self._it = iter(data)
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(data)
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError("data yields no batches when iterated again: pass something that "
                                 "can be iterated more than once (a list, a DataLoader), not a "
                                 "generator") from None


def _check_parts(task: Any, model: Any, optimizer: Any, loss_fn: Any, train_step: Any, data: Any,
                 precision: str) -> None:
    """Errors that name the fix for a model passed with the wrong companions."""
    if task is not None:
        raise ValueError(f"pass either task={task!r} (a demo) or model=... (yours), not both")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is None:
        raise ValueError("with model=..., pass its optimizer=... too (the trainer steps it, and "
                         "the recorder counts a step per optimizer.step())")
    if (loss_fn is None) == (train_step is None):
        raise ValueError("pass exactly one of loss_fn(model, batch) -> loss (forward only; the "
                         "trainer does autocast, GradScaler, backward and the step) or "
                         "train_step(model, batch) -> loss (does backward and the step itself)")
    if data is None or not hasattr(data, "__iter__"):
        raise ValueError("pass data=...: any iterable of batches (a DataLoader, a list); it is "
                         "iterated again when it ends")
    if train_step is not None and precision != "fp32":
        raise ValueError(f"precision={precision!r} is for loss_fn: with train_step the autocast "
                         "and GradScaler are yours (per-layer precision still works: policy=...)")
