"""What does recording cost next to the tools users already have? mpviz vs wandb.watch vs
TensorBoard histograms, on a Hugging Face GPT-2, in one process, A/B interleaved.

The model: ``GPT2LMHeadModel`` from a config (default 4 layers, width 128, 4 heads, 256 byte
tokens, windows of 64 bytes, batch 8; no download), Adam, next-byte loss on Python's own
standard-library source (:func:`overhead.gpt2_trainer`: the demo ``Trainer`` given the model).
Each arm is the same model, seed and data with one tool attached:

- ``plain``: the AMP loop, nothing attached;
- ``mpviz every=N`` (N = 1, 10: the default, 100): ``mpviz.Recorder(model, optimizer=opt,
  scaler=scaler, run_dir=..., every=N)`` and ``rec.step(loss=..., samples=...)`` after each step;
- ``wandb log_freq=N`` (N = 1, 100): ``run.watch(model, log="all", log_freq=N)`` and
  ``run.log({"loss": ...})`` each step, offline (``wandb.init(mode="offline")``; console capture,
  system metrics and git off, so only the watch and the log are measured);
- ``tensorboard every=N`` (N = 1, 100): ``SummaryWriter.add_histogram`` of every parameter
  tensor and of its gradient (after ``optimizer.step()``, before ``zero_grad``) every N steps,
  and ``add_scalar("loss")`` every step.

Arms take turns a block of steps at a time (the order rotates each round) after an untimed
warm-up. After each block the tool's backlog is flushed (mpviz: ``rec.flush()``; TensorBoard:
``writer.flush()``) and that time is charged to the block. wandb hands its records to its own
service process (``wandb-core``), which writes them; that process's work is not charged except
where it competes for the same cores. ``ms/step`` is the timed steps' total time / their number
(a median of steps would hide the one step in 100 that logs); ``ratio`` is that over plain's.
Each round also gives a ratio (an arm's block / plain's block in that round); their median is
robust to a burst of load from other processes, but only for arms that record in every block
(every=1, every=10), not every=100.
The timed steps per arm are a multiple of 100, so every schedule gets exactly its share.

    python benchmarks/peers.py                       # bf16 autocast and fp32, ~10 min on 2 cores
    python benchmarks/peers.py --precisions bf16 --rounds 20
    python benchmarks/peers.py --quick               # smoke run: tiny model, 20 steps per arm

Prints a markdown table; writes JSON to ``benchmarks/results_peers.json`` (``--out`` elsewhere;
``--quick`` writes only where ``--out`` says).
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

import mpviz  # noqa: E402
from overhead import gpt2_trainer  # noqa: E402

RESULTS = Path(__file__).with_name("results_peers.json")
SIZE = {"n_layer": 4, "n_embd": 128, "n_head": 4, "seq": 64, "batch": 8}
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "seq": 16, "batch": 4}

MPVIZ_RECORDS = ("every step: loss, loss scale, skipped steps, step time, samples/s, inf/nan events "
                 "with the layer that produced them (forward replay), per-layer dtypes; every N "
                 "steps, per module: activation, gradient (unscaled) and weight norm, max|x|, "
                 "min|x|>0, zeros, non-finite, fp16/bf16 under/overflow fractions, log2 histogram")
PEER_RECORDS = "loss; histogram (64 bins) of every parameter tensor and its gradient every N steps"
TB_RECORDS = "loss; histogram of every parameter tensor and its gradient every N steps"


@dataclass
class Arm:
    """One tool attached to one trainer: what runs after each step, what flushes, what closes."""

    name: str
    tool: str
    every: int | None
    records: str
    trainer: Any
    after: Callable[[dict[str, Any]], None] = lambda out: None
    flush: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    out_dir: Path | None = None
    block_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)

    def step(self) -> None:
        self.after(self.trainer.step())


def _plain(precision: str, seed: int, size: dict[str, int]) -> Any:
    t = gpt2_trainer(precision, seed, record=False, **size)
    t.policy_handle.remove()  # nothing of mpviz attached
    return t


def make_arms(precision: str, seed: int, size: dict[str, int], root: Path) -> list[Arm]:
    arms = [Arm("plain", "plain", None, "loss", _plain(precision, seed, size))]
    batch = size["batch"]
    for every in (1, 10, 100):
        t = _plain(precision, seed, size)
        out = root / f"mpviz{every}"
        rec = mpviz.Recorder(t.model, optimizer=t.optimizer, scaler=t.scaler, run_dir=out,
                             every=every).attach()
        arms.append(Arm(f"mpviz every={every}", "mpviz",
                        every, MPVIZ_RECORDS, t,
                        after=lambda o, rec=rec: rec.step(loss=o["loss"], samples=batch),
                        flush=rec.flush, close=rec.close, out_dir=out))

    import wandb

    wb_dir = root / "wandb"
    wb_dir.mkdir()
    run = wandb.init(mode="offline", dir=wb_dir, project="mpviz-peers",
                     settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True,
                                             save_code=False, silent=True))
    for every in (1, 100):
        t = _plain(precision, seed, size)
        run.watch(t.model, log="all", log_freq=every)
        key = f"loss{every}"
        arms.append(Arm(f"wandb.watch log_freq={every}", "wandb", every, PEER_RECORDS, t,
                        after=lambda o, key=key: run.log({key: o["loss"]}),
                        close=run.finish if every == 100 else (lambda: None), out_dir=wb_dir))

    from torch.utils.tensorboard import SummaryWriter

    for every in (1, 100):
        t = _plain(precision, seed, size)
        out = root / f"tb{every}"
        writer = SummaryWriter(log_dir=str(out))
        arms.append(Arm(f"tensorboard every={every}", "tensorboard", every, TB_RECORDS, t,
                        after=_tb_after(t, writer, every), flush=writer.flush, close=writer.close,
                        out_dir=out))
    return arms


def _tb_after(t: Any, writer: Any, every: int) -> Callable[[dict[str, Any]], None]:
    """Histograms in the optimizer's step post-hook (gradients still there), loss after it."""
    params = list(t.model.named_parameters())
    count = [0]

    def histograms(optimizer: Any, args: Any, kwargs: Any) -> None:
        if count[0] % every == 0:
            for name, p in params:
                writer.add_histogram(f"weight/{name}", p.detach(), count[0])
                if p.grad is not None:
                    writer.add_histogram(f"grad/{name}", p.grad, count[0])

    def after(out: dict[str, Any]) -> None:
        writer.add_scalar("loss", out["loss"], count[0])
        count[0] += 1

    t.optimizer.register_step_post_hook(histograms)
    return after


