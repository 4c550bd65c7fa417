"""What the diagnostics cost: interleaved A/B in one process, ratio to plain training.

Arms (same seed, data and weights; they take turns a block of steps at a time after a warm-up,
the block order rotating; the recorder's writer backlog is flushed after each recorded block
and charged to it, as in ``benchmarks/overhead.py``):

- ``plain``: the demo ``Trainer(record=False)``;
- ``defaults``: ``+ mpviz.Recorder(every=10)`` with its defaults: lost updates on only for
  bf16/fp16 weights (so off for these fp32-weight models), no shadow;
- ``shadow``: defaults ``+ shadow=[every Linear], shadow_every=50``;
- on a bf16-weight MLP (``model.to(torch.bfloat16)``): ``defaults`` (lost updates on, the
  default there) and ``no_lost_updates`` (``lost_updates=False``): the difference is their cost.

Plus the offline costs: ``mpviz.diagnose(run)``, ``mpviz.headroom(run)`` and ``mpviz.advise(run)``
on the recorded run (milliseconds; they read the store, training pays nothing).

    python benchmarks/diagnostics_cost.py            # mlp, digits and GPT-2 (fp32), ~5 min here
    python benchmarks/diagnostics_cost.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import mpviz  # noqa: E402
from mpviz.demos import Trainer, demo_parts  # noqa: E402
from overhead import gpt2_trainer  # noqa: E402


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) or
            type(m).__name__ == "Conv1D"]


def _trainer(task: str, precision: str, seed: int) -> Trainer:
    if task == "gpt2":
        return gpt2_trainer(precision, seed, record=False)
    if task == "mlp-bf16w":  # pure bf16 weights: the lost-update case
        parts = demo_parts("mlp", seed)
        model = parts["model"].to(torch.bfloat16)
        loss_fn = parts["loss_fn"]
        return Trainer(model=model, optimizer=parts["optimizer"], data=parts["data"],
                       loss_fn=lambda m, b: loss_fn(m, (b[0].bfloat16(), b[1])).float(),
                       precision="fp32", seed=seed, record=False)
    return Trainer(task=task, precision=precision, seed=seed, record=False)


def _arm(task: str, precision: str, seed: int, root: Path, name: str, **rec: Any) -> Trainer:
    t = _trainer(task, precision, seed)
    if name != "plain":
        if rec.get("shadow") == "linears":
            rec["shadow"] = _linears(t.model)
        t.recorder = mpviz.Recorder(t.model, optimizer=t.optimizer, scaler=t.scaler,
                                    run_dir=root / f"{task}-{name}", every=10, **rec).attach()
    return t


def measure(arms: dict[str, Callable[[], Trainer]], steps: int, block: int,
            warmup: int) -> dict[str, Any]:
    trainers = {a: make() for a, make in arms.items()}
    names = list(trainers)
    times: dict[str, list[float]] = {a: [] for a in names}
    try:
        for a in names:
            for _ in range(warmup):
                trainers[a].step()
            if trainers[a].recorder is not None:
                trainers[a].recorder.flush()
        for r in range(max(1, steps // block)):
            for a in names[r % len(names):] + names[:r % len(names)]:
                t = trainers[a]
                t0 = time.perf_counter()
                for _ in range(block):
                    t.step()
                if t.recorder is not None:
                    t.recorder.flush()
                times[a].append((time.perf_counter() - t0) / block)
        offline = {}
        for a in names:
            rec = trainers[a].recorder
            if rec is not None and a == "defaults":
                run = rec.run
                for fn in (mpviz.diagnose, mpviz.headroom, mpviz.advise):
                    t0 = time.perf_counter()
                    fn(run)
                    offline[fn.__name__ + "_ms"] = (time.perf_counter() - t0) * 1e3
    finally:
        for t in trainers.values():
            t.close()
            if t.policy_handle is not None:
                t.policy_handle.remove()
    med = {a: statistics.median(v) for a, v in times.items()}
    return {"plain_ms": med["plain"] * 1e3,
            **{f"ratio_{a}": med[a] / med["plain"] for a in names if a != "plain"}, **offline}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="mlp,digits,gpt2,mlp-bf16w")
    p.add_argument("--steps", type=int, default=300, help="timed steps per arm (default 300)")
    p.add_argument("--block", type=int, default=50)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--quick", action="store_true", help="60 steps per arm, blocks of 10")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.block, args.warmup = 60, 10, 5
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            prec, seed = "fp32", 0
            mk = lambda name, **kw: (lambda: _arm(task, prec, seed, root / str(len(rows)), name, **kw))  # noqa: E731
            if task == "mlp-bf16w":
                arms = {"plain": mk("plain"), "defaults": mk("defaults"),
                        "no_lost_updates": mk("no_lost_updates", lost_updates=False)}
            else:
                arms = {"plain": mk("plain"), "defaults": mk("defaults"),
                        "shadow": mk("shadow", shadow="linears", shadow_every=50)}
            r = {"task": task, "precision": "bf16 weights" if task == "mlp-bf16w" else prec,
                 **measure(arms, args.steps, args.block, args.warmup)}
            rows.append(r)
            print(r, flush=True)
    print("\n| task | weights | plain ms/step | defaults | + shadow (every Linear, every 50) "
          "| lost updates off | diagnose ms | headroom ms | advise ms |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    f = lambda r, k, fmt="{:.3f}x": fmt.format(r[k]) if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"| {r['task']} | {r['precision']} | {r['plain_ms']:.2f} | {f(r, 'ratio_defaults')} "
              f"| {f(r, 'ratio_shadow')} | {f(r, 'ratio_no_lost_updates')} "
              f"| {f(r, 'diagnose_ms', '{:.0f}')} | {f(r, 'headroom_ms', '{:.0f}')} "
              f"| {f(r, 'advise_ms', '{:.0f}')} |")
    print(f"\n{args.steps} timed steps per arm, blocks of {args.block}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
