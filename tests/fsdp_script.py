"""An FSDP2 training job started the way users start them, for tests/test_fsdp.py:

    torchrun --nproc-per-node 2 --master-port PORT tests/fsdp_script.py OUT_DIR

(``torchrun(out_dir)`` below.) gloo on the CPU; a small transformer with ``fully_shard`` on each
block and on the root, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, AdamW,
gradients clipped (a step whose norm is not finite is skipped). Rank 1 feeds an inf at step 4.
Each rank writes OUT_DIR/rank{r}.json with what the test checks:

- ``stats``: per statistics step, mpviz.recording.sharded's statistics of the gradients and
  weights (taken from each rank's shards) next to independent references of the gathered
  tensors (``DTensor.full_tensor()``): this script's own numpy code, and mpviz.stats;
- ``units``: mpviz's per-unit dtype report, and what was given to fully_shard;
- ``local_bad``: per step, the parameters whose local gradients the pre-reduce-scatter hook
  found non-finite, and the reference: a plain (unsharded) bf16 copy of the model with the
  gathered weights, run on this rank's batch;
- ``reduced``: whether the end-of-backward callback saw every final sharded ``.grad``;
- ``identical``: the same training without any mpviz hook, bit for bit;
- ``policy``: each module's compute dtypes under ``mpviz.fsdp.shard(model, POLICY)``, seen by
  this script's own hooks.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

BAD_RANK, BAD_STEP, STEPS = 1, 4, 6
# Rank 1, step 1: the gradient flowing back into blocks.1's output goes inf, so only the
# parameters before it (inp, blocks.0, blocks.1) get non-finite local gradients.
BACKWARD_BAD_STEP = 1
STATS_STEPS = (0, 2, 4, 5)  # 4: the non-finite gradients
D, VOCAB, N_IN, SEQ, BATCH = 16, 33, 8, 6, 4  # 33: shards of unequal size
POLICY = {"*": "bf16", "blocks.1.ln1": "fp32", "blocks.0.act": "fp32", "head": "fp32"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 4 * D)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * D, D)
        self.gate = nn.Parameter(torch.ones(1))  # one element: rank 1's shard is empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, D // 2).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, D))
        return x + self.gate * self.fc2(self.act(self.fc1(self.ln2(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(N_IN, D)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def make_model() -> Model:
    torch.manual_seed(0)
    return Model()


def fsdp_model() -> Model:
    """Per-block fully_shard, then the root: bf16 compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in model.blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(STEPS):
        x = torch.randn(BATCH, SEQ, N_IN, generator=g)
        y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        if rank == BAD_RANK and step == BAD_STEP:
            x[0, 0, 0] = float("inf")
        out.append((x, y))
    return out


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float().reshape(-1, VOCAB), y.reshape(-1))


# ------------------------------------------------------------------ independent references

def reference_stats(t: torch.Tensor) -> dict:
    """Statistics of one gathered tensor, the slow obvious way (float64 numpy, np.frexp)."""
    a = np.abs(t.detach().float().numpy().astype(np.float64).reshape(-1))
    finite = np.isfinite(a)
    nonzero = a[(a > 0) & finite]
    hist = np.zeros(257, dtype=np.int64)
    hist[0] = int((a == 0).sum())
    hist[256] = int((~finite).sum())
    sub = (a > 0) & (a < 2.0 ** -126)
    hist[1] = int(sub.sum())
    normal = (a >= 2.0 ** -126) & finite
    _, e = np.frexp(a[normal])          # a = m * 2**e with 0.5 <= m < 1: [2**(e-1), 2**e)
    np.add.at(hist, (e - 1) + 128, 1)   # bin k holds [2**(k-128), 2**(k-127))
    return {"norm": float(np.sqrt(np.sum(a * a))),
            "max_abs": float(a.max()) if a.size and not np.isnan(a).any() else
            (float("nan") if a.size else 0.0),
            "min_abs_nonzero": float(nonzero.min()) if nonzero.size else float("inf"),
            "numel": int(a.size), "hist": hist.tolist()}


