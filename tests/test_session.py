"""`LabSession`, the lab without widgets: real demo training on the lab's worker thread, checked
against the run store read with plain sqlite3 and against Trainers stepped by hand."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mpviz.dashboard.session import LabSession
from mpviz.dashboard.worker import torch_thread
from waiting import wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(run_dir: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(Path(run_dir) / "run.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _output_dtypes(run_dir: Path, layer: str) -> list[tuple[int, str]]:
    return _rows(run_dir, "SELECT d.step, d.dtype FROM dtypes d JOIN layers l ON l.idx = d.layer_idx "
                          f"WHERE l.layer = '{layer}' AND d.tensor = 'output' ORDER BY d.step")


def test_a_session_trains_and_a_layer_toggled_at_a_pause_runs_in_its_new_precision(tmp_path):
    s = LabSession(tmp_path, task="mlp", every=2)
    try:
        layers = s.prepare()
        names = torch_thread.call(lambda: [n for n, _ in s.model.named_modules()])
        assert [name for name, *_ in layers] == names and "fc3" in names
        assert list(tmp_path.iterdir()) == []          # nothing is recorded before start
        s.start("bf16", max_seconds=600, pause_at=6)
        assert wait_for(lambda: s.state == "paused")
        assert s.worker.rounds == 6
        assert s.set_layer("fc3", "fp32")               # live: from the next step, 6
        s.toggle_pause()
        assert wait_for(lambda: s.worker.rounds >= 12)
        s.stop()
        assert s.state == "done" and s.worker.reason == "stopped"
        n, run_dir = s.worker.rounds, s.trainers[0].run_dir
        assert run_dir.parent == tmp_path and "-mlp-bf16" in run_dir.name

        steps = _rows(run_dir, "SELECT step, samples_per_s FROM steps ORDER BY step")
        assert [step for step, _ in steps] == list(range(n))
        changes = _rows(run_dir, "SELECT p.step, l.layer, p.precision FROM policy_changes p "
                                 "JOIN layers l ON l.idx = p.layer_idx WHERE p.precision IS NOT NULL")
        assert changes == [(6, "fc3", "fp32")]
        fc3 = _output_dtypes(run_dir, "fc3")
        assert fc3[0] == (0, "bfloat16") and fc3[-1] == (6, "float32")
        assert [d for _, d in _output_dtypes(run_dir, "fc2")] == ["bfloat16"]
        # What the page shows, read through the session, is what the store holds.
        speeds = [v for _, v in steps[-20:]]
        assert s.samples_per_s() == pytest.approx(float(np.median(speeds)))
        table = s.layer_table().set_index("layer")["precision"]
        assert table["fc3"] == "fp32" and table["fc2"] == "bf16"
        assert s.policy() == {"fc3": "fp32"}
        status = _rows(run_dir, "SELECT value FROM meta WHERE key = 'status'")
        assert status == [('"finished"',)]
    finally:
        s.end()


def test_a_race_trains_two_lanes_on_the_same_batches(tmp_path):
    """Each lane's recorded losses are those of a Trainer of its precision stepped by hand from
    the same start on the same batches (the MLP has no dropout)."""
    from mpviz.training import Trainer

    s = LabSession(tmp_path, task="mlp")
    try:
        s.prepare()
        s.start("fp32", alongside=("bf16", "fp32"), max_steps=8)   # the main precision once
        s.worker.join(300)
        assert s.state == "done" and s.worker.rounds == 8, s.worker.reason
        assert [t.precision for t in s.trainers] == ["fp32", "bf16"]
        assert s.labels == ["fp32", "bf16 (alongside)"]
        evals = s.evals()
        assert [label for label, _ in evals] == s.labels
        for t, (_, lane_evals) in zip(s.trainers, evals):
            recorded = _rows(t.run_dir, "SELECT step, loss FROM steps ORDER BY step")
            ref = Trainer(task="mlp", precision=t.precision, record=False, seed=0)
            try:
                by_hand = torch_thread.call(lambda: [ref.step()["loss"] for _ in range(8)])
                final = torch_thread.call(ref.run_eval)
            finally:
                ref.close()
            assert recorded == list(enumerate(by_hand))
            assert lane_evals[-1] == (8, final)        # the last evaluation: the final weights
        assert not np.array_equal(*(np.array(_rows(t.run_dir, "SELECT loss FROM steps"))
                                    for t in s.trainers))   # the precisions differ
    finally:
        s.end()


def test_a_bad_rule_is_refused_with_the_reason_and_loses_nothing(tmp_path):
    s = LabSession(tmp_path, task="mlp", every=2)
    try:
        s.prepare()
        with pytest.raises(ValueError, match=r"'fc33' is not a layer name.*Close matches: 'fc3'"):
            s.add_rule("fc33", "fp32")                 # between sessions: checked on the model
        with pytest.raises(ValueError, match="no rule 'act1' to remove; rules: none"):
            s.add_rule("act1", None)
        assert s.add_rule("fc*", "bf16") is False      # accepted, for the next start
        s.start("fp32", max_steps=10, pause_at=4)
        assert wait_for(lambda: s.state == "paused")
        with pytest.raises(ValueError, match=r"'fc9\*' matches no layer"):
            s.add_rule("fc9*", "fp32")                 # live: refused by the policy
        with pytest.raises(ValueError, match=r"unknown layer 'fc33'; close matches: 'fc3'"):
            s.set_layer("fc33", "fp32")
        with pytest.raises(ValueError, match="Cannot remove rule 'act1'"):
            s.add_rule("act1", None)                   # a rule that was never set
        assert s.rules == {"fc*": "bf16"} and s.overrides == {}
        s.toggle_pause()
        s.worker.join(300)
        assert s.state == "done" and s.worker.rounds == 10 and s.worker.post_error is None
        run_dir = s.trainers[0].run_dir
        assert [r[0] for r in _rows(run_dir, "SELECT step FROM steps ORDER BY step")] == list(range(10))
        changes = _rows(run_dir, "SELECT l.layer, p.precision, p.rule FROM policy_changes p "
                                 "JOIN layers l ON l.idx = p.layer_idx WHERE p.precision IS NOT NULL")
        assert sorted(changes) == [("fc1", "bf16", "fc*"), ("fc2", "bf16", "fc*"), ("fc3", "bf16", "fc*")]
    finally:
        s.end()


def test_a_session_counts_its_step_and_predicts_the_policy_in_force_on_the_gpu_picked(tmp_path):
    """The step counted at the first step is kept with the run (the same count as on a fresh
    model and that batch); the session's estimates are `mpviz.cost.predict`'s for the policy
    written out by hand, on the GPU picked; a race lane's too."""
    from mpviz.cost import count, load_counts, predict
    from mpviz.cost.pricing import OPTIMIZER_ROW
    from mpviz.cost.records import LOSS
    from mpviz.tasks import demo_parts

    s = LabSession(tmp_path, task="text", every=5)
    try:
        s.prepare(batch_size=128)      # big enough that an A100 and an H100 differ
        assert s.speed() is None       # nothing counted before a run
        s.start("fp32", alongside=("bf16",), max_steps=4, pause_at=2)
        assert wait_for(lambda: s.state == "paused")
        assert s.set_layer("head", "bf16")
        s.toggle_pause()
        s.worker.join(300)
        assert s.state == "done" and s.worker.rounds == 4, s.worker.reason
        main, lane = s.trainers
        counts = load_counts(main.run_dir)
        assert counts is not None and load_counts(lane.run_dir) is not None

        def fresh_count():
            parts = demo_parts("text", 0, 128, None)
            return count(parts["model"], next(iter(parts["data"])), parts["loss_fn"])
        ref = torch_thread.call(fresh_count)
        assert counts.flops() == ref.flops() > 0 and len(counts.ops) == len(ref.ops)

        policy = {"": "fp32", "head": "bf16"}       # the precision in force, written out
        h100 = s.speed()
        assert s.gpu == "h100" and h100.gpu == "NVIDIA H100 SXM 80GB"
        assert h100.policy.step_time_s == predict(counts, policy, "h100").step_time_s
        assert h100.fp32.step_time_s == predict(counts, "fp32", "h100").step_time_s
        (label, bf16), = h100.lanes
        assert label == "bf16 (alongside)"
        assert bf16.step_time_s == predict(counts, "bf16", "h100").step_time_s
        assert h100.speedup(bf16) == pytest.approx(h100.fp32.step_time_s / bf16.step_time_s)

        s.gpu = "a100"
        a100 = s.speed()
        assert a100.policy.step_time_s == predict(counts, policy, "a100").step_time_s
        assert a100.policy.step_time_s > h100.policy.step_time_s
        assert a100.fp32.step_time_s > h100.fp32.step_time_s

        # Each layer's share of the predicted step: with the loss and the optimizer step, 1.
        shares = a100.shares()
        layers = [lc.name for lc in counts.layers if lc.name != LOSS]
        assert set(shares) == {*layers, LOSS, OPTIMIZER_ROW}
        assert sum(v for v, _ in shares.values()) == pytest.approx(1.0)
        rows = predict(counts, policy, "a100").layers.set_index("layer")["time_s"]
        model = sum(shares[name][0] for name in layers)
        assert model == pytest.approx(rows[layers].sum() / rows.sum())
        assert shares["head"][1] in ("compute", "memory", "overhead")

        m = s.measured()
        speeds = _rows(main.run_dir, "SELECT samples_per_s FROM steps")
        assert m.device == "cpu" and m.samples == 128
        assert m.samples_per_s == pytest.approx(float(np.median([v for v, in speeds])))
    finally:
        s.end()


