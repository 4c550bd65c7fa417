"""FSDP2 (fully_shard), started the way users start it: `torchrun --nproc-per-node 2` on gloo/CPU
(tests/fsdp_script.py, launched once for the module). The standalone pieces: sharded statistics
against the gathered tensors, the per-unit dtype report, the local inf/nan check before the
reduce-scatter, the end-of-backward read, bit-identical training, and mpviz.fsdp.shard. The
Recorder on the same job, as a user attaches it and read back with mpviz.load_run per rank:
per-layer statistics of the whole gradients and weights, dtypes, where an inf was born,
bit-identical training, advice kept in fp32, fp16 with both GradScalers, a failure on one rank,
FSDP1 refused, Lightning's ModelParallelStrategy. The plan's rules and refusals are checked
without a process group."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mpviz
from mpviz.fsdp import shard, shard_plan

from fsdp_script import (BACKWARD_BAD_STEP, BAD_RANK, BAD_STEP, CLIP, POLICY, RECORD_EVERY,
                         STATS_STEPS, STEPS, reference_stats, torchrun)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The torchrun job's output folder (one recorded run per sub-folder) and each rank's
    report."""
    out = tmp_path_factory.mktemp("fsdp")
    return out, torchrun(out)


@pytest.fixture(scope="module")
def reports(job):
    return job[1]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_sharded_statistics_are_the_full_tensors(reports):
    """Rows from each rank's shards equal the gathered tensors' (norms to 1e-5, the rest
    exactly), for gradients and weights, also on the step whose gradients are NaN; mpviz.stats
    on the gathered tensors bins them the same; every rank gets the same rows."""
    nan_rows = 0
    for rep in reports:
        assert sorted(map(int, rep["stats"])) == list(STATS_STEPS)
        for step, st in rep["stats"].items():
            for kind in ("grad", "weight"):
                rows, refs = st[kind]["mpviz"], st[kind]["reference"]
                stats_py = st[kind]["stats_py"]
                assert len(rows) == len(refs) == 45
                for got, ref, sp in zip(rows, refs, stats_py):
                    assert got["numel"] == got["sampled"] == ref["numel"] == sp[3] == sp[4]
                    assert got["hist"] == ref["hist"] == sp[5:], (step, kind)
                    assert _same(got["max_abs"], ref["max_abs"]) and got["min_abs_nonzero"] == \
                        ref["min_abs_nonzero"], (step, kind, got, ref)
                    if math.isnan(ref["norm"]):
                        nan_rows += 1
                        assert math.isnan(got["norm"])
                    else:
                        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-5, abs=0)
            for got, ref in zip(st["scaled"]["mpviz"], st["scaled"]["reference"]):
                assert got["hist"] == ref["hist"] and _same(got["max_abs"], ref["max_abs"])
                assert _same(got["norm"], ref["norm"]) or \
                    got["norm"] == pytest.approx(ref["norm"], rel=1e-5)
            assert (st["dst"] is None) == (rep["rank"] != 0) and st["dst_equal"]
    assert nan_rows == 2 * 45  # step 4's gradients, on both ranks
    assert reports[0]["stats"]["2"]["grad"]["mpviz"] == reports[1]["stats"]["2"]["grad"]["mpviz"]


def test_units_report_their_dtypes(reports):
    for rep in reports:
        units = rep["units"]
        assert [u["modules"] for u in units] == [[""], ["blocks.0"], ["blocks.1"], ["blocks.2"]]
        for u in units:
            assert (u["param_dtype"], u["reduce_dtype"], u["output_dtype"], u["storage_dtype"],
                    u["cast_forward_inputs"]) == ("bfloat16", "float32", None, "float32", True)
        names = rep["param_names"]
        assert units[0]["params"] == [n for n in names if not n.startswith("blocks.")]
        for i in range(3):
            assert units[i + 1]["params"] == [n for n in names if n.startswith(f"blocks.{i}.")]
        # under shard(model, POLICY): the fp32 layers are units of their own, outputs cast back
        by_module = {tuple(u["modules"]): u for u in rep["policy"]["units"]}
        for name in ("head", "blocks.1.ln1", "blocks.0.act"):
            u = by_module[(name,)]
            assert (u["param_dtype"], u["reduce_dtype"], u["output_dtype"]) == \
                ("float32", "float32", "bfloat16"), name
        assert by_module[("head",)]["params"] == ["head.weight", "head.bias"]
        assert by_module[("blocks.0.act",)]["params"] == []  # no parameters: inputs cast only
        assert "blocks.1.ln1.weight" not in by_module[("blocks.1",)]["params"]
        assert by_module[("",)]["param_dtype"] == "bfloat16"


