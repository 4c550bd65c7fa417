"""Export (TensorBoard, CSV, Parquet) and thinning, on one real fp16 + GradScaler run that
overflows: its first steps are skipped, the loss scale backs off and grows again."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mpviz
from mpviz.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS, EVERY = 40, 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_torch_thread):
    # Not record_demo: a loss scale that skips steps, backs off and grows again within 40 steps.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # a scale this large overflows fp16 gradients: skipped steps, back-offs, then growth
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=8)
    g = torch.Generator().manual_seed(1)
    out = tmp_path_factory.mktemp("export") / "run"
    with mpviz.Recorder(model, optimizer=opt, scaler=scaler, run_dir=out, every=EVERY) as rec:
        for _ in range(STEPS):
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.step(loss=loss, samples=len(x))
    run = mpviz.load_run(out)
    assert run.steps["skipped"].any() and len(run.overflows)  # the fixture does what it says
    assert (run.steps["loss_scale_after"] > run.steps["loss_scale"]).any()  # and grows again
    return out


def test_tensorboard_readable_by_tensorboard(run_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["export", "tensorboard", str(run_dir), str(out)]) == 0
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    run = mpviz.load_run(run_dir)
    steps, stats = run.steps, run.layer_stats

    def series(tag):
        ev = acc.Scalars(tag)
        return [e.step for e in ev], np.array([e.value for e in ev])

    f32 = lambda s: s.to_numpy(np.float64).astype(np.float32)  # noqa: E731  (TensorBoard's float)
    for tag, col in (("train/loss", "loss"), ("train/loss_scale", "loss_scale"),
                     ("train/samples_per_s", "samples_per_s")):
        at, v = series(tag)
        assert at == steps["step"].tolist()
        np.testing.assert_array_equal(v, f32(steps[col]))
    at, v = series("train/skipped_total")
    np.testing.assert_array_equal(v, steps["skipped"].cumsum().to_numpy())
    at, v = series("overflow/events")
    ref = run.overflows.groupby("step").size().reindex(steps["step"], fill_value=0)
    np.testing.assert_array_equal(v, ref.to_numpy())
    assert v.sum() == len(run.overflows) > 0
    for layer in ("0", "2"):
        g = stats[(stats["layer"] == layer) & (stats["tensor"] == "grad")]
        at, v = series(f"grad_norm/{layer}")
        assert at == g["step"].tolist() and at == list(range(0, STEPS, EVERY))
        np.testing.assert_array_equal(v, f32(g["norm"]))
        for tensor in ("activation", "grad", "weight"):
            s = stats[(stats["layer"] == layer) & (stats["tensor"] == tensor)]
            np.testing.assert_array_equal(series(f"max_abs/{tensor}/{layer}")[1], f32(s["max_abs"]))
            np.testing.assert_array_equal(series(f"underflow_fp16/{tensor}/{layer}")[1],
                                          f32(s["underflow_fp16"]))
    # every layer and tensor with statistics has its series (the model itself named "(model)";
    # this Sequential's own output is its last layer's tensor, which has the row)
    tags = {t for t in acc.Tags()["scalars"] if t.startswith("max_abs/")}
    assert tags == {f"max_abs/{t}/{layer or '(model)'}"
                    for layer, t in zip(stats["layer"], stats["tensor"])}


def test_tensorboard_names_the_model_itself(tmp_path):
    """The model's own output (not a child's tensor) is the series "(model)"."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) * 2

    torch.manual_seed(0)
    model = Net()
    outputs = []
    with mpviz.Recorder(model, run_dir=tmp_path / "r", every=1) as rec:
        for _ in range(2):
            out = model(torch.randn(3, 4))
            outputs.append(out.detach().abs().max().item())
            out.sum().backward()
            rec.step()
    files = mpviz.export(tmp_path / "r", "tensorboard", tmp_path / "tb")
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    got = acc.Scalars("max_abs/activation/(model)")
    assert [e.step for e in got] == [0, 1]
    assert [e.value for e in got] == pytest.approx(outputs, rel=1e-6)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tables_round_trip(run_dir, tmp_path, fmt):
    run = mpviz.load_run(run_dir)
    files = mpviz.export(run, fmt, tmp_path / fmt)
    assert {p.name for p in files} >= {f"steps.{fmt}", f"layer_stats.{fmt}", "meta.json"}
    for table in ("steps", "layer_stats", "overflows", "dtypes", "policy_changes", "layers"):
        ref = getattr(run, table)
        path = tmp_path / fmt / f"{table}.{fmt}"
        if fmt == "parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(path), ref)
        else:  # CSV has no types: text columns read as text, where '' and None are one field
            text = [c for c in ref if pd.api.types.is_string_dtype(ref[c])]
            got = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                              na_values={c: [""] for c in ref if c not in text})
            ref[text] = ref[text].fillna("")
            pd.testing.assert_frame_equal(got, ref, check_dtype=False)
    assert len(run.layer_stats) and len(run.overflows)  # the tables compared are not empty