def test_a_step_that_cannot_be_counted_leaves_no_estimate_and_trains_on(tmp_path):
    """A batch only the user's train_step understands: the count fails, which is recorded as the
    recorder's error; every step is still trained and recorded, and the session has no estimate."""
    import torch
    from torch import nn

    from mpviz.cost import load_counts

    class Batch:   # neither (x, y), a dict nor a tensor: the counter cannot call the model on it
        def __init__(self, i: int) -> None:
            g = torch.Generator().manual_seed(i)
            self.x, self.y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(model, b):
        loss = nn.functional.cross_entropy(model(b.x), b.y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    parts = {"model": model, "optimizer": opt, "train_step": train_step,
             "data": [Batch(i) for i in range(4)]}
    s = LabSession(tmp_path, task="custom", parts=parts)
    try:
        s.prepare()
        s.start("fp32", max_steps=5)
        s.worker.join(300)
        assert s.state == "done" and s.worker.rounds == 5, s.worker.reason
        run_dir = s.trainers[0].run_dir
        assert [r[0] for r in _rows(run_dir, "SELECT step FROM steps ORDER BY step")] == list(range(5))
        assert load_counts(run_dir) is None and s.speed() is None
        errors = s.readers[0].meta["recorder_errors"]
        assert [e["part"] for e in errors] == ["counts"]
        assert "could not be counted" in errors[0]["error"]
    finally:
        s.end()


def test_the_trade_off_front_probes_the_sessions_model_on_the_gpu_picked(tmp_path):
    """`search_front` runs `mpviz.search` on the torch thread for what the next session trains:
    the probes are runs in the session's runs folder (listed as the explorer lists runs), each
    with the counted step; speed is priced on the GPU picked (an A100: no fp8 tensor cores, so
    fp8 linears are left out, with the reason); refused while a session trains."""
    import mpviz
    from mpviz.cost import load_counts, predict

    s = LabSession(tmp_path, task="mlp")
    try:
        s.prepare()
        s.gpu = "a100"
        front = s.search_front(steps=6).result(300)
        t = front.table
        assert front.device.name == "a100"
        assert list(t["policy"]) == ["fp32", "bf16", "fp16", "advised"]
        assert any("fp8 linears: left out" in n and "A100" in n for n in front.notes)
        listed = {p.name for p in mpviz.list_runs(tmp_path)}
        assert {Path(r).name for r in t["run_dir"]} <= listed and all(
            Path(r).parent == tmp_path for r in t["run_dir"])
        counts = load_counts(t["run_dir"][0])
        bf16 = t.set_index("policy").loc["bf16"]
        assert bf16["speedup"] == pytest.approx(predict(counts, "fp32", "a100", "adam").step_time_s
                                                / predict(counts, "bf16", "a100", "adam").step_time_s)
        assert all(len(v) == 6 for v in front.losses.values())
        s.start("fp32", max_steps=10**6, pause_at=1)
        assert wait_for(lambda: s.state == "paused")
        with pytest.raises(RuntimeError, match="stop the session first"):
            s.search_front()
    finally:
        s.end()


def test_a_launch_bound_step_shows_the_speedup_at_a_gpu_sized_batch():
    """The text demo's batch is launch-bound on an H100 (bf16 slower than fp32); the panel adds
    the smallest power-of-two multiple of the batch at which it is not, with bf16's speedup
    there, as `predict` prices the count scaled that many times."""
    from mpviz.cost import count, predict
    from mpviz.dashboard.estimate_panel import speed_html
    from mpviz.dashboard.speed import Measured, Predictor, launch_share
    from mpviz.tasks import demo_parts

    def counted():
        parts = demo_parts("text", 0)
        return count(parts["model"], next(iter(parts["data"])), parts["loss_fn"]), parts["meta"]["batch_size"]
    counts, batch = torch_thread.call(counted)
    speed = Predictor(counts).speed({"": "bf16"}, "h100")
    assert speed.speedup(speed.policy) < 1
    k = speed.scaled.factor
    launch_bound = [launch_share(predict(counts.scaled(f), "bf16", "h100")) > 0.5 for f in (1, k // 2, k)]
    assert launch_bound == [True, True, False] and k & (k - 1) == 0
    x = predict(counts.scaled(k), "fp32", "h100").step_time_s / predict(counts.scaled(k), "bf16", "h100").step_time_s
    assert x > 1
    text = speed_html(speed, Measured(0.01, 1600.0, batch, "cpu"))
    assert (f"estimate at a GPU-sized batch (×{k}, {k * batch:,} samples): bf16 {x:.2f}× the speed "
            f"of fp32 on NVIDIA H100 SXM 80GB") in text
    # An fp32 policy is shown what bf16 would buy; a batch already GPU-sized gets no such line.
    assert Predictor(counts).speed("fp32", "h100").scaled.label == "bf16"
    assert Predictor(counts.scaled(k)).speed({"": "bf16"}, "h100").scaled is None
