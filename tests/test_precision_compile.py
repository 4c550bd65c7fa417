"""Per-layer precision policies on compiled models (issue #17, torch.compile).

The user's own layer names whatever the compile wrapper; the dtype each layer really runs in
inside the compiled graph, in both orders (compile then apply, apply then compile), with values
against an eager run of the same policy; updates between training steps; removal; and what the
policy costs the compiler: graph breaks and compiled graphs, counted with dynamo's counters.

A 4-layer MLP, batch 8. torch.compile with inductor takes ~5-15 s per graph on a CPU, so there
are few compiles: the two compiled models of the dtype tests are shared (module-scoped), and the
counting tests compile with ``backend="eager"`` (dynamo alone: graph breaks and graphs are
dynamo's, whatever the backend). Dtypes are read with this file's own forward hooks, which
store into a dict with fixed keys (a growing list would make dynamo recompile at every call).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpviz.precision import apply_policy, explain_policy

F = nn.functional
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = ("fc1", "fc2", "fc3", "fc4")
X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    """4 layers and a forward of its own, like most models (nanoGPT, Hugging Face)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.fc4 = (
            nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return self.fc4(x)


def seq_mlp() -> nn.Sequential:
    """The issue's shape: an nn.Sequential whose layer "3" is a Linear."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))


def probe(model: nn.Module) -> dict[str, torch.dtype | None]:
    """The output dtype of each fc layer at the last forward (hooks on the user's modules)."""
    seen: dict[str, torch.dtype | None] = dict.fromkeys(LAYERS)
    for name in LAYERS:
        getattr(model, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    return seen


def counts() -> tuple[int, int]:
    """(graph breaks, compiled graphs) since the counters were last cleared."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", autouse=True)
def one_inductor_thread():
    import torch._inductor.config

    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers
        yield


def fresh_dynamo() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


# ----------------------------------------------------------------------------- names


def test_the_issue_example_and_every_name_are_the_users_whatever_the_compile_wrapper():
    eager = explain_policy(seq_mlp(), {"*": "bf16", "3": "fp32"})
    names = eager["layer"].tolist()
    assert names == ["", "0", "1", "2", "3"]

    in_place = seq_mlp()
    in_place.compile()
    per_block = nn.Sequential(nn.Linear(16, 32), torch.compile(nn.Sequential(nn.ReLU(), nn.Linear(32, 4))))
    for model in (torch.compile(seq_mlp()), in_place):  # torch.compile: no compile until called
        handle = apply_policy(model, {"3": "fp32"})  # issue #17: refused on OptimizedModule
        assert list(handle.effective()) == names and handle.effective()["3"] == ("fp32", "3")
        assert explain_policy(model, {"*": "bf16", "3": "fp32"}).equals(eager)
        with pytest.raises(ValueError) as err:
            handle.update({"33": "fp32"})
        assert "of Sequential" in str(err.value) and "Close matches: '3'" in str(err.value)
        assert "_orig_mod" not in str(err.value) and "OptimizedModule" not in str(err.value)
        handle.remove()
    with apply_policy(per_block, {"1.1": "fp32"}) as handle:  # a block compiled on its own
        assert list(handle.effective()) == ["", "0", "1", "1.0", "1.1"]
        assert handle.effective()["1.1"] == ("fp32", "1.1")


# ----------------------------------------------------------------------------- dtypes

POLICY = {"*": "bf16", "fc2": "fp32", "fc3": "fp8_e4m3", "fc4": "fp32"}
EXPECTED = {"fc1": torch.bfloat16, "fc2": torch.float32, "fc3": torch.float32, "fc4": torch.float32}


@pytest.fixture(scope="module")
def eager_reference():
    model = MLP()
    seen = probe(model)
    with apply_policy(model, POLICY), torch.autocast("cpu", dtype=torch.float16):
        out = model(X)
    return out.detach(), dict(seen)


@pytest.fixture(scope="module", params=["compile, then apply", "apply, then compile"])
def compiled(request):
    """A compiled MLP under POLICY and its probe; compiled (inductor) at its first call. Dynamo
    is reset first: otherwise the second order would run the code compiled for the first
    (their guards pass: the same model, the same hooks), and would not be traced at all."""
    fresh_dynamo()
    model = MLP()
    seen = probe(model)
    if request.param == "compile, then apply":
        compiled = torch.compile(model)
        handle = apply_policy(compiled, POLICY)
    else:
        handle = apply_policy(model, POLICY)
        compiled = torch.compile(model)
    yield compiled, seen
    handle.remove()


def test_each_layer_runs_in_its_policy_dtype_inside_the_compiled_graph(compiled, eager_reference):
    """Under an outer fp16 autocast: fc1 in bf16 (the policy's default), fc2 and fc4 in fp32,
    fc3 in emulated fp8 (computed in fp32); the values are the eager run's, up to inductor's
    rounding (here one bf16 ulp at most)."""
    model, seen = compiled
    ref, ref_dtypes = eager_reference
    assert ref_dtypes == EXPECTED
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(X)
    assert seen == EXPECTED and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- training


def train(model, opt, steps, seen, dtypes):
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(X).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        dtypes.append(seen["fc2"])


def test_an_update_between_steps_recompiles_once_and_remove_restores_the_autocast():
    """bf16 everywhere (as the outer autocast), compiled, 2 steps; fc2 to fp32, 2 steps; the
    policy removed, 1 step. Each new policy compiles one new graph (its backward included), no
    graph breaks; the update is applied while dynamo traces the forward that follows it."""
    fresh_dynamo()
    model = MLP()
    seen = probe(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = apply_policy(model, {"*": "bf16"})
    compiled = torch.compile(model)
    dtypes: list[torch.dtype | None] = []

    train(compiled, opt, 2, seen, dtypes)
    assert counts() == (0, 1)
    handle.update({"fc2": "fp32"})
    assert handle.effective()["fc2"] == ("bf16", "*")  # not before the next forward
    train(compiled, opt, 2, seen, dtypes)
    assert handle.effective()["fc2"] == ("fp32", "fc2")
    assert counts() == (0, 2)
    # Back, applied eagerly between steps (as the recorder's steering does); then fp32 again: the code
    # compiled for each policy is reused (a graph per policy, not per update).
    handle.update({"fc2": None})
    handle.apply_pending()
    train(compiled, opt, 1, seen, dtypes)
    handle.update({"fc2": "fp32"})
    train(compiled, opt, 1, seen, dtypes)
    assert counts() == (0, 2)
    handle.remove()
    train(compiled, opt, 1, seen, dtypes)
    assert counts() == (0, 3)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert dtypes == [bf16, bf16, fp32, fp32, bf16, fp32, bf16]
    assert all(not m._forward_pre_hooks and "forward" not in vars(m) for m in model.modules())


# ----------------------------------------------------------------------------- counts


def compile_and_count(build, policy, outer=torch.bfloat16):
    """(graph breaks, graphs, fc2's dtype, the output's dtype) of one forward and backward of a
    fresh compile, with an outer autocast to ``outer`` (None: no autocast)."""
    fresh_dynamo()
    model, compiled = build()
    seen = probe(model)
    handle = apply_policy(model, policy) if policy is not None else None
    with torch.autocast("cpu", dtype=outer or torch.float32, enabled=outer is not None):
        out = compiled(X)
    out.float().sum().backward()
    if handle is not None:
        handle.remove()
    return (*counts(), seen["fc2"], out.dtype)


def whole(model=None):
    model = model or MLP()
    return model, torch.compile(model, backend="eager")


def in_place():
    model = MLP()
    model.compile(backend="eager")
    return model, model


@pytest.mark.parametrize("build", [whole, in_place], ids=["torch.compile(model)", "model.compile()"])
def test_no_graph_break_and_no_extra_graph_for_a_policy(build):
    """The same model compiled without a policy, with one equal to the outer autocast, with
    fp32 and emulated fp8 layers: no graph break, one graph in every case. fp8's parameter
    swap and rounding (a custom autograd.Function) are traced too."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    none = compile_and_count(build, None)
    assert none == (0, 1, bf16, bf16)
    assert compile_and_count(build, {"*": "bf16"}) == none
    assert compile_and_count(build, {"*": "bf16", "fc2": "fp32"}) == (0, 1, fp32, bf16)
    assert compile_and_count(build, {"fc2": "fp8_e4m3", "fc4": "fp16"}) == (0, 1, fp32, fp16)


def test_a_root_in_fp8_or_outside_autocast_adds_one_small_graph():
    """torch.compile(model) runs the root's hooks outside the model's compiled forward (dynamo
    compiles them as functions of their own): a root in emulated fp8 rounds its inputs there,
    a root in fp16/bf16 outside any autocast casts its outputs back to fp32 there (one small
    graph each), a root in fp32 casts only inputs below 32 bits there (none here)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert compile_and_count(whole, {"*": "fp8_e4m3"}) == (0, 2, fp32, fp32)
    assert compile_and_count(whole, {"*": "bf16"}, outer=None) == (0, 2, bf16, fp32)
    assert compile_and_count(whole, {"*": "fp32"}) == (0, 1, fp32, fp32)


def test_blocks_compiled_one_by_one_share_one_compiled_forward():
    """torchtitan compiles each block alone; with a policy on a layer inside every block, the
    blocks still share their compiled code (dynamo guards on our forward wrapper's function,
    not on each wrapper): as many graphs as without the policy."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    def run(policy):
        fresh_dynamo()
        model = nn.Sequential(*(Block() for _ in range(6)))
        handle = apply_policy(model, policy) if policy else None
        for i in range(len(model)):
            model[i] = torch.compile(model[i], backend="eager")
        seen = {"fc": None}

        def hook(module, args, out):  # one for all blocks, as they share one compiled forward
            seen["fc"] = out.dtype

        for block in model:
            block._orig_mod.fc.register_forward_hook(hook)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(8, 16, requires_grad=True)).float().sum().backward()
        if handle is not None:
            handle.remove()
        return (*counts(), seen["fc"])  # the last block's

    assert run(None) == (0, 1, torch.bfloat16)
    assert run({"*": "bf16", "*.fc": "fp32"}) == (0, 1, torch.float32)
