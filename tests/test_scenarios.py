"""The lab's teaching scenarios (issue 10): each one, trained for the steps it says, is named by
`mpviz.diagnose` (kind, layers, steps), checked against the test's own look at the very tensors
(hooks on the same run, NumPy); each fix is healthy. The lab loads a scenario and its fix."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mpviz
from mpviz.scenarios import SCENARIOS, get_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(sc, run_dir, hooks=None):
    """`sc.max_steps` steps of the scenario through `mpviz.training.Trainer`; `hooks(trainer)` may
    watch the run. Returns the losses."""
    with sc.trainer(run_dir=str(run_dir)) as t:
        if hooks:
            hooks(t)
        return [t.step()["loss"] for _ in range(sc.max_steps)]


def finding(run_dir, kind):
    diag = mpviz.diagnose(run_dir)
    found = diag.by_kind(kind)
    assert found, str(diag)
    assert found[0].severity in ("warning", "error")
    return diag, found[0]


def watch_first_nonfinite(t, first_bad):
    """Note, per step, the first module whose output held inf/nan (in training: not the
    recorder's replay of a bad step, which runs without grad)."""
    def hook(name):
        def h(mod, args, out):
            if torch.is_grad_enabled() and not torch.isfinite(out).all():
                first_bad.setdefault(t.steps_done, name)
        return h

    for name, mod in t.model.named_modules():
        if name:
            mod.register_forward_hook(hook(name))


def stats_steps(sc):
    return list(range(0, sc.max_steps, sc.every))


def test_names_and_lookup():
    assert sorted(SCENARIOS) == ["bf16-weights", "fp16-no-scaling", "fp16-overflow", "lr-too-high"]
    assert {sc.expect for sc in SCENARIOS.values()} == {"gradient_underflow", "forward_overflow",
                                                         "nonfinite_loss", "lost_updates"}
    fixed = get_scenario("fp16-no-scaling-fixed")
    assert fixed.grad_scaler and fixed == SCENARIOS["fp16-no-scaling"].fixed() == fixed.fixed()
    with pytest.raises(ValueError, match="close matches: 'lr-too-high'"):
        get_scenario("lr-to-high")


# ------------------------------------------------------------------ 1. gradient underflow
def test_fp16_without_loss_scaling_underflows(tmp_path):
    """Reference: the run's own weight gradients (post-accumulate hooks) of the layers that ran
    in fp16 (forward hooks: output dtype; autocast keeps LayerNorm and embeddings in fp32), per
    layer the 1st percentile of nonzero |g| in bits above fp16's smallest subnormal (2^-24),
    median over the statistics steps: the layers under UNDERFLOW_BITS (4) are the ones named."""
    sc = SCENARIOS["fp16-no-scaling"]
    grads: dict[tuple[int, str], list[np.ndarray]] = {}
    fp16: set[str] = set()

    def watch(t):
        def output_dtype(name):
            def h(mod, args, out):
                if out.dtype == torch.float16:
                    fp16.add(name)
            return h

        def keep(name):
            def h(p):
                if t.steps_done % sc.every == 0:
                    grads.setdefault((t.steps_done, name), []).append(
                        p.grad.detach().abs().numpy().ravel().copy())
            return h

        for name, mod in t.model.named_modules():
            mod.register_forward_hook(output_dtype(name))
            for p in mod.parameters(recurse=False):
                p.register_post_accumulate_grad_hook(keep(name))

    losses = train(sc, tmp_path / "u", watch)
    bits: dict[str, list[float]] = {}
    for step in stats_steps(sc):
        for (s, name), gs in grads.items():
            if s == step and name in fp16:
                g = np.concatenate(gs)
                if (g > 0).any():
                    bits.setdefault(name, []).append(math.log2(np.percentile(g[g > 0], 1.0)) + 24)
    med = {n: float(np.median(v)) for n, v in bits.items()}
    diag, f = finding(tmp_path / "u", "gradient_underflow")
    assert diag.findings[0] is f and f.severity == "error"
    assert f.steps == (0, stats_steps(sc)[-1])
    assert set(f.layers) == set(sc.layers)
    # the detector reads binade histograms (within one bit below the exact value)
    assert {n for n, b in med.items() if b < 4} <= set(f.layers)
    assert all(med[n] < 5 for n in f.layers) and all(b >= 4 for n, b in med.items() if n not in f.layers)
    assert "GradScaler" in f.suggestion
    # the fix: GradScaler on; nothing above info, and the loss falls lower
    fixed = train(sc.fixed(), tmp_path / "fixed")
    assert mpviz.diagnose(tmp_path / "fixed").ok
    assert np.mean(losses[-5:]) > 1.05 * np.mean(fixed[-5:])


# ------------------------------------------------------------------ 2. forward overflow
def test_an_activation_past_fp16s_range_is_a_forward_overflow(tmp_path):
    """Reference: the test's own forward hooks on the same run: `big` is the first module whose
    output is non-finite, at every step; in fp32 its output exceeds 65504 and the rest is finite."""
    sc = SCENARIOS["fp16-overflow"]
    first_bad: dict[int, str] = {}

    def watch(t):
        watch_first_nonfinite(t, first_bad)

    losses = train(sc, tmp_path / "o", watch)
    assert set(first_bad.values()) == {"big"} and sorted(first_bad) == list(range(sc.max_steps))
    diag, f = finding(tmp_path / "o", "forward_overflow")
    assert diag.findings[0] is f and f.severity == "error"
    assert (f.layers, f.steps) == (["big"], (0, sc.max_steps - 1))
    assert "loss scaling cannot fix" in f.message and all(math.isnan(l) for l in losses)
    assert {x.kind for x in diag.findings} >= {"scale_collapse", "nonfinite_loss"}
    parts = sc.parts()
    x = next(iter(parts["data"]))[0]
    with torch.no_grad():
        m = parts["model"]
        assert m.big(m.act1(m.fc1(x))).abs().max() > 65504 and torch.isfinite(m(x)).all()
    # the fix (big in fp32): no skipped step, nothing above info, fp32's loss within 5%
    fixed = train(sc.fixed(), tmp_path / "fixed")
    run = mpviz.load_run(tmp_path / "fixed")
    assert not run.steps["skipped"].any() and mpviz.diagnose(run).ok
    import dataclasses

    ref = train(dataclasses.replace(sc, precision="fp32", grad_scaler=False), tmp_path / "fp32")
    assert np.mean(fixed[-5:]) == pytest.approx(np.mean(ref[-5:]), rel=0.05)
    run.close()


# ------------------------------------------------------------------ 3. learning rate too high
def test_a_learning_rate_too_high_gives_a_nonfinite_loss(tmp_path):
    """Reference: the losses the trainer returned, and the test's own forward hooks (the first
    module whose output went non-finite, per step)."""
    sc = SCENARIOS["lr-too-high"]
    first_bad: dict[int, str] = {}

    def watch(t):
        watch_first_nonfinite(t, first_bad)

    losses = train(sc, tmp_path / "lr", watch)
    bad = [i for i, l in enumerate(losses) if not math.isfinite(l)]
    assert 5 < bad[0] and bad == list(range(bad[0], sc.max_steps))   # diverges, then stays NaN
    assert max(losses[:bad[0]]) > 10 * losses[0]                     # after jumping up first
    diag, f = finding(tmp_path / "lr", "nonfinite_loss")
    assert f.severity == "error" and f.steps == (bad[0], sc.max_steps - 1)
    culprit = max(set(first_bad.values()), key=list(first_bad.values()).count)
    assert culprit == f.layers[0] == "fc1"
    assert mpviz.load_run(tmp_path / "lr").meta["precision"] == "fp32"
    fwd = diag.by_kind("forward_overflow")[0]   # the runaway weights overflow even fp32
    assert fwd.layers == ["fc1"] and "learning rate" in fwd.suggestion
    # the fix: lr 0.1, finite throughout and learning
    fixed = train(sc.fixed(), tmp_path / "fixed")
    assert mpviz.diagnose(tmp_path / "fixed").ok
    assert all(math.isfinite(l) for l in fixed) and np.mean(fixed[-5:]) < 0.2


# ------------------------------------------------------------------ 4. lost updates
def test_bf16_weights_lose_small_updates(tmp_path):
    """Reference: the test's own optimizer hooks on the same run copy each bf16 weight before
    and after Adam's step: an element's update was lost when its gradient is nonzero and the
    weight did not change."""
    sc = SCENARIOS["bf16-weights"]
    expect: dict[int, dict[str, float]] = {}

    def watch(t):
        owner = {id(p): n for n, m in t.model.named_modules() for p in m.parameters(recurse=False)}
        before = {}

        def pre(opt, *_):
            if t.steps_done % sc.every == 0:
                before.update({id(p): (p.detach().clone(), p.grad.detach() != 0)
                               for g in opt.param_groups for p in g["params"]})

        def post(opt, *_):
            if t.steps_done % sc.every:
                return
            acc: dict[str, list[int]] = {}
            for g in opt.param_groups:
                for p in g["params"]:
                    old, nz = before[id(p)]
                    a = acc.setdefault(owner[id(p)], [0, 0])
                    a[0] += int((nz & (p.detach() == old)).sum())
                    a[1] += int(nz.sum())
            expect[t.steps_done] = {n: lost / n_nz for n, (lost, n_nz) in acc.items()}

        t.optimizer.register_step_pre_hook(pre)
        t.optimizer.register_step_post_hook(post)

    losses = train(sc, tmp_path / "w", watch)
    lu = mpviz.load_run(tmp_path / "w").lost_updates()
    assert sorted(lu["step"].unique()) == sorted(expect) == stats_steps(sc)
    for st, per in expect.items():
        for name, frac in per.items():
            got = lu[(lu.step == st) & (lu.layer == name)]["lost_frac"].iloc[0]
            assert got == pytest.approx(frac, abs=2e-3), (st, name)
    diag, f = finding(tmp_path / "w", "lost_updates")
    median = {n: np.median([expect[s][n] for s in expect]) for n in sc.layers}
    assert set(f.layers) == {n for n, v in median.items() if v >= 0.25} == set(sc.layers)
    assert f.steps == (0, stats_steps(sc)[-1]) and "fp32 master weights" in f.suggestion
    # the fix: fp32 weights under bf16 autocast; nothing recorded as lost, the loss falls further
    fixed = train(sc.fixed(), tmp_path / "fixed")
    assert mpviz.diagnose(tmp_path / "fixed").ok
    assert mpviz.load_run(tmp_path / "fixed").lost_updates().empty
    assert np.mean(fixed[-5:]) < np.mean(losses[-5:]) - 0.1


# ------------------------------------------------------------------ the lab
def test_the_lab_loads_a_scenario_and_its_fix(dash_runs):
    from mpviz.dashboard import lab_app

    from waiting import wait_for

    lab = lab_app(scenario="fp16-overflow")
    try:
        sc = SCENARIOS["fp16-overflow"]
        assert lab.task.value == "fp16-overflow" and lab.task.disabled
        assert (lab.precision.value, lab.grad_scaler.value, lab.max_steps.value) == ("fp16", True, 30)
        assert sc.explanation[:60] in lab.scenario_note.value.replace("&#x27;", "'")
        assert "big" in lab._rows and lab.batch.layout.display == "none"
        lab.start()
        assert "fp16-overflow" in lab.trainers[0].recorder.run_dir.name
        lab.worker.join(120)
        assert lab.worker.state == "done" and lab.worker.rounds == 30, lab.worker.reason
        d = lab.diagnosis.diagnosis
        assert d.findings[0].kind == "forward_overflow" and d.findings[0].layers == ["big"]
        assert "forward_overflow" in lab.diagnosis.html.value
        run = mpviz.load_run(lab.trainers[0].recorder.run_dir)
        assert run.meta["scenario"] == "fp16-overflow" and run.meta["app"] == "lab"
        run.close()

        # the fix: one tick; big in fp32 through the lab's rules, a new run
        lab.scenario_fixed.value = True
        assert lab._scenario.name == "fp16-overflow-fixed" and lab._rules == {"big": "fp32"}
        lab.start()
        assert "fp16-overflow-fixed" in lab.trainers[0].recorder.run_dir.name
        lab.worker.join(120)
        assert lab.worker.state == "done", lab.worker.reason
        assert wait_for(lambda: lab.diagnosis.diagnosis is not None, 30, 0.05)
        assert lab.diagnosis.diagnosis.ok, str(lab.diagnosis.diagnosis)

        # another scenario from the menu; then back to the demo tasks
        lab.scenario.value = "lr-too-high"
        assert lab._scenario.name == "lr-too-high-fixed"   # 'with the fix' is still ticked
        lab.scenario_fixed.value = False
        assert lab.precision.value == "fp32" and not lab.grad_scaler.value and lab._rules == {}
        assert lab.lr.options[0] == ("1 (scenario)", 0.0) and 0.1 in [v for _, v in lab.lr.options]
        lab.scenario.value = ""
        assert lab._scenario is None and lab.task.options == ("digits", "text", "mlp")
        assert lab.task.value == "digits" and not lab.task.disabled and lab.scenario_note.value == ""
    finally:
        lab.close()


def test_a_lab_built_with_your_model_comes_back_to_it(dash_runs):
    from mpviz.dashboard import lab_app

    from mpviz.tasks import demo_parts

    parts = demo_parts("mlp")
    parts.pop("meta")
    lab = lab_app(name="mine", **parts)
    try:
        assert lab.load_scenario("bf16-weights-fixed").name == "bf16-weights-fixed"
        assert lab.scenario_fixed.value and lab.precision.value == "bf16"
        assert lab.model is not parts["model"] and lab.lr.layout.display is None
        assert "The fixed run" in lab.scenario_note.value
        lab.start(max_steps=3)
        lab.worker.join(60)
        assert lab.worker.rounds == 3
        assert lab.load_scenario(None) is None
        assert lab.model is parts["model"] and lab.task.options == ("mine",)
        assert lab.lr.layout.display == lab.batch.layout.display == "none"
        assert lab.precision.value == "fp32" and lab.scenario.value == ""
        with pytest.raises(ValueError, match="unknown scenario"):
            lab.load_scenario("nope")
    finally:
        lab.close()
