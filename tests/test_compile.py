"""torch.compile: a compiled model is recorded as completely as an eager one, and mpviz changes
nothing in what it computes.

Each case trains the same model on the same data twice, compiled both times: plain, and with a
Recorder attached before compiling (``torch.compile(model)`` or ``model.compile()`` after attach)
or after (nanoGPT's order: ``Recorder(torch.compile(model))``). Checked: bit-identical
parameters, buffers, optimizer and GradScaler state; no graph break added (dynamo's own
counters) and at most one extra compiled graph; layers under the user's own names; per-layer
output dtypes as an eager forward of the same model shows them; per-layer gradient norms as
backward produced them (unscaled, before the loop's clipping), recomputed here from the plain
run's ``.grad``.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mpviz
from helpers.training import optimizer_step
from models import first_float

STEPS = 3
CLIP = 0.05  # small enough that clipping changes every gradient


def _seq() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 32),
                         nn.LayerNorm(32), nn.Linear(32, 4))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=16, bos_token_id=0, eos_token_id=0))


class MLP(nn.Module):
    """A model of the user's own (``model.compile()`` compiles a bare ``nn.Sequential`` only
    when it has hooks, in torch 2.13: its plain twin would run eagerly)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _seq()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = {"seq": _seq, "gpt2": _gpt2, "mlp": MLP}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _batches(name: str) -> list[Any]:
    g = torch.Generator().manual_seed(1)
    if name == "gpt2":
        ids = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(STEPS)]
        return [{"input_ids": i, "labels": i} for i in ids]
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(STEPS)]


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def _grad_norms(model: nn.Module, scale: float) -> dict[str, float]:
    """Each layer's unscaled gradient norm over its own parameters, in float64."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = name.rpartition(".")[0]
            sq[layer] = sq.get(layer, 0.0) + float((p.grad.double() / scale).pow(2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


# Not record_demo: compiled models in each attach order, against plain compiled runs.
def _train(name: str, precision: str, order: str, run_dir: Path | None = None) -> dict:
    """``order``: "plain" / "plain-inplace" (no mpviz), "before" (attach, then torch.compile),
    "inplace" (attach, then model.compile()), "after" (torch.compile, then attach)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if precision == "fp16" else None
    rec = None
    if order in ("before", "inplace"):
        rec = mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=run_dir, every=1).attach()
    if order in ("inplace", "plain-inplace"):
        model.compile()
        compiled = model
    else:
        compiled = torch.compile(model)
    if order == "after":
        rec = mpviz.Recorder(compiled, optimizer=opt, scaler=scaler, run_dir=run_dir,
                             every=1).attach()
    norms = []
    torch.manual_seed(1)  # dropout's stream
    try:
        for batch in _batches(name):
            with torch.autocast("cpu", dtype=DTYPES[precision]):
                loss = _loss(compiled, batch)
            if scaler is not None:
                scaler.scale(loss).backward()
                norms.append(_grad_norms(model, scaler.get_scale()))
                scaler.unscale_(opt)
            else:
                loss.backward()
                norms.append(_grad_norms(model, 1.0))
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer_step(opt, scaler)
            if rec is not None:
                rec.step(loss=loss)
    finally:
        if rec is not None:
            rec.close()
    counters = torch._dynamo.utils.counters
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "norms": norms, "breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"], "names": [n for n, _ in model.named_modules()]}


@functools.cache
def _plain(name: str, precision: str, inplace: bool) -> dict:
    return _train(name, precision, "plain-inplace" if inplace else "plain")


