"""What the diagnostics cost: interleaved A/B in one process, ratio to plain training.

Arms (same seed, data and weights; they take turns a block of steps at a time after a warm-up,
the block order rotating; the recorder's writer backlog is flushed after each recorded block
and charged to it, as in ``benchmarks/overhead.py``):

- ``plain``: the demo ``Trainer(record=False)``;
- ``defaults``: ``+ mpviz.Recorder(...)`` with its defaults: statistics at most every 10 steps
  within a budget of 3% of the training time (``mpviz/recording/schedule.py``), lost updates on
  only for bf16/fp16 weights (so off for these fp32-weight models), no shadow;
- ``every10``: ``+ mpviz.Recorder(every=10)``: statistics on every 10th step whatever they cost
  (the default before the budget);
- ``budget2``: the default schedule with ``stats_budget=0.02`` (not run unless asked for);
- ``shadow``: ``every10 + shadow=[every Linear], shadow_every=50``;
- on a bf16-weight MLP (``model.to(torch.bfloat16)``): ``defaults`` (lost updates on, the
  default there) and ``no_lost_updates`` (``lost_updates=False``): the difference is their cost.

Plus the offline costs: ``mpviz.diagnose(run)``, ``mpviz.headroom(run)`` and ``mpviz.advise(run)``
on the recorded run (milliseconds; they read the store, training pays nothing).

    python benchmarks/diagnostics_cost.py            # mlp, digits and GPT-2 (fp32), ~5 min here
    python benchmarks/diagnostics_cost.py --quick    # a smoke run
    python benchmarks/diagnostics_cost.py --tasks mlp,digits,text --precisions fp32,fp16 \
        --arms defaults,every10 --repeats 3          # the issue's cost target, demo tasks

Two ratios per arm: wall-clock (what training feels) and CPU time of the whole process (training
and writer threads; less sensitive to other processes on a shared machine, but blind to waiting).
Each measurement prints the machine's load average (``os.getloadavg``) before and after it:
on a shared machine read the ratios, not the milliseconds. ``--repeats`` runs each measurement
again (fresh trainers) and the table gives the range.
"""
from __future__ import annotations

import argparse
import os
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
                                    run_dir=root / f"{task}-{name}", **rec).attach()
    return t


def measure(arms: dict[str, Callable[[], Trainer]], steps: int, block: int,
            warmup: int) -> dict[str, Any]:
    trainers = {a: make() for a, make in arms.items()}
    names = list(trainers)
    times: dict[str, list[float]] = {a: [] for a in names}
    cpu: dict[str, list[float]] = {a: [] for a in names}  # process CPU time (all threads)
    try:
        for a in names:
            for _ in range(warmup):
                trainers[a].step()
            if trainers[a].recorder is not None:
                trainers[a].recorder.flush()
        for r in range(max(1, steps // block)):
            for a in names[r % len(names):] + names[:r % len(names)]:
                t = trainers[a]
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(block):
                    t.step()
                if t.recorder is not None:
                    t.recorder.flush()
                times[a].append((time.perf_counter() - t0) / block)
                cpu[a].append((time.process_time() - c0) / block)
        offline: dict[str, Any] = {}
        for a in names:
            rec = trainers[a].recorder
            if rec is not None and a == "defaults" and rec._schedule.budget is not None:
                offline["stats_steps"] = rec._schedule.taken
                offline["steps"] = rec._schedule.steps
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
    mcpu = {a: statistics.median(v) for a, v in cpu.items()}
    return {"plain_ms": med["plain"] * 1e3,
            **{f"ratio_{a}": med[a] / med["plain"] for a in names if a != "plain"},
            **{f"cpu_ratio_{a}": mcpu[a] / mcpu["plain"] for a in names if a != "plain"},
            **offline}


ARMS = {"defaults": {}, "every10": {"every": 10}, "budget2": {"stats_budget": 0.02},
        "shadow": {"every": 10, "shadow": "linears", "shadow_every": 50}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="mlp,digits,gpt2,mlp-bf16w")
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated: fp32, fp16 (+ GradScaler), bf16 (default fp32; "
                        "mlp-bf16w is always its own)")
    p.add_argument("--arms", default="defaults,every10,shadow",
                   help=f"besides plain, from {', '.join(ARMS)} (default defaults,every10,shadow)")
    p.add_argument("--repeats", type=int, default=1, help="measure each this many times")
    p.add_argument("--steps", type=int, default=300, help="timed steps per arm (default 300)")
    p.add_argument("--block", type=int, default=50)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--quick", action="store_true", help="60 steps per arm, blocks of 10")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.block, args.warmup = 60, 10, 5
    torch.set_num_threads(args.threads)
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            precs = ["fp32"] if task in ("mlp-bf16w",) else [
                q.strip() for q in args.precisions.split(",") if q.strip()]
            for prec in precs:
                for rep in range(args.repeats):
                    mk = lambda name, **kw: (lambda: _arm(task, prec, rep, root / str(len(rows)), name, **kw))  # noqa: E731
                    if task == "mlp-bf16w":
                        arms = {"plain": mk("plain"), "defaults": mk("defaults"),
                                "no_lost_updates": mk("no_lost_updates", lost_updates=False)}
                    else:
                        arms = {"plain": mk("plain"), **{a: mk(a, **ARMS[a]) for a in wanted}}
                    # The arms are created in a rotating order: on GPT-2 the arm created right
                    # after plain measured up to ~10% slower than the same arm created later.
                    names = list(arms)
                    arms = {a: arms[a] for a in names[rep % len(names):] + names[:rep % len(names)]}
                    load0 = os.getloadavg()[0]
                    r = {"task": task, "precision": "bf16 weights" if task == "mlp-bf16w" else prec,
                         "repeat": rep, **measure(arms, args.steps, args.block, args.warmup),
                         "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"}
                    rows.append(r)
                    print(r, flush=True)
    cols = [c for c in ["defaults", "every10", "budget2", "shadow", "no_lost_updates"]
            if any(f"ratio_{c}" in r for r in rows)]
    print("\n| task | precision | plain ms/step | " + " | ".join(f"{c}: wall / CPU" for c in cols)
          + " | statistics steps (defaults) | load | diagnose ms | headroom ms | advise ms |\n"
          + "|---|---|---:|" + "---:|" * len(cols) + "---:|---|---:|---:|---:|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["precision"]), []).append(r)

    def rng(rs: list[dict[str, Any]], k: str, fmt: str = "{:.2f}", unit: str = "x") -> str:
        v = [r[k] for r in rs if k in r]
        if not v:
            return "-"
        lo, hi = fmt.format(min(v)), fmt.format(max(v))
        return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"

    for (task, prec), rs in groups.items():
        taken = ", ".join(f"{r['stats_steps']}/{r['steps']}" for r in rs if "stats_steps" in r) or "-"
        print(f"| {task} | {prec} | {rng(rs, 'plain_ms', unit='')} | "
              + " | ".join(f"{rng(rs, f'ratio_{c}')} / {rng(rs, f'cpu_ratio_{c}')}" for c in cols)
              + f" | {taken} | {', '.join(r['load'] for r in rs)} "
              f"| {rng(rs, 'diagnose_ms', '{:.0f}', '')} | {rng(rs, 'headroom_ms', '{:.0f}', '')} "
              f"| {rng(rs, 'advise_ms', '{:.0f}', '')} |")
    print(f"\n{args.steps} timed steps per arm, blocks of {args.block}, {args.repeats} repeat(s) "
          f"(seeds 0..{args.repeats - 1}), torch threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, load = 1-min load average before-after; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