def mine(row: torch.Tensor) -> dict:
    from mpviz.stats import N_HEAD

    r = row.tolist()
    return {"norm": r[0], "max_abs": r[1], "min_abs_nonzero": r[2], "numel": r[3],
            "sampled": r[4], "hist": r[N_HEAD:]}


def plain_local_bad(full: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    step: int) -> list[str]:
    """Which parameters' gradients a plain bf16 copy of the model (the gathered weights, no
    FSDP) makes non-finite on this rank's batch."""
    plain = make_model()
    plain.load_state_dict(full)
    plain = plain.to(torch.bfloat16)
    with bad_backward(plain, step):
        loss_of(plain, x.to(torch.bfloat16), y).backward()
    return sorted(n for n, p in plain.named_parameters() if not torch.isfinite(p.grad).all())


class bad_backward:
    """At BACKWARD_BAD_STEP on BAD_RANK: the gradient reaching blocks.1's output becomes inf."""

    def __init__(self, model: nn.Module, step: int) -> None:
        self.model, self.on = model, step == BACKWARD_BAD_STEP and dist.get_rank() == BAD_RANK

    def __enter__(self) -> None:
        def hook(mod, args, output):
            output.register_hook(lambda g: g * float("inf"))
        self.h = self.model.blocks[1].register_forward_hook(hook) if self.on else None

    def __exit__(self, *exc) -> None:
        if self.h is not None:
            self.h.remove()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ------------------------------------------------------------------ training

def train(rank: int, watched: bool, out: dict) -> list[torch.Tensor]:
    """STEPS steps; with ``watched``, mpviz's hooks and statistics and this script's
    references on. Returns the final local shards of the parameters and of AdamW's state."""
    from torch.distributed.tensor import DTensor

    from mpviz.recording.fsdp_hooks import LocalGradCheck, ReducedGrads
    from mpviz.recording.sharded import fsdp_units, sharded_stats

    model = fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    seen: dict = {}
    step_of = [0]

    def at_end_of_backward() -> None:
        """mpviz's read of the gradients the optimizer sees (ReducedGrads' callback)."""
        grads = [p.grad for p in params]
        seen.setdefault("calls", []).append(step_of[0])
        seen["all_dtensors"] = all(isinstance(g, DTensor) for g in grads)
        seen["grads"] = [g.to_local().clone() for g in grads]
        if step_of[0] in STATS_STEPS:
            seen["grad_rows"] = sharded_stats(grads)
            seen["weight_rows"] = sharded_stats(params)
            seen["scaled_rows"] = sharded_stats(grads, scaled=(0, len(grads), 1024.0))
            seen["dst_rows"] = sharded_stats(grads, dst=0)

    hooks = []
    if watched:
        out["hooks_before"] = hook_count(model)
        # rank 1 takes the accelerator's path (max |g| kept on the device, read at the end)
        check = LocalGradCheck(model, on_host=False if rank == BAD_RANK else None).attach()
        hooks = [check, ReducedGrads(model, at_end_of_backward).attach()]
        out.update(stats={}, local_bad=[], reference_bad={}, reduced=[])
        out["units"] = [u.__dict__ | {"modules": list(u.modules), "params": list(u.params)}
                        for u in fsdp_units(model)]
        out["param_names"] = names
    for step, (x, y) in enumerate(batches(rank)):
        step_of[0] = step
        if watched and step in (BAD_STEP, BACKWARD_BAD_STEP):  # every rank gathers
            full = {n: p.full_tensor() for n, p in model.named_parameters()}
            if rank == BAD_RANK:
                out["reference_bad"][step] = plain_local_bad(full, x, y, step)
        with bad_backward(model, step):
            loss = loss_of(model, x, y)
            loss.backward()
        if watched:
            out["local_bad"].append(check.bad_params())
            check.end_step()
            if step == 0:
                out["hooks_during"] = hook_count(model)
            out["reduced"].append(
                seen.get("calls", [])[-1:] == [step] and seen["all_dtensors"]
                and all(same_bits(a, p.grad.to_local()) for a, p in zip(seen["grads"], params)))
            if step in STATS_STEPS:
                full_g = [p.grad.full_tensor() for p in params]
                full_w = [p.full_tensor() for p in params]
                out["stats"][step] = compare(seen, full_g, full_w, rank)
        norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if torch.isfinite(norm):
            opt.step()
        opt.zero_grad()
    for h in hooks:
        h.remove()
    if watched:
        out["hooks_after_remove"] = hook_count(model)
        out["hooks_fresh"] = hook_count(fsdp_model())
    state = [p.to_local().clone() for p in model.parameters()]
    for s in opt.state.values():
        state += [v.to_local().clone() if isinstance(v, DTensor) else v.clone()
                  for v in s.values() if isinstance(v, torch.Tensor)]
    return state


