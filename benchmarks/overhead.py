"""How much does recording slow training? Interleaved A/B on the demo tasks, in one process.

For each task and precision, four trainers with the same seed (so the same data and weights)
take turns, a block of steps at a time, after a warm-up:

- ``bare``: the demo loop with nothing attached (its empty precision policy removed);
- ``plain``: ``Trainer(record=False)`` -- the loop plus an empty precision policy;
- ``recdef``: ``Trainer(record=True, every=None)`` -- the recorder's default schedule:
  statistics at most every 10 steps, within 3% of the training time
  (``mpviz/recording/schedule.py``);
- ``rec10``: ``Trainer(record=True, every=10)`` -- statistics on every 10th step;
- ``rec1``: ``Trainer(record=True, every=1)`` -- every statistic on every step.

Steps are ``Trainer.step()`` (data, forward, backward, optimizer, recorder); each block of
steps gives one sample, its mean step time; the ratio is median(recorded) / median(plain) over
blocks. Blocks are a multiple of 10 steps, so each holds its share of every=10 statistics steps.
Interleaving and rotating the block order keep slow drifts of a shared machine (other processes,
thermal, caches) out of the ratio.

The recorder's writer thread finishes the statistics and writes the store. After each recorded
block its backlog is flushed and that time is charged to the block, so no arm runs while another
arm's writer works. Two ratios come out:
- ``ratio_*``: block time + its flush -- all the recorder's work, as if done on one core;
- ``train_ratio_*``: block time alone -- what the training thread pays.

Besides the demo tasks, ``gpt2``: a Hugging Face ``GPT2LMHeadModel`` built from a small config
(2 layers, width 64, 2 heads, bytes as tokens: vocabulary 256), trained like the ``text`` demo on
the bytes of Python's own standard-library source, with the same four arms (:func:`gpt2_trainer`,
a demo ``Trainer`` given the model; ``benchmarks/peers.py`` uses it too). No weights are downloaded.

    python benchmarks/overhead.py                  # all tasks, fp32 and fp16 + GradScaler
    python benchmarks/overhead.py --quick          # a smoke run (fewer steps)
    python benchmarks/overhead.py --tasks gpt2     # the GPT-2 model alone
    python benchmarks/overhead.py --tasks digits,mlp --precisions fp32,bf16,fp16 --steps 600

Prints a markdown table. A full run (every task, fp32 and fp16, not ``--quick``) writes
``benchmarks/results.json``; a partial one writes only where ``--out`` says, so the published
figures are never replaced by a subset.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import mpviz
from mpviz.demos import TASKS, Trainer, stdlib_text

ARMS = ("bare", "plain", "recdef", "rec10", "rec1")
BENCH_TASKS = (*TASKS, "gpt2")
DEFAULT_PRECISIONS = "fp32,fp16"
RESULTS = Path(__file__).with_name("results.json")


def _byte_windows(seq: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of ``seq`` bytes of the stdlib's source; targets shifted by one."""
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq + 1)
    while True:
        win = data[torch.randint(0, len(data) - seq - 1, (batch,), generator=g)[:, None] + offsets]
        yield win[:, :-1], win[:, 1:]


