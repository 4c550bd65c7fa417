"""What recording costs a compiled model: torch.compile'd training with and without mpviz.

Arms, each its own model (same seed and data), compiled with ``torch.compile`` (inductor):
- ``eager``: the plain loop, not compiled (what compile buys, for reference);
- ``plain``: compiled, nothing attached;
- ``recdef``: compiled, ``Recorder(torch.compile(model))`` with the default schedule;
- ``rec1``: compiled, ``Recorder(..., every=1)``: statistics on every step, so every step also
  reruns the forward eagerly for per-layer dtypes and activations.

The arms take turns a block of steps at a time after a warm-up (which includes compiling); the
ratio is median block time of an arm / that of ``plain``. Recorded arms' writer backlog is
flushed after each block and charged to it. Also printed: graph breaks and compiled graphs per
arm (dynamo's counters), which must be the same with and without mpviz.

    python benchmarks/compiled.py                   # mlp and gpt2, bf16
    python benchmarks/compiled.py --quick           # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mpviz

ARMS = ("eager", "plain", "recdef", "rec1")


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.GELU()]
    return nn.Sequential(*layers, nn.LayerNorm(256), nn.Linear(256, 10))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256,
                                      n_positions=64, bos_token_id=0, eos_token_id=0))


def _batch(task: str, g: torch.Generator) -> Any:
    if task == "gpt2":
        ids = torch.randint(0, 256, (8, 64), generator=g)
        return {"input_ids": ids, "labels": ids}
    return torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)


def _loss(model: Any, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


class Arm:
    def __init__(self, arm: str, task: str, dtype: torch.dtype, root: Path) -> None:
        torch.manual_seed(0)
        self.model = _gpt2() if task == "gpt2" else _mlp()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.call = self.model if arm == "eager" else torch.compile(self.model)
        self.rec = None
        if arm.startswith("rec"):
            self.rec = mpviz.Recorder(self.call, optimizer=self.opt, run_dir=root / arm,
                                      every=1 if arm == "rec1" else None).attach()
        self.task, self.dtype = task, dtype
        self.g = torch.Generator().manual_seed(1)
        self.times: list[float] = []

    def steps(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            batch = _batch(self.task, self.g)
            with torch.autocast("cpu", dtype=self.dtype):
                loss = _loss(self.call, batch)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            if self.rec is not None:
                self.rec.step(loss=loss)
        if self.rec is not None:
            self.rec.flush()
        return (time.perf_counter() - t0) / n


def measure(task: str, precision: str, rounds: int, block: int, warmup: int) -> dict[str, Any]:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        arms = {}
        for name in ARMS:  # each arm compiles alone, so its counters are its own
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            arms[name] = Arm(name, task, dtype, Path(tmp))
            arms[name].steps(warmup)
            c = torch._dynamo.utils.counters
            counts[name] = (sum(c["graph_break"].values()), c["stats"]["unique_graphs"])
        for r in range(rounds):
            order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
            for name in order:
                arms[name].times.append(arms[name].steps(block))
        for a in arms.values():
            if a.rec is not None:
                a.rec.close()
    med = {n: statistics.median(a.times) for n, a in arms.items()}
    return {"task": task, "precision": precision, "ms": {n: 1e3 * v for n, v in med.items()},
            "ratio": {n: med[n] / med["plain"] for n in ARMS}, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="mlp,gpt2")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=40)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.block, a.warmup = 1, 2, 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("| task | precision | " + " | ".join(f"{n} ms/step" for n in ARMS)
          + " | recdef / plain | rec1 / plain | eager / plain | breaks (plain, rec) | graphs (plain, recdef, rec1) |")
    print("|" + " --- |" * (2 + len(ARMS) + 5))
    for task in a.tasks.split(","):
        m = measure(task, a.precision, a.rounds, a.block, a.warmup)
        c = m["counts"]
        print(f"| {task} | {a.precision} | " + " | ".join(f"{m['ms'][n]:.2f}" for n in ARMS)
              + f" | {m['ratio']['recdef']:.3f} | {m['ratio']['rec1']:.3f} | {m['ratio']['eager']:.3f}"
              + f" | {c['plain'][0]}, {max(c['recdef'][0], c['rec1'][0])}"
              + f" | {c['plain'][1]}, {c['recdef'][1]}, {c['rec1'][1]} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
