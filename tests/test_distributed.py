"""torch.distributed, started the way users start jobs: `torchrun --nproc-per-node 2` on gloo/CPU
(tests/ddp_script.py, launched once for the module). Rank 1 overflows on purpose at step 3."""
from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

import mpviz
from mpviz.distributed import stats_ranks

from ddp_script import torchrun

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The torchrun job's output folder and each rank's JSON report."""
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun(out)


def test_one_run_all_ranks(job):
    """Each rank's recorded losses, unscaled gradient norms and output dtypes are those its
    plain (un-recorded) run measured with the script's own code and hooks (tests/ddp_script.py)."""
    out, reports = job
    run = mpviz.load_run(out / "run")
    assert run.ranks == [0, 1] and run.world_size == 2 and run.rank is None
    steps = run.steps
    assert steps.groupby("rank")["step"].apply(list).to_dict() == {0: list(range(6)),
                                                                  1: list(range(6))}
    # each rank its own data: its own losses (rank 1's step 3 is NaN in both)
    for r in (0, 1):
        np.testing.assert_array_equal(steps.loc[steps["rank"] == r, "loss"].to_numpy(float),
                                      reports[r]["losses"])
    assert all(a != b for a, b in zip(reports[0]["losses"], reports[1]["losses"]))
    # the all-reduced gradients, divided by the loss scale: weight and bias of each layer
    grads = run.layer_stats.query("tensor == 'grad'")
    assert sorted(set(grads["step"])) == [0, 2, 4]  # every=2
    for r in (0, 1):
        for step in (0, 2, 4):
            got = grads[(grads["rank"] == r) & (grads["step"] == step)]
            ref = reports[r]["grad_norms"][step]
            assert sorted(got["layer"]) == sorted(ref) == ["module.0", "module.2", "module.4"]
            assert dict(zip(got["layer"], got["norm"])) == pytest.approx(ref, rel=1e-5), (r, step)
    # each module's output dtype at every step (the dtypes table holds the changes)
    outs = run.dtypes.query("tensor == 'output'")
    for r in (0, 1):
        mine = outs[outs["rank"] == r].sort_values("step", kind="stable")
        for step, ref in enumerate(reports[r]["output_dtypes"]):
            in_force = mine[mine["step"] <= step].groupby("layer")["dtype"].last().to_dict()
            assert in_force == ref, (r, step)
            assert len(ref) == 7 and set(ref.values()) == {"float16"}  # "", module, module.0-4
    one = mpviz.load_run(out / "run", rank=1)
    assert one.rank == 1 and set(one.steps["rank"]) == {1} and one.meta["rank"] == 1
    np.testing.assert_array_equal(one.steps["loss"].to_numpy(float), reports[1]["losses"])


def test_overflow_names_the_rank_where_it_was_born(job):
    """Rank 1's own gradients went non-finite (origin True, the layers a plain copy of the model
    says); rank 0 got them only through the all-reduce (origin False): its local ones were finite."""
    out, reports = job
    ov = mpviz.load_run(out / "run").overflows
    assert set(ov["step"]) == {3} and ov["skipped"].all()
    r0, r1 = ov[ov["rank"] == 0], ov[ov["rank"] == 1]
    assert reports[0]["local_nonfinite_layers"] == []
    assert not r0["origin"].any() and set(r0["phase"]) == {"backward"}
    first_fwd = r1[(r1["phase"] == "forward") & r1["first"]]
    assert first_fwd["layer"].tolist() == ["module.0"] and first_fwd["origin"].all()
    bwd = r1[r1["phase"] == "backward"]
    assert sorted(bwd.loc[bwd["origin"], "layer"]) == reports[1]["local_nonfinite_layers"]
    assert reports[1]["local_nonfinite_layers"] == ["module.0", "module.2", "module.4"]


def test_ddp_training_is_bit_identical_with_the_hook(job):
    _, reports = job
    for rep in reports:
        assert rep["identical"], rep
        assert rep["recorder_errors"] == [] and rep["second_recorder_errors"] == []


def test_user_comm_hook_refused_or_chained_and_fsdp1_refused(job):
    out, reports = job
    for rep in reports:
        assert "mpviz.distributed.checked(your_hook)" in rep["user_hook"]
        assert not rep["user_hook_run_created"]  # refused before anything touched the disk
        assert rep["chained_watch_used"] and rep["chained_errors"] == []
        assert rep["fsdp"].startswith("mpviz does not record FSDP1 models")
        assert "fully_shard" in rep["fsdp"] and not rep["fsdp_run_created"]
    # the check chained before torch's allreduce_hook, on its CPU path: rank 1's inf is its own
    chained = mpviz.load_run(out / "chained").overflows
    grads = chained[chained["phase"] == "backward"]
    assert set(grads.loc[grads["origin"], "rank"]) == {1} and len(grads[grads["rank"] == 0])


def test_stats_on_a_sample_of_ranks(job):
    out, _ = job
    run = mpviz.load_run(out / "sampled")  # stats_ranks="sample:1": rank 0 only
    assert set(run.steps["rank"]) == {0, 1}
    assert set(run.layer_stats["rank"]) == {0} and run.meta["stats_ranks"] == [0]


def test_stats_ranks_spec():
    assert stats_ranks(None, 4) == [0, 1, 2, 3]
    assert stats_ranks([7, 0, 0], 8) == [0, 7] and stats_ranks([0, 7], 2) == [0]
    assert stats_ranks("sample:4", 1000) == [0, 333, 666, 999]
    assert stats_ranks("sample:8", 3) == [0, 1, 2] and stats_ranks("sample:1", 64) == [0]
    for bad in ("every:2", "sample:0", [-1], ["x"]):
        with pytest.raises(ValueError, match="stats_ranks"):
            stats_ranks(bad, 8)


def test_explorer_picks_a_rank(job):
    from mpviz.dashboard import explorer_app

    out, _ = job
    ex = explorer_app(run_dir=out / "run", runs_dir=out, follow=False)
    try:
        assert ex.rank_pick.layout.display is None   # shown: the run has two ranks
        assert [v for _, v in ex.rank_pick.options] == [0, 1] and ex.run.rank == 0
        rank0_overflows = ex.overflows.value
        ex.rank_pick.value = 1
        assert ex.run.rank == 1 and ex.run.last_step == 5
        assert ex.overflows.value != rank0_overflows   # rank 1 also has the forward culprits
    finally:
        ex.close()


def test_compare_overlays_the_ranks(job):
    from mpviz.dashboard import compare_app

    out, _ = job
    cmp = compare_app(runs=[out / "run"], runs_dir=out)
    try:
        labels = [label for label, _ in cmp.picker.options if label.startswith("run ")]
        assert [label.rsplit(" ", 2)[-2:] for label in labels] == [["rank", "0"], ["rank", "1"]]
        assert len(cmp.picker.value) == 2            # the run given: both its ranks, overlaid
        runs = {p: run for p, run in cmp._readable()}
        assert sorted(run.rank for run in runs.values()) == [0, 1]
        for p, run in runs.items():   # each line is that rank's own steps
            ref = mpviz.load_run(out / "run", rank=run.rank).steps
            assert len(run.steps) == len(ref) == 6
        assert "rank 1" in cmp.info.value and not cmp.problems
    finally:
        cmp.close()