def hook_count(model: nn.Module) -> list[int]:
    """Forward pre-hooks on the modules, post-accumulate-grad hooks on the sharded parameters and
    on FSDP's unsharded ones (FSDP's internals: only a test looks there)."""
    from torch.distributed.fsdp import FSDPModule

    unsharded = 0
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for fp in group.fsdp_params:
                    u = getattr(fp, "_unsharded_param", None)
                    unsharded += len(getattr(u, "_post_accumulate_grad_hooks", None) or {})
    return [sum(len(m._forward_pre_hooks) for m in model.modules()),
            sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()), unsharded]


def compare(seen: dict, full_g: list, full_w: list, rank: int) -> dict:
    """mpviz's sharded rows next to the references of the gathered tensors."""
    from mpviz.stats import tensor_stats

    out = {}
    for kind, rows, full in (("grad", seen["grad_rows"], full_g),
                             ("weight", seen["weight_rows"], full_w)):
        out[kind] = {"mpviz": [mine(r) for r in rows],
                     "reference": [reference_stats(t) for t in full],
                     # mpviz.stats on the gathered tensors (all are below its sampling cap)
                     "stats_py": tensor_stats([t.float() for t in full], backend="numpy").tolist()}
    out["scaled"] = {"mpviz": [mine(r) for r in seen["scaled_rows"]],
                     "reference": [reference_stats(t / 1024.0) for t in full_g]}
    dst = seen["dst_rows"]
    out["dst"] = None if dst is None else [mine(r) for r in dst]
    out["dst_equal"] = dst is None or same_bits(dst, seen["grad_rows"])
    return out


# ------------------------------------------------------------------ shard(model, policy)

def under_policy(rank: int, out: dict) -> None:
    """shard(model, POLICY) and two training steps; each module's compute dtypes are seen by
    this script's own hooks: the weight and input dtypes as its forward starts (after FSDP has
    gathered and cast), its output's before FSDP casts it back."""
    from mpviz.fsdp import shard
    from mpviz.recording.sharded import fsdp_units

    model = make_model()
    plan = shard(model, POLICY)
    out["plan"] = [str(u) for u in plan]
    seen: dict[str, dict] = {}

    def pre(name):
        def hook(mod, args):
            w = mod._parameters.get("weight")
            seen.setdefault(name, {}).update(
                input=str(args[0].dtype).removeprefix("torch."),
                weight=None if w is None else str(w.dtype).removeprefix("torch."))
        return hook

    def post(name):
        def hook(mod, args, output):
            seen[name]["output"] = str(output.dtype).removeprefix("torch.")
        return hook

    for name, mod in model.named_modules():
        if next(mod.children(), None) is None:  # leaves: where the arithmetic is
            mod.register_forward_pre_hook(pre(name))
            mod.register_forward_hook(post(name), prepend=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in batches(rank)[:2]:
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    out["policy"] = {"leaves": seen, "losses": losses,
                     "units": [u.__dict__ | {"modules": list(u.modules), "params": list(u.params)}
                               for u in fsdp_units(model)]}


# ------------------------------------------------------------------ launch

def torchrun(out_dir: Path, timeout: float = 180) -> list[dict]:
    """Run this script as a 2-rank torchrun job writing to ``out_dir``; each rank's report."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, str(out_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rank": rank, "world_size": dist.get_world_size()}
    plain = train(rank, False, {})
    watched = train(rank, True, out)
    out["identical"] = len(plain) == len(watched) and all(
        same_bits(a, b) for a, b in zip(plain, watched))
    under_policy(rank, out)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
