"""A user's training script, as the steering tests start it: ``python tests/train_script.py RUN_DIR``.

A small classifier (LayerNorm, Linear, GELU) trained under fp16 autocast with a GradScaler on the
CPU, recorded with ``Recorder(..., steerable=True)`` so that other processes can steer it.

It stops after ``--max-steps`` steps, after ``--max-seconds``, or when ``RUN_DIR.stop`` appears,
whichever comes first (it never outlives a test by long). While ``RUN_DIR.hold`` exists it waits
between steps (at most ``--max-seconds`` in all), so that a test can post a request and see it
pending before the job reaches its next step boundary.
"""
from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import mpviz


def make_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        embed=nn.Linear(16, 64),
        body=nn.Sequential(OrderedDict(norm=nn.LayerNorm(64), fc=nn.Linear(64, 64), act=nn.GELU())),
        head=nn.Linear(64, 4),
    ))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--sleep", type=float, default=0.02, help="seconds between steps")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    stop, hold = run_dir.with_suffix(".stop"), run_dir.with_suffix(".hold")

    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(256, 16)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4
    end = time.monotonic() + args.max_seconds
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=run_dir, every=10,
                        flush_every_s=0.2, steerable=True) as rec:
        for step in range(args.max_steps):
            while hold.exists() and time.monotonic() < end:
                time.sleep(0.05)
            if stop.exists() or time.monotonic() > end:
                break
            i = torch.randint(0, len(x), (32,))
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x[i]), y[i])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            rec.step(loss=loss, samples=len(i))
            time.sleep(args.sleep)


if __name__ == "__main__":
    main()