def test_local_check_names_the_rank_and_parameters(reports):
    """The pre-reduce-scatter check sees rank 1's own non-finite gradients at steps 1 and 4,
    the parameters a plain bf16 copy of the model says, and nothing on rank 0 (whose gradients
    after the reduce-scatter were NaN too)."""
    r0, r1 = reports
    assert r0["local_bad"] == [[]] * STEPS
    for step in range(STEPS):
        if step in (BACKWARD_BAD_STEP, BAD_STEP):
            assert r1["local_bad"][step] == r1["reference_bad"][str(step)] != []
        else:
            assert r1["local_bad"][step] == []
    assert BAD_RANK == 1 and len(r1["local_bad"][BAD_STEP]) == 45
    # the gradient made inf at blocks.1's output: only the parameters before it
    before = r1["local_bad"][BACKWARD_BAD_STEP]
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
            for n in before} == {"inp", "blocks.0", "blocks.1"}
    assert r0["stats"][str(BAD_STEP)]["grad"]["reference"][0]["norm"] != \
        r0["stats"][str(BAD_STEP)]["grad"]["reference"][0]["norm"]  # NaN on rank 0 as well


def test_end_of_backward_sees_the_final_sharded_gradients(reports):
    for rep in reports:
        assert rep["reduced"] == [True] * STEPS


def test_hooks_leave_training_bit_identical_and_come_off(reports):
    for rep in reports:
        assert rep["identical"]
        fsdp_pre_hooks = 4  # one per unit: FSDP's own
        assert rep["hooks_before"] == rep["hooks_after_remove"] == rep["hooks_fresh"] == \
            [fsdp_pre_hooks, 0, 0]
        assert rep["hooks_during"] == [2 * fsdp_pre_hooks, 45, 45]


def test_shard_keeps_exactly_the_policy_fp32_layers_in_fp32(reports):
    """Each leaf's weight, input and (uncast) output dtypes, seen by the script's own hooks."""
    fp32 = {n for n, p in POLICY.items() if p == "fp32"}
    for rep in reports:
        leaves = rep["policy"]["leaves"]
        assert len(leaves) == 24
        for name, seen in leaves.items():
            want = "float32" if name in fp32 else "bfloat16"
            assert seen["input"] == seen["output"] == want, (name, seen)
            assert seen["weight"] in (want, None), (name, seen)
        assert {n for n, s in leaves.items() if s["output"] == "float32"} == fp32
        assert all(math.isfinite(v) for v in rep["policy"]["losses"])


def _shards_combined(tensors, world=3, **kw):
    """What sharded_stats computes, with the two all-reduces done by hand over ``world``
    dim-0 chunks of each tensor (as FSDP shards them: the last ones may be short or empty)."""
    from mpviz.recording.sharded import combine, local_parts

    parts = [local_parts([_chunk(t, world, r) for t in tensors], [t.numel() for t in tensors], **kw)
             for r in range(world)]
    sums = sum(p[0] for p in parts)
    maxes = torch.stack([p[1] for p in parts]).amax(0)
    return combine(sums, maxes)


def _chunk(t, world, r):
    chunks = torch.chunk(t, world)
    return chunks[r] if r < len(chunks) else t[:0]


