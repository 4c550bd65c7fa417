"""What mpviz costs an FSDP2 job: 2 gloo ranks on the CPU, HF GPT-2 models.

For each model (``tests``: a 3-block GPT-2 of width 16, the size of tests/test_fsdp.py's;
``gpt2``: GPT-2 small, 124M parameters), per-block ``fully_shard`` and the root, AdamW, each rank
trains one step of each arm per round, in a rotating order (the same processes and data):

- ``plain``: FSDP alone;
- ``hooks``: with mpviz's two FSDP hooks (:class:`LocalGradCheck`: each local gradient checked
  before the reduce-scatter; :class:`ReducedGrads`: one end-of-backward callback), no statistics
  (the time inside the check's hooks is also summed per step: ``local check ms``);
- ``sampled``: the hooks, and on every step the statistics of every sharded gradient and weight
  (:func:`sharded_stats` on both lists at once, at the end of backward), histograms and
  smallest nonzero from ``SAMPLE_CAP`` elements per tensor as mpviz.stats takes them - what
  ``every=1`` costs;
- ``exact``: the same with every element in the histograms (``sample=None``);
- ``mpviz``: ``mpviz.Recorder(model, optimizer, run_dir=...)`` at its defaults (under FSDP:
  statistics exactly every 10 steps), ``rec.step(loss)`` after each step;
- ``mpviz every=1``: the Recorder with statistics on every step.

Printed per model, first table (the pieces): the median plain step, each arm's median ratio to
the plain step of its round, the statistics calls alone (median), and the collectives they add
per statistics step (counted by wrapping ``torch.distributed``'s calls during them) with their
bytes per rank, next to the bytes that gathering the full tensors would move. Second table (the
Recorder): its median ratio on steps without statistics (``mpviz``) and on statistics steps
(``mpviz every=1``), what the defaults cost over periods of 10 steps (one statistics step
each: the median period), and the collectives a recorded step adds to the plain step's (both
counted whole, on the last round). GPT-2 small computes in fp32 by default: on a CPU without
bf16 matrix units bf16 matmuls are emulated and would make the step, not mpviz, the
measurement (``--param-dtype bf16`` changes it; the statistics read the fp32 shards either
way).

    python benchmarks/fsdp.py                      # both models, every arm (long, ~12 GB)
    python benchmarks/fsdp.py --models tests --steps 100
    python benchmarks/fsdp.py --models gpt2 --steps 8 --arms plain mpviz "mpviz every=1"
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

import mpviz
from mpviz.recording.schedule import DEFAULT_EVERY
from mpviz.stats import SAMPLE_CAP

MODELS = {
    # name: (GPT2Config kwargs, batch, sequence length, default compute dtype)
    "tests": (dict(n_layer=3, n_embd=16, n_head=2, vocab_size=33, n_positions=32, bos_token_id=0,
                   eos_token_id=0), 4, 16, "bf16"),
    "gpt2": (dict(), 1, 64, "fp32"),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ARMS = ("plain", "hooks", "sampled", "exact", "mpviz", "mpviz every=1")
RECORDED = {"mpviz": None, "mpviz every=1": 1}  # arm -> Recorder(every=...)


def build(name: str, param_dtype: torch.dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg, _, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0))
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    return model


class Counted:
    """Counts the collectives (and their bytes) torch.distributed runs while on."""

    NAMES = ("all_reduce", "reduce", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor",
             "broadcast")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self) -> "Counted":
        for n, fn in self.saved.items():
            def wrapped(tensor, *a, _fn=fn, _n=n, **k):
                self.calls.append((_n, tensor.numel() * tensor.element_size()))
                return _fn(tensor, *a, **k)
            setattr(dist, n, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def timed_check(model, spent: list[float]):
    """A LocalGradCheck whose hooks add the time they take to ``spent[0]``."""
    from mpviz.recording.fsdp_hooks import LocalGradCheck

    class Timed(LocalGradCheck):
        def _checker(self, name):
            check = super()._checker(name)

            def timed(p):
                t0 = time.perf_counter()
                check(p)
                spent[0] += time.perf_counter() - t0
            return timed
    return Timed(model)


def measure(name: str, steps: int, param_dtype: torch.dtype, arm_names: list[str],
            run_dir: str) -> dict:
    from mpviz.recording.fsdp_hooks import LocalGradCheck, ReducedGrads
    from mpviz.recording.sharded import sharded_stats

    rank = dist.get_rank()
    _, batch, seq, _ = MODELS[name]
    vocab = MODELS[name][0].get("vocab_size", 50257)
    samples = {a: n for a, n in (("sampled", SAMPLE_CAP), ("exact", None)) if a in arm_names}
    arms = {arm: build(name, param_dtype) for arm in arm_names}
    opts = {arm: torch.optim.AdamW(m.parameters(), lr=1e-4) for arm, m in arms.items()}
    recs = {arm: mpviz.Recorder(arms[arm], opts[arm], run_dir=Path(run_dir, name, arm),
                                every=RECORDED[arm]).attach()
            for arm in arm_names if arm in RECORDED}
    g = torch.Generator().manual_seed(100 + rank)
    data = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]
    stat_times: dict[str, list[float]] = {arm: [] for arm in samples}
    counted: list[list[tuple[str, int]]] = []

    def stats_of(arm: str):
        model, step = arms[arm], [0]

        def take() -> None:
            params = [p for p in model.parameters() if p.grad is not None]
            t0 = time.perf_counter()
            with Counted() as c:
                sharded_stats([p.grad for p in params] + params, sample=samples[arm],
                              offset=step[0])
            stat_times[arm].append(time.perf_counter() - t0)
            counted.append(c.calls)
            step[0] += 1
        return take

    spent = [0.0]
    check_times: list[float] = []
    attached = {arm: [(timed_check(arms[arm], spent) if arm == "hooks"
                       else LocalGradCheck(arms[arm])).attach(),
                      ReducedGrads(arms[arm], stats_of(arm) if arm in samples else lambda: None
                                   ).attach()]
                for arm in ("hooks", *samples) if arm in arm_names}
    # One step of each arm per round, in a rotating order, so that every arm meets the same
    # load (this machine's cores are shared); each round's ratio to its plain step.
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    step_calls: dict[str, list[tuple[str, int]]] = {}  # the last round's collectives, per arm
    order = list(arms)
    for r in range(steps):
        ids = data[r]
        for arm in order[r % len(order):] + order[:r % len(order)]:
            model, opt = arms[arm], opts[arm]
            dist.barrier()
            with Counted() as c:
                t0 = time.perf_counter()
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                if arm in recs:
                    recs[arm].step(loss)
                times[arm].append(time.perf_counter() - t0)
            step_calls[arm] = c.calls
            for h in attached.get(arm, [])[:1]:  # the LocalGradCheck: a new step
                h.end_step()
            if arm == "hooks":
                check_times.append(spent[0])
                spent[0] = 0.0
    for hs in attached.values():
        for h in hs:
            h.remove()
    for rec in recs.values():
        rec.close()
    model = arms["plain"]
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    # grads + weights, as gathering them would move
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 2
    skip = 1  # the first step of each arm pays the lazy init
    ratios = {arm: [a / b for a, b in zip(t, times["plain"])] for arm, t in times.items()}
    every = DEFAULT_EVERY
    return {
        "model": name, "rank": rank, "params": n_params, "tensors": n_tensors,
        "steps": steps, "param_dtype": str(param_dtype).removeprefix("torch."),
        "ms": {arm: 1e3 * statistics.median(t[skip:]) for arm, t in times.items()},
        "ratio": {arm: statistics.median(r[skip:]) for arm, r in ratios.items()},
        # the Recorder at its defaults: steps without statistics, and whole periods of `every`
        # steps (one statistics step each; the median of their time ratios), when there are some
        "ratio_plain_steps": statistics.median(
            r for k, r in enumerate(ratios["mpviz"]) if k >= skip and k % every)
        if "mpviz" in ratios else None,
        "ratio_mean": statistics.median(
            sum(times["mpviz"][k:k + every]) / sum(times["plain"][k:k + every])
            for k in range(every, steps - every + 1, every))
        if "mpviz" in ratios and steps >= 2 * every else None,
        "check_ms": 1e3 * statistics.median(check_times[skip:]) if check_times else None,
        "stats_ms": {arm: 1e3 * statistics.median(t[skip:]) for arm, t in stat_times.items()},
        "collectives": counted[-1] if counted else [],
        "step_calls": step_calls,
        "last_round_stats": (steps - 1) % every == 0,
        "gather_bytes": full_bytes,
    }


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for name in args["models"]:
        dtype = DTYPES[args["param_dtype"] or MODELS[name][3]]
        rows.append(measure(name, args["steps"][name], dtype, args["arms"], out))
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def run(models: list[str], steps: dict[str, int], param_dtype: str | None = None,
        world: int = 2, arms: list[str] | None = None) -> list[list[dict]]:
    """Each rank's rows, one per model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    arms = ["plain", *[a for a in (arms or ARMS) if a != "plain"]]
    with tempfile.TemporaryDirectory() as out:
        args = {"models": models, "steps": steps, "param_dtype": param_dtype, "arms": arms}
        mp.spawn(_worker, args=(world, port, args, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _kinds(calls: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    kinds: dict[str, tuple[int, int]] = {}
    for kind, nbytes in calls:
        n, b = kinds.get(kind, (0, 0))
        kinds[kind] = (n + 1, b + nbytes)
    return kinds


def _extra(calls: list[tuple[str, int]], plain: list[tuple[str, int]]) -> str:
    """The collectives a step adds to the plain step's: count of each kind, bytes per rank."""
    mine, base = _kinds(calls), _kinds(plain)
    parts, sent = [], 0
    for kind, (n, b) in mine.items():
        n0, b0 = base.get(kind, (0, 0))
        if n != n0 or b != b0:
            parts.append(f"{n - n0} {kind}")
            sent += b - b0
    return f"{', '.join(parts) or 'none'} ({sent / 1024:.1f} KiB)"


def recorder_table(per_rank: list[list[dict]]) -> str:
    lines = ["| model | rank | FSDP step ms | mpviz, steps without statistics | mpviz every=1 "
             "(statistics steps) | mpviz defaults (periods of 10 steps) | extra collectives, "
             "statistics step (bytes per rank) | extra collectives, other steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rows in zip(*per_rank):
        for r in rows:
            if "mpviz every=1" not in r["ratio"] or "mpviz" not in r["ratio"]:
                continue
            calls, plain = r["step_calls"], r["step_calls"]["plain"]
            stats_ratio = r["ratio"]["mpviz every=1"]
            mean = r["ratio_mean"]
            mean = (f"{mean:.2f}x measured" if mean is not None else
                    f"{(9 * r['ratio_plain_steps'] + stats_ratio) / 10:.2f}x (9 of the first + "
                    f"1 of the second)")
            other = ("(last round was a statistics step)" if r["last_round_stats"]
                     else _extra(calls["mpviz"], plain))
            lines.append(
                f"| {r['model']} | {r['rank']} | {r['ms']['plain']:.1f} | "
                f"{r['ratio_plain_steps']:.2f}x | {stats_ratio:.2f}x | {mean} | "
                f"{_extra(calls['mpviz every=1'], plain)} | {other} |")
    return "\n".join(lines)


def table(per_rank: list[list[dict]]) -> str:
    lines = ["| model | params | compute | rank | FSDP step ms | + hooks | local check ms | "
             "+ statistics every step "
             "(sampled / exact) | statistics call ms (sampled / exact) | collectives per "
             "statistics step | bytes sent per rank | gathering the full tensors instead |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rows in zip(*per_rank):
        for r in rows:
            ms, ratio = r["ms"], r["ratio"]
            if not {"hooks", "sampled", "exact"} <= set(ratio):
                continue
            kinds = {}
            for kind, nbytes in r["collectives"]:
                n, b = kinds.get(kind, (0, 0))
                kinds[kind] = (n + 1, b + nbytes)
            calls = ", ".join(f"{n} {k}" for k, (n, _) in kinds.items())
            sent = sum(b for _, b in kinds.values())
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.2f}M ({r['tensors']} tensors) | "
                f"{r['param_dtype']} | {r['rank']} | {ms['plain']:.1f} | "
                f"{ratio['hooks']:.2f}x | {r['check_ms']:.1f} | {ratio['sampled']:.2f}x / "
                f"{ratio['exact']:.2f}x | {r['stats_ms']['sampled']:.1f} / "
                f"{r['stats_ms']['exact']:.1f} | {calls} | {sent / 1024:.1f} KiB | "
                f"{r['gather_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=None,
                   help="steps per arm (default: 60 tests, 6 gpt2)")
    p.add_argument("--param-dtype", choices=list(DTYPES), default=None)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    a = p.parse_args(argv)
    steps = {m: a.steps or {"tests": 60, "gpt2": 6}[m] for m in a.models}
    per_rank = run(a.models, steps, a.param_dtype, arms=a.arms)
    print(table(per_rank))
    print()
    print(recorder_table(per_rank))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