def _dir_bytes(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(precision: str, rounds: int, block: int, warmup: int, seed: int,
            size: dict[str, int], root: Path) -> list[dict[str, Any]]:
    arms = make_arms(precision, seed, size, root)
    try:
        for arm in arms:
            for _ in range(warmup):
                arm.step()
            arm.flush()
        for r in range(rounds):
            k = r % len(arms)
            for arm in arms[k:] + arms[:k]:  # rotate who goes first
                t0 = time.perf_counter()
                for _ in range(block):
                    arm.step()
                t1 = time.perf_counter()
                arm.flush()
                arm.block_s.append(time.perf_counter() - t0)
                arm.train_s.append(t1 - t0)
    finally:
        for arm in arms:
            arm.close()
            arm.trainer.close()
    steps = rounds * block
    plain = sum(arms[0].block_s)
    rows = []
    for arm in arms:
        per_round = [a / p for a, p in zip(arm.block_s, arms[0].block_s)]
        rows.append({
            "precision": precision, "arm": arm.name, "tool": arm.tool, "every": arm.every,
            "ms_per_step": sum(arm.block_s) / steps * 1e3,
            "train_thread_ms_per_step": sum(arm.train_s) / steps * 1e3,
            "ratio": sum(arm.block_s) / plain,
            "round_ratio_median": statistics.median(per_round),
            "round_ratio_min": min(per_round), "round_ratio_max": max(per_round),
            "round_ratios": per_round,
            "disk_bytes": _dir_bytes(arm.out_dir) if arm.tool != "wandb" else None,
            "records": arm.records, "timed_steps": steps,
        })
    wandb_bytes = _dir_bytes(root / "wandb")
    for row in rows:
        if row["tool"] == "wandb":
            row["disk_bytes"] = wandb_bytes  # one offline run holds both wandb arms
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| precision | arm | ms/step | ratio to plain | per-round ratio: median (range) "
             "| same-frequency peer / mpviz | written |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mp = next((m for m in rows if m["tool"] == "mpviz" and m["every"] == r["every"]
                   and m["precision"] == r["precision"]), None)
        vs = (f"{r['ms_per_step'] / mp['ms_per_step']:.2f}x"
              if mp is not None and r["tool"] in ("wandb", "tensorboard") else "")
        size = "" if r["disk_bytes"] is None else f"{r['disk_bytes'] / 1e6:.1f} MB"
        if r["tool"] == "wandb":
            size += " (both wandb arms)"
        lines.append(f"| {r['precision']} | {r['arm']} | {r['ms_per_step']:.1f} | {r['ratio']:.2f}x "
                     f"| {r['round_ratio_median']:.2f}x ({r['round_ratio_min']:.2f}–{r['round_ratio_max']:.2f}) "
                     f"| {vs} | {size} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--rounds", type=int, default=10, help="turns per arm (default 10)")
    p.add_argument("--block", type=int, default=10, help="steps per turn (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per arm first (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, recorded in the JSON)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny model, 2 rounds of 10 steps, warm-up 2 (the every=100 "
                        "arms then never log: not a measurement)")
    p.add_argument("--out", default=None, help=f"JSON file (default {RESULTS.name}; --quick: none)")
    args = p.parse_args(argv)
    size = TINY if args.quick else SIZE
    if args.quick:
        args.rounds, args.block, args.warmup = 2, 10, 2
    elif (args.rounds * args.block) % 100:
        p.error(f"--rounds x --block must be a multiple of 100 (every schedule's share), "
                f"got {args.rounds} x {args.block}")
    out = args.out if args.out is not None else (None if args.quick else str(RESULTS))
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="wandb")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mpviz-peers-") as tmp:
        for prec in [q.strip() for q in args.precisions.split(",") if q.strip()]:
            new = measure(prec, args.rounds, args.block, args.warmup, args.seed, size,
                          Path(tmp) / prec)
            rows += new
            for r in new:
                print(f"{prec:5s} {r['arm']:28s} {r['ms_per_step']:8.1f} ms/step  {r['ratio']:.2f}x",
                      file=sys.stderr, flush=True)
    print(markdown(rows))
    print("\nrecords:\n" + "\n".join(f"- {tool}: {rec}" for tool, rec in
                                     (("mpviz", MPVIZ_RECORDS), ("wandb.watch", PEER_RECORDS),
                                      ("tensorboard", TB_RECORDS))))
    import wandb

    result = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "wandb": wandb.__version__, "python": platform.python_version(),
                    "note": "shared with other jobs while measuring: read ratios, not ms"},
        "config": {"model": size, "rounds": args.rounds, "block": args.block,
                   "warmup": args.warmup, "seed": args.seed,
                   "ratio": "total time of an arm's timed blocks (each with its flush) / plain's"},
        "results": rows,
    }
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