def test_partial_reductions_equal_whole_tensor_statistics():
    """Edge cases a training run rarely shows: tiny and huge values (whose float32 squares
    vanish or overflow), zeros, subnormals, inf in one shard and nan in another, a shard that
    is empty, bf16, a loss scale."""
    from mpviz.stats import N_HEAD

    torch.manual_seed(0)
    tensors = [torch.randn(40, 3) * 1e-30, torch.randn(50) * 1e25, torch.zeros(7),
               torch.tensor([0.0, 1e-45, 3e-39, -2.0, 5.0]), torch.randn(30).bfloat16(),
               torch.tensor([1.0, 2.0, float("inf"), 4.0, 5.0, 6.0]),
               torch.tensor([float("nan"), 1.0, -float("inf"), 2.0, 3.0, 0.0]), torch.ones(1)]
    for scaled, div in ((None, 1.0), ((0, len(tensors), 1024.0), 1024.0)):
        rows = _shards_combined(tensors, scaled=scaled)
        for row, t in zip(rows.tolist(), tensors):
            ref = reference_stats(t.float() / div)
            assert row[N_HEAD:] == ref["hist"] and row[3] == row[4] == ref["numel"]
            assert _same(row[1], ref["max_abs"]) and row[2] == ref["min_abs_nonzero"], (t, row[:5])
            assert _same(row[0], ref["norm"]) or row[0] == pytest.approx(ref["norm"], rel=1e-6)
    # sampling: about `sample` elements spread over the shards; norm and max stay exact
    big = torch.randn(10_000)
    row = _shards_combined([big], sample=1000, offset=3)[0].tolist()
    ref = reference_stats(big)
    assert 900 <= row[4] <= 1003 and sum(row[N_HEAD:]) == row[4] and row[3] == 10_000
    assert row[0] == pytest.approx(ref["norm"], rel=1e-6) and row[1] == ref["max_abs"]


# ------------------------------------------------------------------ the Recorder

def _matches(stats, references: dict, what: str) -> None:
    """Recorded layer_stats rows equal the references of the gathered tensors: every layer with
    parameters, its norm to 1e-5 (NaN where the tensors held NaN), element, zero and non-finite
    counts exactly."""
    assert sorted(map(int, references)) == sorted(set(stats["step"])), what
    for step, kinds in references.items():
        for kind, layers in kinds.items():
            got = stats[(stats["step"] == int(step)) & (stats["tensor"] == kind)]
            got = got.set_index("layer")
            assert sorted(got.index) == sorted(layers), (what, step, kind)
            for layer, ref in layers.items():
                row = got.loc[layer]
                where = (what, step, kind, layer)
                assert row["numel"] == ref["numel"], where
                assert round(row["zero_frac"] * row["numel"]) == ref["zeros"], where
                assert row["nonfinite"] == ref["nonfinite"], where
                if math.isnan(ref["norm"]):
                    assert math.isnan(row["norm"]), where
                else:
                    assert row["norm"] == pytest.approx(ref["norm"], rel=1e-5, abs=0), where


def test_recorder_statistics_are_the_whole_gradients_the_optimizer_sees(job):
    """The Recorder's per-layer gradient and weight statistics (every 2 steps, each rank's run)
    equal those of the gathered tensors after the reduce-scatter and before clipping (the clip
    changed every finite step's gradients), on the step whose gradients are NaN too."""
    out, reports = job
    for rep in reports:
        rec = rep["recorder"]
        assert rec["recorder_errors"] == []
        stats = mpviz.load_run(out / "run", rank=rep["rank"]).layer_stats
        _matches(stats[stats["tensor"] != "activation"], rec["references"], "recorder")
        assert sorted(set(stats["step"])) == list(range(0, STEPS, RECORD_EVERY))
        finite = [n for n in rec["clip_norms"] if math.isfinite(n)]
        assert len(finite) == STEPS - 2 and min(finite) > CLIP
        # the layers' norms put together are the clip's total norm (before it clipped)
        for step in (0, 2):
            grads = stats[(stats["step"] == step) & (stats["tensor"] == "grad")]
            total = math.sqrt((grads["norm"] ** 2).sum())
            assert total == pytest.approx(rec["clip_norms"][step], rel=1e-5)
    # both ranks measured the same whole tensors
    a, b = (mpviz.load_run(out / "run", rank=r).layer_stats.query("tensor == 'grad'")
            for r in (0, 1))
    assert a["norm"].tolist()[:10] == b["norm"].tolist()[:10]