def _next_byte_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def gpt2_trainer(precision: str, seed: int = 0, record: bool = False, every: int | None = 10,
                 run_dir: Path | None = None, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                 seq: int = 32, batch: int = 16, vocab: int = 256, device: str = "cpu") -> Trainer:
    """A :class:`mpviz.demos.Trainer` around a Hugging Face ``GPT2LMHeadModel`` built from a
    config (no download; bytes as tokens; ``vocab`` >= 256 sets the output layer's width),
    trained with Adam (lr 1e-3) on byte windows of the stdlib's source, next-byte targets.
    ``precision``: fp32, bf16 or fp16 (the Trainer's autocast, + GradScaler for fp16). The
    defaults are the ``gpt2`` task's size.
    Like every Trainer, it applies an empty precision policy (``policy_handle``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if vocab < 256:
        raise ValueError(f"vocab must be >= 256 (the tokens are bytes), got {vocab}")
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                        n_positions=max(64, seq), bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialised where it trains
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).train()
    return Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                   loss_fn=_next_byte_loss, data=_byte_windows(seq, batch, seed),
                   precision=precision, seed=seed, record=record, every=every, run_dir=run_dir,
                   meta={"task": "gpt2"})


def _make(arm: str, task: str, precision: str, seed: int, root: Path) -> Trainer:
    record = arm not in ("bare", "plain")
    every = {"rec1": 1, "recdef": None}.get(arm, 10)
    run_dir = root / f"{task}-{precision}-{arm}"
    if task == "gpt2":
        t = gpt2_trainer(precision, seed, record=record, every=every, run_dir=run_dir)
    else:
        t = Trainer(task=task, precision=precision, seed=seed, record=record, every=every,
                    run_dir=run_dir if record else None)
    if arm == "bare" and t.policy_handle is not None:
        t.policy_handle.remove()  # a training loop with nothing of mpviz attached
    return t


def measure(task: str, precision: str, steps: int, block: int, warmup: int, seed: int,
            root: Path) -> dict[str, Any]:
    """Median step time (seconds) of each arm over ``steps`` interleaved steps per arm."""
    trainers = {arm: _make(arm, task, precision, seed, root) for arm in ARMS}
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    train: dict[str, list[float]] = {arm: [] for arm in ARMS}
    try:
        for arm in ARMS:
            for _ in range(warmup):
                trainers[arm].step()
            if trainers[arm].recorder is not None:
                trainers[arm].recorder.flush()
        rounds = max(1, steps // block)
        for r in range(rounds):
            order = ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]  # rotate who goes first
            for arm in order:
                t = trainers[arm]
                t0 = time.perf_counter()
                for _ in range(block):
                    t.step()
                t1 = time.perf_counter()
                if t.recorder is not None:
                    t.recorder.flush()  # this block's rows and statistics, finished and written
                # One sample per block (its mean step time): with every=10 a block of 10k steps
                # holds exactly k statistics steps, which a per-step median would ignore.
                times[arm].append((time.perf_counter() - t0) / block)
                train[arm].append((t1 - t0) / block)
    finally:
        for t in trainers.values():
            t.close()
    med = {arm: statistics.median(ts) for arm, ts in times.items()}
    med_train = {arm: statistics.median(ts) for arm, ts in train.items()}
    return {
        "task": task, "precision": precision, "steps_per_arm": len(times["plain"]) * block,
        **{f"{arm}_ms": med[arm] * 1e3 for arm in ARMS},
        "ratio_default": med["recdef"] / med["plain"],
        "train_ratio_default": med_train["recdef"] / med["plain"],
        "ratio_every10": med["rec10"] / med["plain"],
        "ratio_every1": med["rec1"] / med["plain"],
        "train_ratio_every10": med_train["rec10"] / med["plain"],
        "train_ratio_every1": med_train["rec1"] / med["plain"],
        "ratio_every10_vs_bare": med["rec10"] / med["bare"],
        "ratio_every1_vs_bare": med["rec1"] / med["bare"],
        "policy_ratio": med["plain"] / med["bare"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| task | precision | plain ms | default | default, training thread | every=10 "
            "| every=10, training thread | every=1 | every=1, training thread |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['task']} | {r['precision']} | {r['plain_ms']:.2f} "
                     f"| {r['ratio_default']:.3f}x | {r['train_ratio_default']:.3f}x "
                     f"| {r['ratio_every10']:.3f}x | {r['train_ratio_every10']:.3f}x "
                     f"| {r['ratio_every1']:.3f}x | {r['train_ratio_every1']:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(BENCH_TASKS),
                   help=f"comma-separated, from {', '.join(BENCH_TASKS)} (default all)")
    p.add_argument("--precisions", default=DEFAULT_PRECISIONS,
                   help=f"comma-separated (default {DEFAULT_PRECISIONS})")
    p.add_argument("--steps", type=int, default=600, help="timed steps per arm (default 600)")
    p.add_argument("--block", type=int, default=50, help="steps per turn (default 50)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per arm first (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, recorded in the JSON)")
    p.add_argument("--quick", action="store_true", help="100 steps per arm, blocks of 10, warm-up 10")
    p.add_argument("--out", default=None,
                   help=f"where to write the JSON (default: {RESULTS.name} for a full run, "
                        "nowhere for a partial one)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.block, args.warmup = 100, 10, 10
    if args.block < 10 or args.block % 10:
        p.error(f"--block must be a multiple of 10 (the default schedule's period), got {args.block}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in BENCH_TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(BENCH_TASKS)}")
    precisions = [q.strip() for q in args.precisions.split(",") if q.strip()]
    full = (set(tasks) == set(BENCH_TASKS) and set(precisions) == set(DEFAULT_PRECISIONS.split(","))
            and not args.quick)
    out = args.out if args.out is not None else (str(RESULTS) if full else None)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="mpviz-bench-") as tmp:
        for task in tasks:
            for prec in precisions:
                r = measure(task, prec, args.steps, args.block, args.warmup, args.seed, Path(tmp))
                rows.append(r)
                print(f"{task:6s} {prec:8s} plain {r['plain_ms']:7.2f} ms  default {r['ratio_default']:.3f}x "
                      f"every=10 {r['ratio_every10']:.3f}x "
                      f"(training thread {r['train_ratio_every10']:.3f}x)  every=1 {r['ratio_every1']:.3f}x "
                      f"(training thread {r['train_ratio_every1']:.3f}x)", file=sys.stderr, flush=True)
    print(markdown(rows))
    result = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "config": {"steps_per_arm": args.steps, "block": args.block, "warmup": args.warmup, "seed": args.seed,
                   "ratio": "median step time recorded / plain (Trainer(record=False), same seed); "
                             "ratio_*: block + writer flush, train_ratio_*: block alone"},
        "results": rows,
    }
    if out is None:
        print(f"\na partial run: {RESULTS.name} left as it was (--out FILE to keep these results)",
              file=sys.stderr)
    else:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
