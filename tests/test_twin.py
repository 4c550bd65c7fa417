"""The twin test: mpviz only observes.

Same seed, same data, N steps, three arms: (a) plain, (b) with ``mpviz.Recorder``, (c) with a
Recorder and a ``policy=`` equal to the outer autocast. Afterwards parameters, gradients,
buffers, optimizer state and GradScaler state must be bit-identical between (a) and (b) and
between (a) and (c), and so must every loss and evaluation output along the way. The recorded
values are checked against this file's own hooks: losses, unscaled gradient norms per layer,
output dtypes per layer, loss scales and skipped steps.

The matrix is model family x training recipe (``CELLS``); ``works_with_table()`` renders it as
the README's "works with" table (``python tests/test_twin.py`` prints it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mpviz
from models import SPECS, Spec, first_float

STEPS = 4  # optimizer steps per arm
SAMPLES = 2  # passed to rec.step() per micro-batch

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


# ---------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """How the training loop is written."""

    name: str
    doc: str
    dtype: torch.dtype | None = None  # autocast dtype; None: fp32, no autocast
    scaler: str = "none"              # "none", "off" (GradScaler(enabled=False)) or "on"
    init_scale: float = 2.0 ** 16
    backoff: float = 0.5
    accum: int = 1                    # micro-batches per optimizer step (rec.step() after each)
    closure: bool = False             # SGD + optimizer.step(closure)
    set_to_none: bool = True          # opt.zero_grad(set_to_none=...)
    eval_between: bool = False        # model.eval() + no_grad forward after each step
    inf_at: int | None = None         # optimizer step whose input holds an inf

    @property
    def policy(self) -> dict[str, str]:
        """The per-layer policy equal to this recipe's outer autocast."""
        return {"*": {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]}


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("fp32", "fp32 with `GradScaler(enabled=False)`", scaler="off"),
    Recipe("fp16", "fp16 autocast + `GradScaler`", torch.float16, scaler="on"),
    Recipe("bf16", "bf16 autocast, no scaler", torch.bfloat16),
    Recipe("accum", "fp16 + `GradScaler`, 2 micro-batches per optimizer step", torch.float16,
           scaler="on", accum=2),
    Recipe("closure", "fp32, SGD `optimizer.step(closure)`", closure=True),
    Recipe("keep_grads", "fp16 + `GradScaler`, `zero_grad(set_to_none=False)`", torch.float16,
           scaler="on", set_to_none=False),
    Recipe("eval", "bf16, a `model.eval()` + `torch.no_grad()` forward between steps",
           torch.bfloat16, eval_between=True),
    Recipe("overflow", "fp16 + `GradScaler(init_scale=2**40)`: the first steps overflow and "
           "are skipped", torch.float16, scaler="on", init_scale=2.0 ** 40, backoff=2.0 ** -16),
    Recipe("inf_input", "fp32, an inf in one step's input (forward replayed)", inf_at=1),
]}

# model -> recipes. Every model runs fp16 + GradScaler and at least one more recipe; every
# recipe runs on at least one Hugging Face model and on the hand-made one.
CELLS: dict[str, list[str]] = {
    "gpt2": ["fp16", "fp32", "accum"],
    "bert": ["fp16", "bf16", "keep_grads"],
    "resnet": ["fp16", "overflow", "inf_input", "eval"],
    "t5": ["fp16", "closure"],
    "transformer": ["fp16", "bf16", "eval"],
    "toy": list(RECIPES),
}
HF = {"gpt2", "bert", "resnet", "t5"}


# ---------------------------------------------------------------- one arm
@dataclass
class Arm:
    """What one arm left behind, and what this file's own hooks saw along the way."""

    state: dict[str, Any]
    losses: list[float] = field(default_factory=list)            # per optimizer step
    grad_norms: list[dict[str, float]] = field(default_factory=list)  # layer -> unscaled norm
    scales: list[float | None] = field(default_factory=list)     # loss scale of the backward
    skipped: list[bool] = field(default_factory=list)            # the scaler skipped the step
    out_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # last training forward
    evals: list[torch.Tensor] = field(default_factory=list)
    run_dir: Path | None = None
    every: int = 1