def test_recorder_records_the_dtypes_fsdp_computes_in(job):
    """Each layer's weight as it computes (the unit's bf16 param_dtype, not the fp32 storage),
    its inputs and outputs in bf16, its gradients as the optimizer gets them (fp32); per unit,
    run.meta["fsdp_units"] has what fully_shard was given and the storage dtype."""
    out, reports = job
    for rep in reports:
        run = mpviz.load_run(out / "run", rank=rep["rank"])
        units = run.meta["fsdp_units"]
        assert [u["modules"] for u in units] == [[""], ["blocks.0"], ["blocks.1"], ["blocks.2"]]
        for u in units:
            assert (u["param_dtype"], u["reduce_dtype"], u["output_dtype"],
                    u["storage_dtype"]) == ("bfloat16", "float32", None, "float32")
        dtypes = run.dtype_map()
        layers = run.layers.set_index("layer")
        with_params = [n for n in layers.index if layers.loc[n, "n_params"] > 0]
        assert len(with_params) == 24
        for name in with_params:
            assert layers.loc[name, "param_dtype"] == "float32"  # the sharded storage
            assert (dtypes.loc[name, "weight"], dtypes.loc[name, "grad"]) == \
                ("bfloat16", "float32"), name
        leaves = layers.index[layers["is_leaf"]]
        assert len(leaves) == 24
        for name in leaves:
            assert (dtypes.loc[name, "input"], dtypes.loc[name, "output"]) == \
                ("bfloat16", "bfloat16"), name
        assert layers.loc["blocks.1", "type"] == "Block"  # the user's class, not FSDPBlock
        assert run.meta["fsdp"]["replay"].startswith("off")


def test_recorder_names_the_rank_where_an_inf_was_born(job):
    """Rank 1's own gradients went non-finite at steps 1 (an inf gradient at blocks.1's output)
    and 4 (an inf input): its rows there have origin True, for exactly the layers a plain bf16
    copy of the model says. Rank 0 got NaN only through the reduce-scatter: origin False."""
    out, reports = job
    ov = mpviz.load_run(out / "run").overflows
    ov = ov[ov["phase"] == "backward"]
    r0, r1 = ov[ov["rank"] == 0], ov[ov["rank"] == 1]
    assert set(r0["step"]) == set(r1["step"]) == {BACKWARD_BAD_STEP, BAD_STEP}
    assert not r0["origin"].any()
    ref = reports[BAD_RANK]["recorder"]["reference_bad"]
    for step in (BACKWARD_BAD_STEP, BAD_STEP):
        rows = r1[r1["step"] == step]
        want = {n.rpartition(".")[0] for n in ref[str(step)]}
        assert set(rows.loc[rows["origin"], "layer"]) == want, step
    assert len({n.rpartition(".")[0] for n in ref[str(BACKWARD_BAD_STEP)]}) == 15  # inp, 2 blocks
    assert r1["first"].sum() == 2


def test_recorder_leaves_fsdp_training_bit_identical_and_comes_off(reports):
    for rep in reports:
        assert rep["recorder"]["identical"]
        assert rep["recorder"]["hooks_after_close"] == [4, 0, 0]  # FSDP's own pre-hooks only