def test_export_errors_name_the_fix(run_dir, tmp_path, capsys):
    assert main(["export", "csv", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no mpviz run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "hdf5", str(run_dir), str(tmp_path / "o")])
    assert "choose from tensorboard, csv, parquet" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one of tensorboard, csv, parquet"):
        mpviz.export(run_dir, "json", tmp_path / "o")


def test_thin_keeps_overflows_and_scale_changes(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = mpviz.load_run(copy)
    stats0, steps0, over0, dt0 = before.layer_stats, before.steps, before.overflows, before.dtypes
    before.close()
    with pytest.raises(ValueError, match="multiple of the run's statistics interval"):
        mpviz.thin(copy, keep_every=3)
    res = mpviz.thin(copy, keep_every=8, before_step=36)
    run = mpviz.load_run(copy)
    special = set(steps0.loc[steps0["skipped"] | steps0["nonfinite_grads"]
                             | (steps0["loss_scale_after"] != steps0["loss_scale"]), "step"])
    special |= set(over0["step"])
    kept = {s for s in stats0["step"].unique() if s >= 36 or s % 8 == 0 or s in special}
    assert set(run.layer_stats["step"]) == kept and len(kept) < stats0["step"].nunique()
    assert res["rows_dropped"] > 0 and res["bytes_after"] <= res["bytes_before"]
    # what is never dropped
    pd.testing.assert_frame_equal(run.steps, steps0)
    pd.testing.assert_frame_equal(run.overflows, over0)
    pd.testing.assert_frame_equal(run.dtypes, dt0)
    ref = stats0[stats0["step"].isin(kept)].reset_index(drop=True)
    pd.testing.assert_frame_equal(run.layer_stats, ref)
    assert run.meta["thinned"][0]["keep_every"] == 8


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory):
    """A real 2-rank job (tests/ddp_script.py under torchrun, gloo on the CPU): each rank trains
    on its own data, rank 1 overflows at step 3, and each rank's plain (un-recorded) run measured
    its own losses and unscaled gradient norms (the references). The recorded run and the
    reports."""
    from ddp_script import torchrun

    out = tmp_path_factory.mktemp("ddp")
    return out / "run", torchrun(out)


def test_tensorboard_one_folder_per_rank(ddp_job, tmp_path):
    """A run with two ranks gives rank0/ and rank1/, each holding that rank's own values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, reports = ddp_job
    steps = mpviz.load_run(run_dir).steps
    assert set(steps["rank"]) == {0, 1}  # both ranks read (a failure, not a skip)
    files = mpviz.export(run_dir, "tensorboard", tmp_path / "tb")
    assert [p.parent.name for p in files] == ["rank0", "rank1"]
    assert reports[0]["losses"] != reports[1]["losses"]  # two different runs
    events = []
    for rank, p in enumerate(files):
        acc = EventAccumulator(str(p.parent), size_guidance={"scalars": 0})
        acc.Reload()
        ref = reports[rank]
        loss = acc.Scalars("train/loss")
        assert [e.step for e in loss] == list(range(6))
        # (rank 1's step 3 is NaN in both)
        np.testing.assert_array_equal([e.value for e in loss], np.float32(ref["losses"]))
        for layer in ("module.0", "module.2", "module.4"):
            g = acc.Scalars(f"grad_norm/{layer}")
            assert [e.step for e in g] == [0, 2, 4]  # every=2
            assert [e.value for e in g] == pytest.approx(
                [ref["grad_norms"][s][layer] for s in (0, 2, 4)], rel=1e-5)
        own = mpviz.load_run(run_dir, rank=rank).overflows  # this rank's own store
        per_step = own.groupby("step").size().reindex(range(6), fill_value=0)
        events.append([e.value for e in acc.Scalars("overflow/events")])
        assert events[-1] == per_step.tolist()
    # rank 1's own inf/nan (forward and backward) are in its folder only
    assert reports[1]["local_nonfinite_layers"] and not reports[0]["local_nonfinite_layers"]
    assert sum(events[1]) > sum(events[0]) > 0