def layer_grad_norms(model: nn.Module, scale: float) -> dict[str, float]:
    """Each layer's unscaled gradient norm over the parameters it owns (a tied parameter
    belongs to the module ``named_parameters()`` names it after), in float64."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = name.rpartition(".")[0]
            sq[layer] = sq.get(layer, 0.0) + float((p.grad.detach().double() / scale).pow(2).sum())
    return {layer: math.sqrt(v) for layer, v in sq.items()}


# Not record_demo: every model family x recipe of the matrix, each arm with and without mpviz.
def train(spec: Spec, recipe: Recipe, run_dir: Path | None = None, every: int = 1,
          policy: dict[str, str] | None = None) -> Arm:
    """Train ``STEPS`` optimizer steps; with ``run_dir``, under an mpviz.Recorder."""
    model = spec.build()
    if recipe.closure:
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = None
    if recipe.scaler != "none":
        scaler = torch.amp.GradScaler("cpu", enabled=recipe.scaler == "on",
                                      init_scale=recipe.init_scale, backoff_factor=recipe.backoff)
    batches = spec.batches(STEPS * recipe.accum, seed=1)
    if recipe.inf_at is not None:
        assert spec.image_key is not None, f"{spec.name} has no float input to put an inf in"
        batches[recipe.inf_at * recipe.accum][spec.image_key].view(-1)[0] = float("inf")
    eval_batch = spec.batches(1, seed=2)[0]
    arm = Arm(state={}, run_dir=run_dir, every=every)

    def dtype_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = first_float(output)
            if t is not None and torch.is_grad_enabled():
                arm.out_dtypes[name] = t.dtype
        return hook

    handles = [m.register_forward_hook(dtype_hook(n)) for n, m in model.named_modules()]
    autocast = dict(device_type="cpu", dtype=recipe.dtype or torch.float32,
                    enabled=recipe.dtype is not None)
    scaling = scaler is not None and scaler.is_enabled()

    backward: dict[str, Any] = {}  # what the step's last backward left

    def forward_backward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        arm.out_dtypes.clear()
        with torch.autocast(**autocast):
            loss = spec.loss(model, batch)
        part = loss if recipe.accum == 1 else loss / recipe.accum
        (scaler.scale(part) if scaler is not None else part).backward()
        scale = scaler.get_scale() if scaling else 1.0
        backward.update(norms=layer_grad_norms(model, scale), scale=scale if scaling else None)
        return loss

    # The training RNG stream (dropout) starts here, before mpviz attaches: if attaching or
    # recording draws random numbers, the twins part.
    torch.manual_seed(1)
    rec = None
    if run_dir is not None:
        rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=run_dir, every=every,
                             policy=policy).attach()
    try:
        for step in range(STEPS):
            skipped, losses = False, []
            for micro in range(recipe.accum):
                batch = batches[step * recipe.accum + micro]
                last = micro == recipe.accum - 1
                if recipe.closure:
                    def closure() -> torch.Tensor:
                        opt.zero_grad()
                        return forward_backward(batch)
                    loss = opt.step(closure)
                else:
                    loss = forward_backward(batch)
                    if last and scaler is not None:
                        before = scaler.get_scale()
                        scaler.step(opt)
                        scaler.update()
                        skipped = scaling and scaler.get_scale() < before
                    elif last:
                        opt.step()
                    if last:
                        opt.zero_grad(set_to_none=recipe.set_to_none)
                losses.append(loss.item())
                if rec is not None:
                    rec.step(loss=loss, samples=SAMPLES)  # after every micro-batch
            # One recorded step per optimizer step: its micro-batches' mean loss, the
            # gradients and loss scale of its last backward.
            arm.losses.append(sum(losses) / len(losses))
            arm.skipped.append(bool(skipped))
            arm.grad_norms.append(backward["norms"])
            arm.scales.append(backward["scale"])
            if recipe.eval_between:
                model.eval()
                with torch.no_grad(), torch.autocast(**autocast):
                    arm.evals.append(spec.loss(model, eval_batch).detach().clone())
                model.train()
    finally:
        if rec is not None:
            rec.close()
        for h in handles:
            h.remove()
    arm.state = snapshot(model, opt, scaler)
    return arm


# ---------------------------------------------------------------- bit-exact comparison
def snapshot(model: nn.Module, opt: torch.optim.Optimizer, scaler: Any) -> dict[str, Any]:
    """Every parameter, gradient, buffer, optimizer-state and scaler-state value, by name."""
    out: dict[str, Any] = {}
    for n, p in model.named_parameters():
        out[f"param {n}"] = p.detach().clone()
        out[f"grad {n}"] = None if p.grad is None else p.grad.detach().clone()
    for n, b in model.named_buffers():
        out[f"buffer {n}"] = b.detach().clone()
    _flatten(opt.state_dict(), "optimizer", out)
    if scaler is not None:
        _flatten(scaler.state_dict(), "scaler", out)
    return out


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, torch.Tensor)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = obj.detach().clone() if isinstance(obj, torch.Tensor) else obj


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.is_floating_point() else t


def same(a: Any, b: Any) -> bool:
    """Bit-identical tensors (NaN positions and payloads included), equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _describe(a: Any, b: Any) -> str:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype:
        x, y = a.double(), b.double()
        differ = ~((x == y) | (x.isnan() & y.isnan()))
        d = (x - y).abs()[differ]
        return (f"{int(differ.sum())}/{a.numel()} elements differ, max |diff| "
                f"{float(d.max()) if d.numel() else 0:.3g}")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    return f"{a!r} vs {b!r}"