def test_recorded_dtypes_keep_exactly_the_advised_layers_in_fp32(job):
    """shard(model, POLICY) recorded: each leaf's recorded input, output and weight dtypes are
    those the script's own hooks saw, and exactly the POLICY's fp32 layers ran in fp32. Rank 0
    stores no statistics (stats_ranks=[1]) but joined rank 1's collectives."""
    out, reports = job
    fp32 = {n for n, p in POLICY.items() if p == "fp32"}
    for rep in reports:
        pol = rep["policy"]
        assert pol["recorder_errors"] == []
        run = mpviz.load_run(out / "policy", rank=rep["rank"])
        dtypes = run.dtype_map()
        for name, seen in pol["leaves"].items():
            got = dtypes.loc[name]
            assert (got["input"], got["output"]) == (seen["input"], seen["output"]), name
            if seen["weight"] is not None:
                assert got["weight"] == seen["weight"], name
        assert set(dtypes.index[dtypes["output"] == "float32"]) - {""} == fp32
        units = {u["modules"][0]: u for u in run.meta["fsdp_units"]}
        assert {n for n, u in units.items() if u["param_dtype"] == "float32"} == fp32
        assert all(units[n]["output_dtype"] == "bfloat16" for n in fp32)
        stats = run.layer_stats
        assert (len(stats) > 0) == (rep["rank"] == 1)
    rows = mpviz.load_run(out / "policy", rank=1).layer_stats
    assert sorted(set(rows["step"])) == [0, 1] and rows["norm"].notna().all()


@pytest.mark.parametrize("kind", ["amp", "sharded"])
def test_fp16_with_a_grad_scaler(job, kind):
    """fp16 compute with torch.amp.GradScaler or FSDP's ShardedGradScaler: the loss scale and the
    skipped step (rank 1's inf at step 4 makes both ranks skip) as the scaler had them, and the
    gradients recorded unscaled."""
    out, reports = job
    for rep in reports:
        ref = rep["scalers"][kind]
        assert ref["recorder_errors"] == []
        run = mpviz.load_run(out / kind, rank=rep["rank"])
        steps = run.steps
        assert steps["loss_scale"].tolist() == ref["scale"]
        assert steps["skipped"].tolist() == ref["skipped"] == [s == BAD_STEP for s in range(STEPS)]
        stats = run.layer_stats
        _matches(stats[stats["tensor"] != "activation"], ref["references"], kind)
        dtypes = run.dtype_map()
        assert set(dtypes["weight"].dropna()) == {"float16"}


def test_a_failure_on_one_rank_stops_the_statistics_on_every_rank(job):
    """Rank 1's gradient read fails from step 1 on and its shards' statistics from step 3 on:
    both ranks recorded every step (no rank waited on a collective), both took gradient and
    weight statistics up to step 2 and none after, each says why."""
    out, reports = job
    assert reports[0]["failing"] == {"steps": 5, "errors": ["sharded statistics"]}
    assert reports[1]["failing"] == {"steps": 5, "errors": ["gradients", "sharded statistics"]}
    for r in (0, 1):
        run = mpviz.load_run(out / "failing", rank=r)
        assert run.steps["step"].tolist() == list(range(5))
        stats = run.layer_stats
        for kind in ("grad", "weight"):
            assert sorted(set(stats.loc[stats["tensor"] == kind, "step"])) == [0, 1, 2]
        acts = sorted(set(stats.loc[stats["tensor"] == "activation", "step"]))
        assert acts == ([0] if r == 1 else list(range(5)))
        errors = run.meta["recorder_errors"]
        assert ("failed on 1 other rank" in errors[-1]["error"]) == (r == 0)


def test_fsdp1_and_what_fsdp2_cannot_do_are_refused_at_attach(reports):
    for rep in reports:
        ref = rep["fsdp1"]
        assert ref["message"].startswith("mpviz does not record FSDP1 models")
        assert "fully_shard(" in ref["message"] and "mpviz.fsdp.shard" in ref["message"]
        assert not ref["run_created"] and ref["hooks_unchanged"] and ref["trains"]
        assert "pass every=N" in ref["budget"]
        assert "mpviz.fsdp.shard(model, policy)" in ref["policy"]
        assert "FSDP units ('blocks.1')" in ref["shadow"] and "'blocks.1.*'" in ref["shadow"]
        left = ref["budget_left"]
        assert not left["run_created"] and left["hooks"] == left["fresh_hooks"]


