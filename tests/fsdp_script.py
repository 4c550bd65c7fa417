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
import math
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
RECORD_EVERY = 2  # the Recorder's statistics steps: 0, 2, 4
CLIP = 0.5  # below every finite gradient norm here: clipping changes every step's gradients
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


def fsdp_model(param_dtype: torch.dtype = torch.bfloat16) -> Model:
    """Per-block fully_shard, then the root: bf16 compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
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

def train(rank: int, mode: str, out: dict, run_dir: Path | None = None) -> list[torch.Tensor]:
    """STEPS steps. ``mode``: "plain" (no mpviz), "hooks" (mpviz's standalone FSDP hooks and
    statistics, and this script's references), "recorder" (``mpviz.Recorder`` as a user
    attaches it, every RECORD_EVERY steps, and this script's references). Gradients are clipped;
    a step whose gradient norm is not finite updates nothing. Returns the final local shards of
    the parameters and of AdamW's state."""
    from torch.distributed.tensor import DTensor

    from mpviz.recording.fsdp_hooks import LocalGradCheck, ReducedGrads
    from mpviz.recording.sharded import fsdp_units, sharded_stats

    model = fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    seen: dict = {}
    step_of = [0]
    watched = mode == "hooks"

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
    rec = None
    if watched:
        out["hooks_before"] = hook_count(model)
        # rank 1 takes the accelerator's path (max |g| kept on the device, read at the end)
        check = LocalGradCheck(model, on_host=False if rank == BAD_RANK else None).attach()
        hooks = [check, ReducedGrads(model, at_end_of_backward).attach()]
        out.update(stats={}, local_bad=[], reference_bad={}, reduced=[])
        out["units"] = [u.__dict__ | {"modules": list(u.modules), "params": list(u.params)}
                        for u in fsdp_units(model)]
        out["param_names"] = names
    if mode == "recorder":
        import mpviz

        rec = mpviz.Recorder(model, opt, run_dir=run_dir, every=RECORD_EVERY)
        rec.attach()
        if rank == BAD_RANK:  # the local check's accelerator path (max |g| kept, read at the end)
            rec._origin.check.on_host = False
        out.update(references={}, reference_bad={}, clip_norms=[], units=[
            [u.modules, u.param_dtype, u.reduce_dtype, u.output_dtype, u.storage_dtype]
            for u in fsdp_units(model)])
    for step, (x, y) in enumerate(batches(rank)):
        step_of[0] = step
        if mode != "plain" and step in (BAD_STEP, BACKWARD_BAD_STEP):  # every rank gathers
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
        if rec is not None and step % RECORD_EVERY == 0:  # what the optimizer will see
            out["references"][step] = layer_references(model)
        norm = nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if rec is not None:
            out["clip_norms"].append(float(norm))
        if not torch.isfinite(norm):
            opt.zero_grad()  # nothing to update (the optimizer still steps: one step each)
        opt.step()
        opt.zero_grad()
        if rec is not None:
            rec.step(loss)
    for h in hooks:
        h.remove()
    if watched:
        out["hooks_after_remove"] = hook_count(model)
        out["hooks_fresh"] = hook_count(fsdp_model())
    if rec is not None:
        rec.close()
        out["recorder_errors"] = rec.errors
        out["hooks_after_close"] = hook_count(model)
    return final_state(model, opt)


def final_state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The local shards of the parameters and of the optimizer's state."""
    from torch.distributed.tensor import DTensor

    state = [p.to_local().clone() for p in model.parameters()]
    for s in opt.state.values():
        state += [v.to_local().clone() if isinstance(v, DTensor) else v.clone()
                  for v in s.values() if isinstance(v, torch.Tensor)]
    return state


def layer_references(model: nn.Module, scale: float = 1.0) -> dict:
    """Each layer's gradient (divided by ``scale``) and weight statistics over its parameters,
    from the gathered tensors (``DTensor.full_tensor()``), in float64 numpy: norm, elements,
    zeros, non-finite. A parameter's layer is the module that holds it."""
    out: dict = {"grad": {}, "weight": {}}
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        for kind, t in (("grad", p.grad), ("weight", p)):
            if t is None:
                continue
            a = t.full_tensor().detach().float().numpy().astype(np.float64).reshape(-1)
            if kind == "grad":
                a = a / scale
            acc = out[kind].setdefault(layer, {"sumsq": 0.0, "numel": 0, "zeros": 0,
                                               "nonfinite": 0})
            acc["sumsq"] += float(np.sum(a * a))
            acc["numel"] += a.size
            acc["zeros"] += int((a == 0).sum())
            acc["nonfinite"] += int((~np.isfinite(a)).sum())
    for kind in out.values():
        for acc in kind.values():
            acc["norm"] = math.sqrt(acc.pop("sumsq"))
    return out


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

def under_policy(rank: int, out: dict, run_dir: Path) -> None:
    """shard(model, POLICY) and two training steps, recorded (statistics on rank 1 only); each
    module's compute dtypes are seen by this script's own hooks: the weight and input dtypes as
    its forward starts (after FSDP has gathered and cast), its output's before FSDP casts it
    back."""
    import mpviz
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
    with mpviz.Recorder(model, opt, run_dir=run_dir, every=1, stats_ranks=[1]) as rec:
        for x, y in batches(rank)[:2]:
            loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            rec.step(loss)
    out["policy"] = {"leaves": seen, "losses": losses, "recorder_errors": rec.errors,
                     "units": [u.__dict__ | {"modules": list(u.modules), "params": list(u.params)}
                               for u in fsdp_units(model)]}


# ------------------------------------------------------------------ the recorder, more

def with_scaler(rank: int, kind: str, run_dir: Path) -> dict:
    """fp16 compute under a GradScaler (torch.amp's, or FSDP's ShardedGradScaler, recorded on
    the accelerator's path), recorded; rank 1's inf at BAD_STEP makes both ranks skip. The scale
    used and whether each step was skipped, as the scaler says, and the references of the
    unscaled gradients."""
    import mpviz
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    model = fsdp_model(torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if kind == "amp" else
              ShardedGradScaler(device="cpu", init_scale=2.0 ** 10))
    out: dict = {"scale": [], "skipped": [], "references": {}}
    with mpviz.Recorder(model, opt, scaler=scaler, run_dir=run_dir, every=RECORD_EVERY) as rec:
        if kind == "sharded":  # the accelerator's path: statistics kept as a device tensor
            rec._grads.on_host = False
        for step, (x, y) in enumerate(batches(rank)):
            loss = loss_of(model, x, y)
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            if step % RECORD_EVERY == 0:
                out["references"][step] = layer_references(model, scale)
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            out["scale"].append(scale)
            out["skipped"].append(scaler.get_scale() < scale)
            rec.step(loss)
    out["recorder_errors"] = rec.errors
    return out


def failing(rank: int, run_dir: Path) -> dict:
    """Every step a statistics step; on rank 1 mpviz's own gradient read fails from step 1 on
    and its shards' statistics from step 3 on (injected): the errors are recorded, training
    goes on, and no rank waits for a collective the other does not join."""
    import mpviz

    model = fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = mpviz.Recorder(model, opt, run_dir=run_dir, every=1).attach()
    if rank == BAD_RANK:
        grads = rec._grads
        read, local = grads.read, grads.sharded._local

        def failing_read(*a, **k):
            if rec._state.index >= 1:
                raise RuntimeError("injected: reading the gradients failed")
            return read(*a, **k)

        def failing_local(*a, **k):
            if rec._state.index >= 3:
                raise RuntimeError("injected: the shards' statistics failed")
            return local(*a, **k)

        grads.read, grads.sharded._local = failing_read, failing_local
    steps = 0
    for x, y in batches(0)[:5]:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        rec.step()
        steps += 1
    rec.close()
    return {"steps": steps, "errors": [e["part"] for e in rec.errors]}


def all_hooks(model: nn.Module) -> int:
    return sum(len(getattr(m, a)) for m in model.modules() for a in (
        "_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")) + \
        sum(len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
            for p in model.parameters())


def refusals(out_dir: Path) -> dict:
    """FSDP1 (FullyShardedDataParallel), and under FSDP2 a measured statistics budget, a
    precision policy or an fp32 shadow of a unit: refused at attach, nothing left on the model
    (nor on disk, but for the shadow's run, marked failed), and it trains as before."""
    import mpviz
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = fsdp_model()
    try:
        mpviz.Recorder(model, run_dir=out_dir / "budget", stats_budget=0.05).attach()
        budget = "attached"
    except ValueError as e:
        budget = str(e)
    try:
        mpviz.Recorder(model, run_dir=out_dir / "with_policy", policy={"head": "fp32"}).attach()
        policy = "attached"
    except ValueError as e:
        policy = str(e)
    try:
        mpviz.Recorder(model, run_dir=out_dir / "shadow", shadow=["blocks.1"]).attach()
        shadow = "attached"
    except ValueError as e:
        shadow = str(e)
    budget_left = {"run_created": (out_dir / "budget").exists() or
                   (out_dir / "with_policy").exists(),
                   "hooks": all_hooks(model), "fresh_hooks": all_hooks(fsdp_model())}

    model = FullyShardedDataParallel(make_model(), use_orig_params=True,
                                     device_id=torch.device("cpu"))
    before = all_hooks(model)
    try:
        mpviz.Recorder(model, run_dir=out_dir / "fsdp1").attach()
        message = "attached"
    except NotImplementedError as e:
        message = str(e)
    x, y = batches(0)[0]
    loss_of(model, x, y).backward()
    return {"message": message, "run_created": (out_dir / "fsdp1").exists(),
            "hooks_unchanged": all_hooks(model) == before,
            "trains": all(p.grad is not None for p in model.parameters() if p.numel()),
            "budget": budget, "policy": policy, "shadow": shadow, "budget_left": budget_left}


def lightning_run(rank: int, run_dir: Path) -> dict | None:
    """Lightning's ModelParallelStrategy (FSDP2 in ``configure_model``) on the CPU, recorded by
    mpviz's Lightning callback; references of the gradients the optimizer will see, taken in
    ``on_before_optimizer_step`` (before Lightning would clip). None without Lightning."""
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:
        return None
    from mpviz.integrations.lightning import MpvizCallback

    out: dict = {"references": {}}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            mesh = self.device_mesh["data_parallel"]
            for b in self.net.blocks:
                fully_shard(b, mesh=mesh, mp_policy=mp)
            fully_shard(self.net, mesh=mesh, mp_policy=mp)

        def training_step(self, batch: tuple, i: int) -> torch.Tensor:
            return loss_of(self.net, *batch)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            if self.trainer.global_step % RECORD_EVERY == 0:
                out["references"][self.trainer.global_step] = layer_references(self)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    data = batches(rank)[:4]
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=len(data),
                         strategy=ModelParallelStrategy(data_parallel_size=2,
                                                        tensor_parallel_size=1),
                         callbacks=[MpvizCallback(run_dir=run_dir, every=RECORD_EVERY)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=None))
    return out


# ------------------------------------------------------------------ launch

def torchrun(out_dir: Path, timeout: float = 180) -> list[dict]:
    """Run this script as a 2-rank torchrun job writing to ``out_dir``; each rank's report."""
    from helpers.distributed import torchrun as launch

    return launch(__file__, out_dir, timeout)


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rank": rank, "world_size": dist.get_world_size()}
    plain = train(rank, "plain", {})
    watched = train(rank, "hooks", out)
    out["identical"] = len(plain) == len(watched) and all(
        same_bits(a, b) for a, b in zip(plain, watched))
    out["recorder"] = {}
    recorded = train(rank, "recorder", out["recorder"], out_dir / "run")
    out["recorder"]["identical"] = len(plain) == len(recorded) and all(
        same_bits(a, b) for a, b in zip(plain, recorded))
    under_policy(rank, out, out_dir / "policy")
    out["scalers"] = {kind: with_scaler(rank, kind, out_dir / kind) for kind in ("amp", "sharded")}
    out["failing"] = failing(rank, out_dir / "failing")
    out["fsdp1"] = refusals(out_dir)
    out["lightning"] = lightning_run(rank, out_dir / "lightning")  # last: it sets global state
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