def _same_norms(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names (in order) whose values are not bit-identical, each with what differs."""
    out = []
    for name in dict.fromkeys([*a, *b]):
        if name not in a or name not in b:
            out.append(f"{name}: only in {'the plain arm' if name in a else 'the mpviz arm'}")
        elif not same(a[name], b[name]):
            out.append(f"{name}: {_describe(a[name], b[name])}")
    return out


# ---------------------------------------------------------------- records vs own hooks
def _close(recorded: float, mine: float) -> bool:
    if math.isnan(mine):
        return math.isnan(recorded)
    if math.isinf(mine) or mine > 1e30:
        return math.isinf(recorded) or math.isclose(recorded, mine, rel_tol=1e-4)
    return math.isclose(recorded, mine, rel_tol=1e-4, abs_tol=1e-30)


def record_problems(arm: Arm, recipe: Recipe) -> list[str]:
    """Where the recorded run disagrees with what this file's hooks saw."""
    assert arm.run_dir is not None
    run = mpviz.load_run(arm.run_dir)
    problems: list[str] = []
    steps = run.steps
    n = len(arm.losses)
    if list(steps["step"]) != list(range(n)):
        return [f"steps recorded {list(steps['step'])}, expected 0..{n - 1}"]
    for s, (got, mine) in enumerate(zip(steps["loss"], arm.losses)):
        if not (got == mine or (math.isnan(got) and math.isnan(mine))):
            problems.append(f"step {s}: loss recorded {got!r}, computed {mine!r}")
    if list(steps["samples"]) != [SAMPLES * recipe.accum] * n:
        problems.append(f"samples recorded {list(steps['samples'])}, passed "
                        f"{SAMPLES * recipe.accum} per step")
    if list(steps["skipped"]) != arm.skipped:
        problems.append(f"skipped recorded {list(steps['skipped'])}, the scaler did {arm.skipped}")
    if recipe.scaler == "on" and list(steps["loss_scale"]) != arm.scales:
        problems.append(f"loss_scale recorded {list(steps['loss_scale'])}, used {arm.scales}")
    over = run.overflows
    for s, skip in enumerate(arm.skipped):
        if skip and not over[(over["step"] == s) & over["skipped"]].shape[0]:
            problems.append(f"step {s} was skipped but run.overflows has no row for it")

    grads = run.layer_stats_since(-1, tensor="grad")
    for s in range(0, n, arm.every):
        mine = arm.grad_norms[s]
        rows = grads[grads["step"] == s]
        got = dict(zip(rows["layer"], rows["norm"].astype(float)))
        if set(got) != set(mine):
            problems.append(f"step {s}: grad rows for layers {sorted(got)}, gradients in "
                            f"{sorted(mine)}")
        bad = [f"{layer!r} {got[layer]:.6g} vs {mine[layer]:.6g}" for layer in mine
               if layer in got and not _close(got[layer], mine[layer])]
        if bad:
            problems.append(f"step {s}: grad norm recorded vs own hook: " + "; ".join(bad[:4]))

    dmap = run.dtype_map()
    got_dt = dmap["output"].dropna().to_dict() if "output" in dmap else {}
    mine_dt = {k: str(v).replace("torch.", "") for k, v in arm.out_dtypes.items()}
    if got_dt != mine_dt:
        keys = sorted(set(got_dt) | set(mine_dt))
        diff = [f"{k!r}: {got_dt.get(k)} vs {mine_dt.get(k)}" for k in keys
                if got_dt.get(k) != mine_dt.get(k)]
        problems.append(f"output dtypes recorded vs own hook: {len(diff)} differ: "
                        + "; ".join(diff[:4]))
    run.close()
    return problems


# ---------------------------------------------------------------- the test
CELL_LIST = [(m, r) for m, rs in CELLS.items() for r in rs]


@pytest.mark.parametrize("model_name,recipe_name", CELL_LIST,
                         ids=[f"{m}-{r}" for m, r in CELL_LIST])
def test_twin(model_name: str, recipe_name: str, tmp_path: Path) -> None:
    spec, recipe = SPECS[model_name], RECIPES[recipe_name]
    plain = train(spec, recipe)
    arms = {
        "Recorder(every=1)": train(spec, recipe, tmp_path / "rec", every=1),
        f"Recorder(every=2, policy={recipe.policy})": train(spec, recipe, tmp_path / "pol",
                                                             every=2, policy=recipe.policy),
    }
    problems = []
    for label, arm in arms.items():
        diff = differences(plain.state, arm.state)
        if diff:
            problems.append(f"{label}: {len(diff)} of {len(plain.state)} state values differ "
                            f"from plain; first: {diff[0]}")
        grad_step = next((i for i, (a, b) in enumerate(zip(plain.grad_norms, arm.grad_norms))
                          if not _same_norms(a, b)), None)
        if grad_step is not None:
            a, b = plain.grad_norms[grad_step], arm.grad_norms[grad_step]
            layers = [k for k in dict.fromkeys([*a, *b]) if not same(a.get(k), b.get(k))]
            problems.append(f"{label}: gradients differ from plain from step {grad_step} in "
                            f"layers {layers[:6]}")
        if not all(same(a, b) for a, b in zip(plain.losses, arm.losses)):
            first = next(i for i, (a, b) in enumerate(zip(plain.losses, arm.losses))
                         if not same(a, b))
            problems.append(f"{label}: loss differs from plain from step {first}: "
                            f"{arm.losses[first]!r} vs {plain.losses[first]!r}")
        if not all(same(a, b) for a, b in zip(plain.evals, arm.evals)):
            problems.append(f"{label}: evaluation outputs differ from plain")
        problems += [f"{label}: {p}" for p in record_problems(arm, recipe)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- README table
def works_with_table() -> str:
    """The README's "works with" table: model families x recipes the twin test covers."""
    cols = list(RECIPES)
    lines = ["| model | " + " | ".join(f"`{c}`" for c in cols) + " |",
             "| --- |" + " :-: |" * len(cols)]
    for m, rs in CELLS.items():
        lines.append(f"| {SPECS[m].family} | "
                     + " | ".join("✓" if c in rs else "" for c in cols) + " |")
    lines.append("")
    lines += [f"- `{r.name}`: {r.doc}" for r in RECIPES.values()]
    return "\n".join(lines)


def test_matrix_covers_every_model_and_recipe() -> None:
    for m, rs in CELLS.items():
        assert "fp16" in rs and len(rs) >= 2, f"{m} needs fp16 + GradScaler and one more recipe"
    for r in RECIPES:
        on = {m for m, rs in CELLS.items() if r in rs}
        assert on & HF and "toy" in on, f"recipe {r} must run on a Hugging Face model and the toy"
    assert any(r in CELLS[m] for m in CELLS if SPECS[m].has_batchnorm and m in HF
               for r in ("overflow", "inf_input"))
    table = works_with_table()
    assert table.count("✓") == len(CELL_LIST)


if __name__ == "__main__":
    print(works_with_table())