def test_lightning_model_parallel_strategy_is_recorded(job):
    """Lightning's ModelParallelStrategy (FSDP2 in configure_model), mpviz's Lightning callback:
    the whole gradients and weights the optimizer steps with, on both ranks."""
    pytest.importorskip("lightning")
    out, reports = job
    for rep in reports:
        run = mpviz.load_run(out / "lightning", rank=rep["rank"])
        assert run.steps["step"].tolist() == [0, 1, 2, 3]
        assert "recorder_errors" not in run.meta or run.meta["recorder_errors"] == []
        assert len(run.meta["fsdp_units"]) == 4
        stats = run.layer_stats
        _matches(stats[stats["tensor"] != "activation"], rep["lightning"]["references"],
                 "lightning")


# ------------------------------------------------------------------ the plan, no process group

class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.ln(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _plan(model, *args, **kwargs):
    return [(u.modules, u.param_dtype, u.reduce_dtype, u.output_dtype)
            for u in shard_plan(model, *args, **kwargs)]


bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16


def test_plan_blocks_rules_and_defaults():
    net = _Net()
    assert _plan(net) == [(("blocks.0",), bf, f32, None), (("blocks.1",), bf, f32, None),
                          (("",), bf, f32, None)]
    # a rule in fp32 nests a unit in its block, deepest first; the default rule sets the rest
    assert _plan(net, {"*": "fp16", "blocks.1.ln": "fp32"}) == [
        (("blocks.1.ln",), f32, f32, f16), (("blocks.0",), f16, f32, None),
        (("blocks.1",), f16, f32, None), (("",), f16, f32, None)]
    # param_dtype given replaces the default rule; cast_outputs=False leaves outputs as computed
    assert _plan(net, {"*": "fp16", "head": "fp32"}, param_dtype=bf, cast_outputs=False)[-2:] == [
        (("head",), f32, f32, None), (("",), bf, f32, None)]
    # a rule on a ModuleList reaches its blocks; a bf16 rule inside them nests again
    assert _plan(net, {"blocks": "fp32", "blocks.0.fc": "bf16"}, reduce_dtype=None) == [
        (("blocks.0.fc",), bf, None, f32), (("blocks.0",), f32, f32, bf),
        (("blocks.1",), f32, f32, bf), (("",), bf, None, None)]
    # a rule that changes nothing makes no unit; units you name replace the blocks
    assert _plan(net, {"blocks.0.ln": "bf16"}, units=["emb", "blocks.*.fc"]) == [
        (("blocks.0.fc",), bf, f32, None), (("blocks.1.fc",), bf, f32, None),
        (("emb",), bf, f32, None), (("",), bf, f32, None)]


def test_plan_groups_tied_layers_and_refuses_what_fsdp_cannot_do():
    net = _Net()
    net.head.weight = net.emb.weight
    assert _plan(net, {"emb": "fp32", "head": "fp32"})[-2] == (("emb", "head"), f32, f32, bf)
    with pytest.raises(ValueError, match=r"'emb' \(float32\) and 'head' \(bfloat16\) share a "
                                         r"parameter.*untie"):
        _plan(net, {"emb": "fp32"}, units=["head"])
    with pytest.raises(ValueError, match="'emb' and 'head' share a parameter.*Make each a unit"):
        _plan(net, {"head": "fp32"})
    net = _Net()
    with pytest.raises(ValueError, match="Close matches: 'blocks.1'"):
        _plan(net, {"blokcs.1": "fp32"})
    with pytest.raises(ValueError, match="fp8_e4m3.*Use fp32, bf16 or fp16"):
        _plan(net, {"head": "fp8_e4m3"})
    with pytest.raises(ValueError, match=r"ModuleList, whose forward never runs.*'blocks\.\*'"):
        _plan(net, units=["blocks"])
    with pytest.raises(ValueError, match="'hed' is no module.*close matches: 'head'"):
        _plan(net, units=["hed"])
    net.extra = nn.ParameterList([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="ParameterList that holds parameters.*Put the rule on the "
                                         "module that uses them"):
        _plan(net, {"extra": "fp32"})
    with pytest.raises(TypeError, match="pass param_dtype"):
        shard(_Net(), None, mp_policy=object())