def _eager_dtypes(name: str, precision: str) -> dict[str, str]:
    """Output dtype of each layer in an eager forward of the same model (our own hooks)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    seen: dict[str, str] = {}

    def hook(n: str):
        def h(m: nn.Module, a: Any, out: Any) -> None:
            t = first_float(out)
            if t is not None:
                seen[n] = str(t.dtype).replace("torch.", "")
        return h

    for n, m in model.named_modules():
        m.register_forward_hook(hook(n))
    with torch.autocast("cpu", dtype=DTYPES[precision]):
        _loss(model, _batches(name)[0])
    return seen


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name,precision,order", [
    ("seq", "bf16", "before"), ("seq", "fp16", "after"), ("mlp", "bf16", "inplace"),
    ("gpt2", "bf16", "after"), ("gpt2", "fp16", "before"),
])
def test_compiled_training_is_bit_identical_and_recorded_by_the_users_names(
        tmp_path, name, precision, order):
    plain = _plain(name, precision, order == "inplace")
    rec = _train(name, precision, order, tmp_path / "r")
    # mpviz only observes, and compile keeps what it was for
    assert _same(rec["params"], plain["params"]), "parameters and buffers"
    assert _same(rec["opt"], plain["opt"]), "optimizer state"
    assert _same(rec["scaler"], plain["scaler"]), "GradScaler state"
    assert rec["breaks"] == plain["breaks"], "mpviz added graph breaks"
    extra = 1 if order in ("before", "inplace") else 0  # the first step's watch hooks (see docs)
    assert plain["graphs"] <= rec["graphs"] <= plain["graphs"] + extra

    run = mpviz.load_run(tmp_path / "r")
    assert run.meta["status"] == "finished" and not run.meta.get("recorder_errors")
    assert run.steps["step"].tolist() == list(range(STEPS))
    assert run.layers["layer"].tolist() == plain["names"]  # the user's names, no "_orig_mod"
    # output dtypes: the last recorded per layer, as an eager forward shows them
    d = run.dtypes[run.dtypes.tensor == "output"].groupby("layer")["dtype"].last().to_dict()
    assert d == _eager_dtypes(name, precision)
    assert precision_name(d) == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    # gradient norms: unscaled and before clipping, every step
    st = run.layer_stats
    g = st[st.tensor == "grad"]
    for step, ref in enumerate(plain["norms"]):
        got = g[g.step == step].set_index("layer")["norm"].to_dict()
        assert got.keys() == ref.keys()
        assert got == pytest.approx(ref, rel=1e-5)
        assert math.sqrt(sum(v * v for v in got.values())) > 2 * CLIP  # not the clipped ones
    # activations of every layer with weights, every step
    acts = st[st.tensor == "activation"]
    weighted = {n.rpartition(".")[0] for n in rec["params"] if n.endswith("weight")}
    for step in range(STEPS):
        assert weighted <= set(acts[acts.step == step]["layer"])


def precision_name(dtypes: dict[str, str]) -> str:
    """The low-precision dtype the Linear layers' outputs ran in."""
    low = {v for v in dtypes.values() if v in ("bfloat16", "float16")}
    assert len(low) == 1, dtypes
    return low.pop()


def test_a_shadow_asked_of_a_compiled_model_is_refused_aloud(tmp_path):
    """The fp32 shadow needs hooks inside the layers: on a compiled model it says so (a warning
    and run.meta) rather than recording nothing silently."""
    model = _seq()
    with pytest.warns(RuntimeWarning, match="shadow= is not recorded on a compiled model"):
        rec = mpviz.Recorder(torch.compile(model), run_dir=tmp_path / "r", shadow=["0"]).attach()
    rec.close()
    assert "compiled" in mpviz.load_run(tmp_path / "r").meta["shadow_unavailable"]


def test_a_policy_changed_while_a_compiled_model_trains_is_recorded_and_honoured(tmp_path):
    """``rec.set_precision`` on a compiled model: the change is in run.policy_changes, the layer's
    recorded output dtype follows it, and nothing breaks the graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = _seq()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with mpviz.Recorder(torch.compile(model), optimizer=opt, run_dir=tmp_path / "r", every=1,
                        policy={"*": "bf16"}) as rec:
        for step, batch in enumerate(_batches("seq") * 2):
            if step == 2:
                rec.set_precision({"3": "fp32"})
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(rec.model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    run = mpviz.load_run(tmp_path / "r")
    assert not run.meta.get("recorder_errors")
    ch = run.policy_changes
    assert ch[(ch.layer == "3") & (ch.precision == "fp32")]["step"].tolist() == [2]
    d = run.dtypes.query("layer == '3' and tensor == 'output'").set_index("step")["dtype"]
    assert d.loc[:1].tolist()[-1] == "bfloat16" and d.loc[2:].tolist()[-1] == "float32"


def test_evaluate_and_memory_report_of_a_compiled_model_are_those_of_the_eager_one():
    """By your layer names and with the same numbers as the model itself (nothing compiles)."""
    torch.manual_seed(0)
    model = _seq().eval()
    data = _batches("seq")
    eager = mpviz.evaluate(model, data, precisions=["fp32", "bf16"])
    compiled = mpviz.evaluate(torch.compile(model), data, precisions=["fp32", "bf16"])
    assert compiled.summary.equals(eager.summary)
    assert compiled.layers.equals(eager.layers) and "_orig_mod" not in "".join(compiled.layers.layer)
    x = data[0][0]
    assert mpviz.memory_report(torch.compile(model), {"*": "bf16"}, x).equals(
        mpviz.memory_report(model, {"*": "bf16"}, x))
