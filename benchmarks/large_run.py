"""A long run: how big is its store, how fast does it open, and what does thinning save?

Writes a synthetic run of ``--steps`` steps x ``--layers`` layers with per-layer statistics every
``--every`` steps (default 100,000 x 200, every 10: 6 M ``layer_stats`` rows and as many
histograms) with the store's own writer (:class:`mpviz.store.RunWriter`, the rows the recorder
writes: steps, layer_stats, histograms, dtypes, an overflow event and a skipped step every 2,000
steps). Then, ``--repeat`` times each, it times:

- ``load_run`` + ``run.steps`` (all steps into pandas);
- the explorer's first draw: ``mpviz.dashboard.explorer_app(run_dir=...)`` constructed headless
  (no browser, no Voila: the kernel side only; it reads, downsamples and updates the figure);
- when the explorer's Diagnosis panel shows (from the same start: it is computed after the
  first draw, on a thread of its own);
- a range change (``ex.set_range``) to a 10,000-step window and back to the whole run;
- ``mpviz.diagnose(run)`` on its own;

and finally ``mpviz.thin(run_dir, keep_every=100, before_step=90% of the steps)``: size before and
after, and the explorer's first draw again.

    python benchmarks/large_run.py                      # 100k x 200 (a few minutes, ~1-2 GB)
    python benchmarks/large_run.py --steps 10000 --layers 50 --keep runs/large
    python benchmarks/large_run.py --run runs/large     # measure a run already written (no thin)

Absolute times: they depend on the machine and on what else runs on it (it prints the load
average before each measurement); the store size does not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mpviz.formats import N_BINS
from mpviz.store import COLUMNS, RunWriter, db_path, pack_hists

TENSORS = ("activation", "grad", "weight")


def layer_names(n: int) -> list[tuple]:
    """``layers`` rows of a transformer-like model: the model itself, then blocks of 10 modules."""
    kinds = ("attn.q", "attn.k", "attn.v", "attn.o", "ln1", "mlp.fc1", "mlp.act", "mlp.fc2",
             "ln2", "drop")
    rows = [(0, "", "Model", 0, "float32", 0, 0)]
    for i in range(1, n):
        name = f"blocks.{(i - 1) // 10}.{kinds[(i - 1) % 10]}"
        rows.append((i, name, "Linear", 4096, "float32", name.count(".") + 1, 1))
    return rows


def write_run(run_dir: Path, steps: int, layers: int, every: int) -> float:
    """Write the synthetic run; returns seconds taken."""
    rng = np.random.default_rng(0)
    meta = {"model": "Synthetic", "device": "cpu", "every": every, "status": "running",
            "autocast_dtype": "float16", "scaler": {"enabled": True}, "start_time": time.time(),
            "synthetic": "benchmarks/large_run.py"}
    t0 = time.perf_counter()
    w = RunWriter(db_path(run_dir), meta, layer_names(layers), flush_every_s=2.0)
    # log2 histograms with ~30 nonzero bins, as real tensors give; a few templates reused
    hists = np.zeros((8 * layers * 3, N_BINS), dtype=np.int64)
    for k in range(len(hists)):
        lo = int(rng.integers(90, 130))
        hists[k, lo:lo + 30] = rng.integers(1, 500, 30)
    blobs = pack_hists(hists)
    w.put("dtypes", [(0, i, t, d) for i in range(layers)
                     for t, d in (("input", "float32"), ("output", "float16"),
                                  ("weight", "float32"), ("grad", "float32"))])
    scale = 65536.0
    n_over = len(COLUMNS["overflows"])  # later columns (e.g. a rank's `origin`): 1
    for s0 in range(0, steps, 1000):
        rows, stats, hrows, over = [], [], [], []
        for s in range(s0, min(s0 + 1000, steps)):
            skipped = s > 0 and s % 2000 == 0
            after = scale / 2 if skipped else scale
            rows.append((s, 2.0 + float(np.sin(s / 500)), scale, after, int(skipped),
                         int(skipped), 0.05, 32, 640.0, time.time()))
            if skipped:
                over.append(((s, 5, "grad", "backward", 1, 12, 1) + (1,) * 8)[:n_over])
            scale = after * (2 if s % 2000 == 1999 else 1)
            if s % every == 0:
                vals = rng.random((layers * 3, 3))
                base = (s // every) % 8 * layers * 3
                for j in range(layers * 3):
                    layer, t = divmod(j, 3)
                    stats.append((s, layer, TENSORS[t], "float16", float(vals[j, 0]),
                                  float(vals[j, 1]), 1e-6, 3, 0, 10, 0, 0, 0, 4096))
                    lo, blob = blobs[base + j]
                    hrows.append((s, layer, TENSORS[t], lo, blob))
        w.put("steps", rows)
        w.put("layer_stats", stats)
        w.put("histograms", hrows)
        w.put("overflows", over)
        if s0 % 10_000 == 0:
            w.flush()  # bound the rows waiting in memory
            print(f"  written {s0:,} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    w.set_meta(status="finished", end_time=time.time())
    w.close()
    if w.errors:
        raise RuntimeError(f"the store writer failed: {w.errors!r}")
    return time.perf_counter() - t0


def size_mb(run_dir: Path) -> float:
    return sum(p.stat().st_size for p in run_dir.glob("run*.db*")) / 2 ** 20


def breakdown_mb(run_dir: Path) -> dict[str, float]:
    """MB per table and index (SQLite's dbstat), largest first."""
    import sqlite3

    con = sqlite3.connect(f"file:{db_path(run_dir)}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name "
                           "ORDER BY 2 DESC").fetchall()
    except sqlite3.OperationalError:  # an SQLite built without dbstat
        return {}
    finally:
        con.close()
    return {name: round(size / 2 ** 20, 1) for name, size in rows if size > 2 ** 20}


def timed(fn, repeat: int, cpu: list[float] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls; ``cpu`` gets the process's CPU seconds (all its
    threads), which a busy machine does not inflate as it does wall-clock time."""
    out = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out


def measure(run_dir: Path, steps: int, repeat: int) -> dict[str, list[float]]:
    import mpviz
    from mpviz.dashboard import explorer_app

    def open_run() -> None:
        run = mpviz.load_run(run_dir)
        run.steps
        run.close()

    def run_once(fn) -> None:
        run = mpviz.load_run(run_dir)
        try:
            fn(run)
        finally:
            run.close()

    res = {"load_run + run.steps": timed(open_run, repeat)}
    first, first_cpu, shown, ranges, diagnose_cpu = [], [], [], [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ex = explorer_app(run_dir=run_dir, runs_dir=run_dir.parent, follow=False)
        first.append(time.perf_counter() - t0)
        first_cpu.append(time.process_time() - c0)
        assert len(ex.fig.trace("loss", 0).x) > 0, "the explorer drew nothing"
        while ex.diagnosis.diagnosis is None:
            assert "unavailable" not in ex.diagnosis.html.value, ex.diagnosis.html.value
            time.sleep(0.01)
        shown.append(time.perf_counter() - t0)
        for lo, hi in ((steps // 2, steps // 2 + 10_000), (0, steps - 1)):
            t0 = time.perf_counter()
            ex.set_range(lo, hi)
            ranges.append(time.perf_counter() - t0)
        ex.close()
    res["explorer first draw"] = first
    res["explorer first draw, CPU"] = first_cpu
    res["explorer diagnosis shown"] = shown
    res["explorer range change"] = ranges
    res["diagnose"] = timed(lambda: run_once(mpviz.diagnose), repeat, diagnose_cpu)
    res["diagnose, CPU"] = diagnose_cpu
    return res


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", default=None, help="write the run here and keep it (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--run", default=None, help="only measure this run, already written (not thinned)")
    args = ap.parse_args()

    import mpviz

    if args.run:
        print(f"load average {os.getloadavg()}")
        run = mpviz.load_run(args.run)
        steps = run.last_step + 1
        run.close()
        for k, v in measure(Path(args.run), steps, args.repeat).items():
            print(f"  {k}: {fmt(v)}")
        return

    tmp = None
    if args.keep:
        run_dir = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="mpviz-large-")
        run_dir = Path(tmp) / "large"
    try:
        print(f"writing {args.steps:,} steps x {args.layers} layers, statistics every "
              f"{args.every} to {run_dir} ...", flush=True)
        wrote = write_run(run_dir, args.steps, args.layers, args.every)
        rows = args.steps // args.every * args.layers * 3
        result = {"steps": args.steps, "layers": args.layers, "every": args.every,
                  "layer_stats_rows": rows, "write_s": wrote, "size_mb": size_mb(run_dir),
                  "cpus": os.cpu_count()}
        print(f"store: {result['size_mb']:.0f} MB ({rows:,} layer_stats rows + as many "
              f"histograms), written in {wrote:.0f} s; load average {os.getloadavg()}")
        result["breakdown_mb"] = breakdown_mb(run_dir)
        print("  by table/index (MB):", result["breakdown_mb"])
        result["times"] = measure(run_dir, args.steps, args.repeat)
        for k, v in result["times"].items():
            print(f"  {k}: {fmt(v)}")
        keep_every, before = 10 * args.every, int(args.steps * 0.9)
        t0 = time.perf_counter()
        th = mpviz.thin(run_dir, keep_every=keep_every, before_step=before)
        result["thin"] = {**th, "keep_every": keep_every, "before_step": before,
                          "seconds": time.perf_counter() - t0}
        print(f"thin(keep_every={keep_every}, before_step={before:,}): "
              f"{th['bytes_before'] / 2**20:.0f} MB -> {th['bytes_after'] / 2**20:.0f} MB, "
              f"{th['rows_dropped']:,} rows dropped, {result['thin']['seconds']:.0f} s; "
              f"load average {os.getloadavg()}")
        result["times_after_thin"] = measure(run_dir, args.steps, args.repeat)
        for k, v in result["times_after_thin"].items():
            print(f"  after thinning, {k}: {fmt(v)}")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
