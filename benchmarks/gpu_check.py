"""On a GPU: does the recorder add host syncs, and what does it cost? One short script.

Run it on a machine with a CUDA GPU (a few minutes on an H100-class card):

    python benchmarks/gpu_check.py                     # sync check, overhead, prediction check
    python benchmarks/gpu_check.py --device cpu --tiny # dry run of every code path (no sync check)

On a machine without CUDA it prints that it skipped and exits 0.

1. **Host syncs.** A few steps of a plain AMP loop and of the same loop recorded
   (``mpviz.Recorder(..., every=10)``: statistics and non-statistics steps) run under
   ``torch.cuda.set_sync_debug_mode("warn")``; every synchronizing CUDA call becomes a warning,
   counted per phase (forward + backward, GradScaler/optimizer, ``rec.step()``) with the source
   line that made it. The recorder's syncs are the recorded loop's count minus the plain loop's,
   phase by phase; GradScaler's own syncs (its ``found_inf.item()`` in ``scaler.step``) are in
   both and cancel. The budget is ONE per step: the host copy in ``rec.step()`` (without a
   GradScaler, bf16, one more: the recorder's inf/nan check before the optimizer step). Then one
   recorded statistics step runs with ``set_sync_debug_mode("error")`` around every phase where
   neither the plain loop nor the budget has a sync, so a sync the recorder adds there fails
   (the recorder contains the error: it is read from ``rec.errors``, with its source line).
2. **Overhead.** A GPT-2-small-sized ``GPT2LMHeadModel`` from a config (12 layers, width 768,
   12 heads, vocabulary 50,257, 512 tokens, batch 8; no download) in fp16 + GradScaler and in
   bf16: plain AMP, ``every=10`` (the default) and ``every=1``, A/B interleaved in blocks of
   steps (order rotated each round, ``torch.cuda.synchronize()`` and the recorder's flush
   charged to the block); ratio = median block time / plain's.
3. **Prediction.** The same model trained plainly (no recorder) in fp32, bf16 and fp16 +
   GradScaler, interleaved the same way, against ``mpviz.estimate`` of its step on this GPU
   (``torch.cuda.get_device_name()``, or ``--gpu``; Adam, as trained): predicted and measured
   step times and speedups over fp32, and whether each predicted speedup is within ±25% of the
   measured one (the target of #21). fp32 is priced as tf32 when
   ``torch.get_float32_matmul_precision()`` lets matmuls use it. On the CPU dry run the "measured"
   figures are the CPU's and the comparison means nothing.

Exit status: 0 when the recorder stays within its one sync per step (or on a skip), 1 when it
adds more (each extra one is printed with where it comes from), 2 when syncs could not be
counted (GradScaler's own sync was not seen: the check would prove nothing). The prediction
check prints its verdict and does not change the exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import mpviz  # noqa: E402
from mpviz import tree  # noqa: E402
from mpviz.cost import get_device  # noqa: E402
from overhead import gpt2_trainer  # noqa: E402

SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "seq": 512, "batch": 8, "vocab": 50257}
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "seq": 16, "batch": 4, "vocab": 256}
PHASES = ("forward+backward", "scaler/optimizer", "rec.step")
PRECISIONS = ("fp16", "bf16")
PREDICTED = ("fp32", "bf16", "fp16")
TOLERANCE = 0.25  # #21's target: a predicted speedup within 25% of the measured one
ARMS = ("plain", "every=10", "every=1")
# Syncs per step the recorder may add (recorder.py's docstring): the one host copy in rec.step();
# without a GradScaler (bf16) also its inf/nan check before the optimizer's step, which must
# reach the host before the weights change to replay the bad forward with them.
BUDGET = {"fp16": {PHASES[0]: 0, PHASES[1]: 0, PHASES[2]: 1},
          "bf16": {PHASES[0]: 0, PHASES[1]: 1, PHASES[2]: 1}}


class SyncCounter:
    """Counts synchronizing CUDA calls per phase (sync debug mode "warn"), with their sources."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: Counter[str] = Counter()
        self.where: dict[str, Counter[str]] = {ph: Counter() for ph in PHASES}

    @contextlib.contextmanager
    def phase(self, name: str, strict: bool = False) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("error" if strict else "warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message):
                self.counts[name] += 1
                self.where[name][f"{Path(w.filename).name}:{w.lineno}"] += 1


def train_step(t: Any, rec: Any, batch: Any, sync: SyncCounter,
               strict: frozenset[str] = frozenset()) -> None:
    """One AMP step with the Trainer's parts, phase by phase (no ``float(loss)``: that syncs)."""
    with sync.phase(PHASES[0], PHASES[0] in strict):
        with t._autocast():
            loss = t.loss_fn(t.model, batch)
        (t.scaler.scale(loss) if t.scaler is not None else loss).backward()
    with sync.phase(PHASES[1], PHASES[1] in strict):
        if t.scaler is not None:
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    if rec is not None:
        with sync.phase(PHASES[2], PHASES[2] in strict):
            rec.step(loss=loss.detach(), samples=len(batch[0]))


def make(arm: str, precision: str, size: dict[str, int], device: str, root: Path,
         every: int = 10) -> tuple[Any, Any]:
    """A Trainer (its parts; nothing of mpviz on it) and, unless ``arm`` is plain, a Recorder."""
    t = gpt2_trainer(precision, 0, record=False, device=device, **size)
    t.policy_handle.remove()
    rec = None
    if arm != "plain":
        rec = mpviz.Recorder(t.model, optimizer=t.optimizer, scaler=t.scaler,
                             run_dir=root / f"{precision}-{arm}", every=every)
        rec.attach()
        if device == "cpu":
            rec._grads.on_host = False  # the dry run takes the accelerator's path: one copy per step
    return t, rec


def batches(t: Any, n: int, device: str) -> list[Any]:
    """``n`` batches already on the device (their copy is no part of what is measured)."""
    return [tree.map_tensors(lambda x: x.to(device), t.next_batch()) for _ in range(n)]


def check_syncs(precision: str, size: dict[str, int], device: str, root: Path,
                steps: int, every: int = 10) -> dict[str, Any]:
    """Sync counts per step and phase, plain vs recorded, and the strict re-run."""
    counting = device == "cuda"
    result: dict[str, Any] = {"precision": precision}
    for arm in ("plain", "recorded"):
        t, rec = make(arm, precision, size, device, root / "sync", every)
        data = batches(t, steps + 1, device)
        train_step(t, rec, data[-1], SyncCounter(False))  # warm-up: kernels chosen, state made
        sync = SyncCounter(counting)
        for b in data[:steps]:
            train_step(t, rec, b, sync)
        result[arm] = {ph: sync.counts[ph] / steps for ph in PHASES}
        result[arm + " where"] = {ph: dict(sync.where[ph]) for ph in PHASES}
        if rec is not None:
            # A statistics step, strict ("error") where neither plain nor the budget has a sync.
            while rec._state.index % rec.every:
                train_step(t, rec, data[0], SyncCounter(False))
            strict = frozenset(ph for ph in PHASES[:2]
                               if result["plain"][ph] == 0 and BUDGET[precision][ph] == 0)
            before = len(rec.errors)
            try:  # the recorder contains its own errors: a sync in its hooks lands in rec.errors
                train_step(t, rec, data[1], SyncCounter(counting), strict)
                raised = None
            except RuntimeError as e:
                raised = str(e).splitlines()[0]
            caught = [f"{e['part']} at {e['where']}: {e['error']}" for e in rec.errors[before:]]
            if not counting:
                result["strict"] = "not run (CPU)"
            elif raised or caught:
                result["strict"] = "FAILED: " + "; ".join(([raised] if raised else []) + caught)
            else:
                result["strict"] = f"passed ({', '.join(sorted(strict)) or 'no phase'} in 'error' mode)"
            errors = rec.errors[:before]
            rec.close()
            if errors:
                result["recorder_errors"] = errors
        t.close()
    plain, recd = result["plain"], result["recorded"]
    result["extra_per_step"] = {ph: recd[ph] - plain.get(ph, 0) for ph in PHASES}
    return result


def interleaved(made: dict[str, Any], data: dict[str, list[Any]], device: str, rounds: int,
                block: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each ``made[key] = (trainer, recorder or None)``, timed in
    blocks of ``block`` steps, the order rotated each round (the recorder's flush charged to its
    block)."""
    off = SyncCounter(False)
    keys = list(made)
    times: dict[str, list[float]] = {k: [] for k in keys}

    def block_of(k: str, n: int) -> float:
        t, rec = made[k]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            train_step(t, rec, data[k][i % block], off)
        if device == "cuda":
            torch.cuda.synchronize()
        if rec is not None:
            rec.flush()
        return time.perf_counter() - t0

    for k in keys:
        block_of(k, warmup)
    for r in range(rounds):
        j = r % len(keys)
        for k in keys[j:] + keys[:j]:
            times[k].append(block_of(k, block) / block)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead(precision: str, size: dict[str, int], device: str, root: Path, rounds: int,
             block: int, warmup: int) -> dict[str, Any]:
    made = {arm: make(arm, precision, size, device, root / "time",
                      int(arm.split("=")[1]) if "=" in arm else 10) for arm in ARMS}
    data = {arm: batches(made[arm][0], block, device) for arm in ARMS}
    try:
        med = interleaved(made, data, device, rounds, block, warmup)
    finally:
        for t, rec in made.values():
            if rec is not None:
                rec.close()
            t.close()
    return {"precision": precision, **{f"{arm} ms": med[arm] * 1e3 for arm in ARMS},
            **{f"{arm} ratio": med[arm] / med["plain"] for arm in ARMS[1:]}}


def prediction(size: dict[str, int], device: str, gpu: str, rounds: int, block: int,
               warmup: int) -> list[dict[str, Any]]:
    """Measured (median of interleaved blocks, plain training) and predicted seconds per step of
    fp32, bf16 and fp16 + GradScaler, and the speedups over fp32."""
    made = {p: make("plain", p, size, device, Path()) for p in PREDICTED}
    data = {p: batches(t, block, device) for p, (t, _) in made.items()}
    fp32 = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    predicted = {p: mpviz.estimate(t.model, data[p][0], policy=fp32 if p == "fp32" else p,
                                   device=gpu, optimizer="adam", forward=t.loss_fn).step_time_s
                 for p, (t, _) in made.items()}
    try:
        measured = interleaved(made, data, device, rounds, block, warmup)
    finally:
        for t, _ in made.values():
            t.close()
    rows = []
    for p in PREDICTED:
        pred, meas = predicted["fp32"] / predicted[p], measured["fp32"] / measured[p]
        rows.append({"precision": p, "predicted s": predicted[p], "measured s": measured[p],
                     "predicted speedup": pred, "measured speedup": meas,
                     "within": abs(pred / meas - 1) <= TOLERANCE})
    return rows


def print_prediction(rows: list[dict[str, Any]], title: str) -> None:
    print(f"\npredicted (mpviz.estimate, {title}) vs measured step time, plain training")
    print("| precision | predicted ms | measured ms | predicted speedup | measured speedup | "
          f"within ±{TOLERANCE:.0%} |\n|---|---:|---:|---:|---:|---|")
    for r in rows:
        prec = "fp16 + GradScaler" if r["precision"] == "fp16" else r["precision"]
        verdict = "-" if r["precision"] == "fp32" else ("yes" if r["within"] else "NO")
        print(f"| {prec} | {r['predicted s'] * 1e3:.2f} | {r['measured s'] * 1e3:.2f} | "
              f"{r['predicted speedup']:.2f}x | {r['measured speedup']:.2f}x | {verdict} |")
    ok = all(r["within"] for r in rows)
    print(f"prediction check: {'PASS' if ok else 'FAIL'} (predicted speedups over fp32 within "
          f"±{TOLERANCE:.0%} of the measured ones)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and few steps (dry run)")
    p.add_argument("--rounds", type=int, default=8, help="turns per arm (default 8)")
    p.add_argument("--block", type=int, default=20, help="steps per turn (default 20)")
    p.add_argument("--gpu", default=None, help="the GPU to predict for, a name from "
                   "mpviz.devices() (default: torch.cuda.get_device_name(); the CPU dry run: h100)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device: skipped (run it on a machine with a GPU; "
              "`--device cpu --tiny` dry-runs its code without the sync check)")
        return 0
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    size = TINY if args.tiny else SMALL
    rounds, block, warmup = (2, 10, 2) if args.tiny else (args.rounds, args.block, 10)
    if block % 10:
        p.error(f"--block must be a multiple of 10 (the default schedule's period), got {block}")
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run, no sync check)"
    print(f"gpu_check on {where}, torch {torch.__version__}, model {size}")
    t_start = time.perf_counter()
    status = 0
    syncs, costs = [], []
    with tempfile.TemporaryDirectory(prefix="mpviz-gpu-") as tmp:
        for prec in PRECISIONS:
            s = check_syncs(prec, size, args.device, Path(tmp) / prec, steps=12)
            syncs.append(s)
            if args.device == "cuda":
                if sum(s["plain"].values()) == 0 and prec == "fp16":
                    print("could not count syncs: GradScaler's own sync was not seen; "
                          "the check proves nothing on this build")
                    status = max(status, 2)
                over = {ph: n for ph, n in s["extra_per_step"].items() if n > BUDGET[prec][ph]}
                if over or s.get("strict", "").startswith("FAILED") or s.get("recorder_errors"):
                    status = max(status, 1)
            costs.append(overhead(prec, size, args.device, Path(tmp) / prec, rounds, block, warmup))
    gpu = args.gpu or (torch.cuda.get_device_name() if args.device == "cuda" else "h100")
    try:
        title = get_device(gpu).title
    except ValueError as e:  # a GPU mpviz has no datasheet figures for
        title = str(e)
        predicted = []
    else:
        predicted = prediction(size, args.device, gpu, rounds, block, warmup)
    print("\nhost syncs per step, recorded (every=10) minus plain; budget: fp16 "
          "0 / 0 / 1, bf16 0 / 1 / 1 (the one copy; bf16: + the check before the optimizer step)")
    print("| precision | " + " | ".join(PHASES) + " | strict re-run | where (recorded) |")
    print("|---|" + "---:|" * len(PHASES) + "---|---|")
    for s in syncs:
        where = "; ".join(f"{ph}: {', '.join(f'{k} x{v}' for k, v in s['recorded where'][ph].items())}"
                          for ph in PHASES if s["recorded where"][ph])
        print(f"| {s['precision']} | " + " | ".join(f"{s['extra_per_step'][ph]:+.2f}" for ph in PHASES)
              + f" | {s['strict']} | {where or '-'} |")
        if s.get("recorder_errors"):
            print(f"  recorder errors: {s['recorder_errors']}")
    print(f"\noverhead (median of {rounds} interleaved blocks of {block} steps; ratio to plain AMP)")
    print("| precision | plain ms/step | every=10 (default) | every=1 |\n|---|---:|---:|---:|")
    for c in costs:
        prec = "fp16 + GradScaler" if c["precision"] == "fp16" else c["precision"]
        print(f"| {prec} | {c['plain ms']:.1f} | {c['every=10 ratio']:.3f}x | {c['every=1 ratio']:.3f}x |")
    if predicted:
        print_prediction(predicted, title + ("" if args.device == "cuda" else
                                             "; measured on the CPU: a dry run"))
    else:
        print(f"\nprediction check: skipped: {title} Pass --gpu NAME to compare anyway.")
    print(f"\n{time.perf_counter() - t_start:.0f} s; exit status {status} "
          "(0: within budget, 1: extra syncs or errors, 2: syncs not countable)")
    return status


if __name__ == "__main__":
    sys.exit(main())
