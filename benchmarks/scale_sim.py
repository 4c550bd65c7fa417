"""A distributed job recorded by mpviz, simulated on one machine: N gloo processes on the CPU.

Each rank trains three copies of the same small MLP under DDP (same seed, same data), a block of
steps at a time, in rotating order (A/B interleaved, in the same processes):

- ``plain``: DDP alone;
- ``all``: DDP + ``mpviz.Recorder(every=10)``: per-layer statistics on every rank;
- ``sample``: DDP + ``mpviz.Recorder(every=10, stats_ranks="sample:2")``: statistics on ranks 0
  and N-1, steps / losses / overflow flags (the DDP comm hook's local check) on every rank;
- ``flags``: DDP + ``mpviz.Recorder(stats_ranks=[])``: no per-layer statistics anywhere, only
  what every rank always records (steps, losses, overflow flags).

In DDP every step waits for the slowest rank (the all-reduce), so a rank's ratio is the job's.

A block's time includes flushing its recorder's writer, so the ratio is all of mpviz's work on
that rank. Overhead = median block time over median ``plain`` block time, per rank. Afterwards
the parent process measures each rank's store size and the time to open every rank's store and
read the merged tables (``load_run(run_dir)``: ``steps``, ``overflows``, ``layer_stats``).

    python benchmarks/scale_sim.py                    # 8 ranks, 300 steps per arm
    python benchmarks/scale_sim.py --ranks 4 --steps 100

Prints markdown tables (docs/SCALE.md has the figures and the extrapolation to 1,000 ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

BLOCK = 10  # steps per block: each recorded block holds one every=10 statistics step


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def _worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    import mpviz

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    arms = {name: nn.parallel.DistributedDataParallel(_model())
            for name in ("plain", "all", "sample", "flags")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in arms.items()}
    recs = {"all": mpviz.Recorder(arms["all"], optimizer=opts["all"], run_dir=f"{out}/all"),
            "sample": mpviz.Recorder(arms["sample"], optimizer=opts["sample"],
                                     run_dir=f"{out}/sample", stats_ranks="sample:2"),
            "flags": mpviz.Recorder(arms["flags"], optimizer=opts["flags"], run_dir=f"{out}/flags",
                                    stats_ranks=[])}
    for r in recs.values():
        r.attach()
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(64, 128, generator=g), torch.randint(0, 10, (64,), generator=g))
               for _ in range(BLOCK)]
    times: dict[str, list[float]] = {k: [] for k in arms}
    order = list(arms)
    n_blocks = steps // BLOCK + 2  # the first two rounds are warm-up
    for b in range(n_blocks):
        for name in order[b % len(order):] + order[:b % len(order)]:
            model, opt, rec = arms[name], opts[name], recs.get(name)
            dist.barrier()
            t0 = time.perf_counter()
            for x, y in batches:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                if rec is not None:
                    rec.step(loss=loss, samples=len(x))
            if rec is not None:
                rec.flush()
            if b >= 2:
                times[name].append((time.perf_counter() - t0) / BLOCK)
    for r in recs.values():
        r.close()
    Path(out, f"times{rank}.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_and_merge(run_dir: Path) -> tuple[float, float, int]:
    """Seconds to open every rank's store and read the merged tables; rank 0 alone; rows."""
    import mpviz

    def timed(rank: int | None) -> tuple[float, int]:
        t0 = time.perf_counter()
        run = mpviz.load_run(run_dir, rank=rank)
        n = len(run.steps) + len(run.overflows) + len(run.layer_stats)
        run.close()
        return time.perf_counter() - t0, n

    all_t = [timed(None) for _ in range(5)]
    one_t = [timed(0)[0] for _ in range(5)]
    return statistics.median(t for t, _ in all_t), statistics.median(one_t), all_t[0][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300, help="steps per arm (multiple of 10)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="mpviz-scale-"))
    t0 = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(args.ranks, _free_port(), str(out), args.steps), nprocs=args.ranks,
             join=True)
    wall = time.perf_counter() - t0
    times = [json.loads((out / f"times{r}.json").read_text()) for r in range(args.ranks)]
    print(f"{args.ranks} gloo ranks on {os.cpu_count()} CPU cores, {args.steps} steps per arm, "
          f"{wall:.0f} s wall; model: 7 Linear layers (~{sum(p.numel() for p in _model().parameters()) / 1e3:.0f}k "
          "parameters), batch 64, fp32\n")
    print("| rank | plain ms/step | all: ratio | sample:2: ratio | flags only: ratio "
          "| store KiB (all) | store KiB (sample:2) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    from mpviz.run import rank_stores

    sizes = {arm: {r: p.stat().st_size / 1024 for r, p in rank_stores(out / arm).items()}
             for arm in ("all", "sample")}
    ratios: dict[str, list[float]] = {"all": [], "sample": [], "flags": []}
    for r, t in enumerate(times):
        base = statistics.median(t["plain"])
        row = [f"{base * 1e3:.1f}"]
        for arm in ("all", "sample", "flags"):
            ratios[arm].append(statistics.median(t[arm]) / base)
            row.append(f"{ratios[arm][-1]:.2f}x")
        row += [f"{sizes['all'][r]:.0f}", f"{sizes['sample'][r]:.0f}"]
        print(f"| {r} | " + " | ".join(row) + " |")
    print(f"\nmedian overhead over ranks: all {statistics.median(ratios['all']):.2f}x, "
          f"sample:2 {statistics.median(ratios['sample']):.2f}x, "
          f"flags only {statistics.median(ratios['flags']):.2f}x")
    n_steps = args.steps + 2 * BLOCK
    print("\n| run | open + merge all ranks | rank 0 alone | rows read | per rank | KiB per rank per 1k steps (stats / no stats) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm in ("all", "sample"):
        t_all, t_one, rows = _open_and_merge(out / arm)
        s = sizes[arm]
        with_stats = [v for r, v in s.items() if arm == "all" or r in (0, args.ranks - 1)]
        without = [v for r, v in s.items() if arm == "sample" and r not in (0, args.ranks - 1)]
        per_k = (f"{statistics.median(with_stats) / n_steps * 1e3:.0f} / "
                 + (f"{statistics.median(without) / n_steps * 1e3:.0f}" if without else "-"))
        print(f"| {arm} | {t_all * 1e3:.0f} ms | {t_one * 1e3:.0f} ms | {rows} | "
              f"{t_all / args.ranks * 1e3:.1f} ms | {per_k} |")
    print(f"\nstores in {out} (delete when done)")


if __name__ == "__main__":
    main()
