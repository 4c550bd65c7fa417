"""A DDP training job started the way users start them, for tests/test_distributed.py:

    torchrun --nproc-per-node 2 --master-port PORT tests/ddp_script.py OUT_DIR

(``torchrun(out_dir)`` below, from tests/test_distributed.py and tests/test_export.py.)

gloo on the CPU, fp16 autocast + GradScaler("cpu"). Rank 1 multiplies its input by 1e30 at step 3,
so its own gradients go inf/nan, the all-reduce spreads them to rank 0, and GradScaler skips the
step on both. Each rank trains twice from the same seed and data, without mpviz and with it, and
writes OUT_DIR/rank{r}.json: whether the two are bit-identical, and the test's independent
references, measured on the plain run by this script's own code: each step's loss, each layer's
unscaled gradient norm (after DDP's all-reduce: the sqrt of the sum of squares of the layer's
weight and bias gradients over the loss scale in force), each module's output dtype (its own
forward hooks), which layers' local gradients went non-finite (a plain copy of the model), and
what mpviz says about a user's own comm hook and about FSDP1. The recorded run is OUT_DIR/run.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mpviz
import mpviz.distributed

BAD_STEP, BAD_RANK, STEPS = 3, 1, 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def output_dtypes(model: nn.Module, seen: dict[str, str]) -> list:
    """Forward hooks that put each module's output dtype in ``seen`` (by its name)."""
    def hook(name):
        def record(module, args, output):
            if isinstance(output, torch.Tensor):
                seen[name] = str(output.dtype).removeprefix("torch.")
        return record
    return [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]


def grad_norms(model: nn.Module, scale: float) -> dict[str, float]:
    """Each layer's gradient norm over its own parameters (weight and bias), divided by the
    loss scale, in float64."""
    norms = {}
    for name, m in model.named_modules():
        grads = [p.grad.double() / scale for p in m.parameters(recurse=False) if p.grad is not None]
        if grads:
            norms[name] = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return norms


def train(rank: int, run_dir: str | None, out: dict) -> list[torch.Tensor]:
    """STEPS steps of DDP training; with ``run_dir``, recorded by mpviz; without, the
    references are measured (``out``: losses, grad_norms, output_dtypes, one entry per step)."""
    # bucket_cap_mb: several buckets, so parameters are mapped back from more than one
    ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.004)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    g = torch.Generator().manual_seed(100 + rank)
    rec = mpviz.Recorder(ddp, optimizer=opt, scaler=scaler, run_dir=run_dir, every=2) \
        if run_dir else None
    if rec is not None:
        rec.attach()
        if rank == BAD_RANK:  # the accelerator's path (on-device values, no read in the hook)
            rec._origin.on_host = False
    else:
        dtypes: dict[str, str] = {}
        hooks = output_dtypes(ddp, dtypes)
        out.update(losses=[], grad_norms=[], output_dtypes=[])
    for step in range(STEPS):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        if step == BAD_STEP and rank == BAD_RANK:
            x = x * 1e30
        if step == BAD_STEP and rec is None:  # reference: this rank's own gradients, no DDP
            plain = copy.deepcopy(ddp.module)
            with torch.autocast("cpu", dtype=torch.float16):
                ref_loss = nn.functional.mse_loss(plain(x).float(), y)
            (ref_loss * scaler.get_scale()).backward()
            out["local_nonfinite_layers"] = sorted({
                "module." + name.rsplit(".", 1)[0] for name, p in plain.named_parameters()
                if not torch.isfinite(p.grad).all()})
            dtypes.clear()  # (the copy took the dtype hooks along)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(ddp(x).float(), y)
        scaler.scale(loss).backward()
        if rec is None:  # the gradients DDP all-reduced, before the optimizer step
            out["losses"].append(loss.item())
            out["grad_norms"].append(grad_norms(ddp, scaler.get_scale()))
            out["output_dtypes"].append(dict(dtypes))
            dtypes.clear()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if rec is not None:
            rec.step(loss=loss, samples=len(x))
    if rec is None:
        for h in hooks:
            h.remove()
    params = [p.detach().clone() for p in ddp.parameters()] + [scaler.get_scale()]
    if rec is not None:
        rec.close()
        out["recorder_errors"] = rec.errors
        # a second Recorder on the same DDP model takes the (unremovable) comm hook over
        with mpviz.Recorder(ddp, optimizer=opt, run_dir=str(Path(run_dir).parent / "sampled"),
                            stats_ranks="sample:1") as rec2:
            for _ in range(2):
                x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
                nn.functional.mse_loss(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
                rec2.step(loss=None, samples=16)
        out["second_recorder_errors"] = rec2.errors
    return params


def refusals(out_dir: Path, out: dict) -> None:
    """What mpviz says about a user's own comm hook, a checked() one, and FSDP1."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp = nn.parallel.DistributedDataParallel(make_model())
    ddp.register_comm_hook(None, allreduce_hook)
    try:
        mpviz.Recorder(ddp, run_dir=str(out_dir / "refused")).attach()
        out["user_hook"] = "attached"
    except ValueError as e:
        out["user_hook"] = str(e)
    out["user_hook_run_created"] = (out_dir / "refused").exists()

    ddp = nn.parallel.DistributedDataParallel(make_model())
    ddp.register_comm_hook(None, mpviz.distributed.checked(allreduce_hook))
    with mpviz.Recorder(ddp, run_dir=str(out_dir / "chained")) as rec:
        x = torch.randn(4, 8)
        if dist.get_rank() == BAD_RANK:
            x[0, 0] = float("inf")  # CPU path of the check: rank 1's own gradients go inf/nan
        ddp(x).sum().backward()
        out["chained_watch_used"] = rec._origin is not None and rec._origin.active
        rec.step()
    out["chained_errors"] = rec.errors

    try:  # FSDP1 (FSDP2, fully_shard, is recorded: tests/test_fsdp.py)
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(make_model(), use_orig_params=True,
                                         device_id=torch.device("cpu"))
        try:
            mpviz.Recorder(model, run_dir=str(out_dir / "fsdp")).attach()
            out["fsdp"] = "attached"
        except NotImplementedError as e:
            out["fsdp"] = str(e)
        out["fsdp_run_created"] = (out_dir / "fsdp").exists()
    except Exception as e:  # noqa: BLE001 - what this torch allows on the CPU, recorded
        out["fsdp"] = f"FullyShardedDataParallel itself failed here: {type(e).__name__}: {e}"


def torchrun(out_dir: Path, timeout: float = 180) -> list[dict]:
    """Run this script as a 2-rank torchrun job writing to ``out_dir``; each rank's report."""
    from helpers.distributed import torchrun as launch

    return launch(__file__, out_dir, timeout)


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rank": rank, "world_size": dist.get_world_size()}
    plain = train(rank, None, out)
    recorded = train(rank, str(out_dir / "run"), out)
    out["identical"] = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                           for a, b in zip(plain, recorded))
    refusals(out_dir, out)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
