"""Demo tasks, Trainer and the command line: real training on real data, a few steps each."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import mpviz
from mpviz.__main__ import TASK_NAMES, main, parse_policy
from mpviz.formats import PRECISIONS
from mpviz.tasks import TASKS, demo_parts, get_task, stdlib_text
from mpviz.training import Trainer



pytestmark = pytest.mark.usefixtures("one_torch_thread")


# (task, low precision, steps, check(before, after)) -- margins are well inside what fixed
# seed 0 gives (digits 0.09 -> 0.87 accuracy, text 8.2 -> 4.0 bits/char, mlp 0.58 -> 0.94).
LEARNING = {
    "digits": ("fp16", 60, lambda b, a: a["accuracy"] >= b["accuracy"] + 0.4 and a["loss"] < b["loss"] - 1.0),
    "text": ("bf16", 40, lambda b, a: a["bits_per_char"] < b["bits_per_char"] - 2.0),
    "mlp": ("fp16", 40, lambda b, a: a["accuracy"] >= 0.85 and a["loss"] < 0.5 * b["loss"]),
}


def _output_dtypes(model: torch.nn.Module, names: list[str]) -> tuple[dict[str, torch.dtype], list]:
    """Our own forward hooks: the dtype each named module really produced."""
    seen: dict[str, torch.dtype] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.dtype)) for n in names]
    return seen, handles


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("low", [False, True], ids=["fp32", "low"])
def test_task_learns(task: str, low: bool) -> None:
    precision, steps, improved = LEARNING[task]
    precision = precision if low else "fp32"
    with Trainer(task=task, precision=precision, seed=0, record=False) as t:
        before = t.evaluate()
        losses = [t.step()["loss"] for _ in range(steps)]
        after = t.evaluate()
    assert all(math.isfinite(v) for v in losses)
    assert improved(before, after), (task, precision, before, after)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # the training loss drops too


def test_low_precision_really_runs_and_toggles_live() -> None:
    """bf16 autocast reaches the head; a live toggle to fp32 applies at the next step only."""
    t = Trainer(task="digits", precision="bf16", seed=0, record=False)
    seen, handles = _output_dtypes(t.model, ["conv1", "head"])
    t.step()
    assert seen == {"conv1": torch.bfloat16, "head": torch.bfloat16}
    t.policy_handle.update({"head": "fp32"})
    t.step()
    assert seen == {"conv1": torch.bfloat16, "head": torch.float32}
    for h in handles:
        h.remove()
    t.close()
    t.close()  # idempotent
    # After close the model is plain again: fp32 in, fp32 out, no hooks anywhere.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.model.modules())
    with pytest.raises(RuntimeError, match="closed"):
        t.step()


def test_copies_of_a_model_under_a_policy_carry_none_of_it() -> None:
    """The lab's eval copy and race lanes: a model whose policy hooks and wraps its layers'
    forwards is copied plain (same weights, fp32), and the original keeps its policy; a
    forward the user bound to the module itself is kept."""
    from mpviz.training import copy_model

    t = Trainer(task="mlp", precision="bf16", seed=0, record=False, policy={"fc1": "fp16"})
    ref = get_task("mlp").model(0)   # the same weights, no policy
    for m in (t.model.fc3, ref.fc3):
        m.forward = types.MethodType(lambda self, x: torch.nn.Linear.forward(self, x) * 2, m)
    c = copy_model(t.model)
    assert "forward" not in vars(c.fc1) and vars(c.fc3)["forward"].__self__ is c.fc3
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in c.modules())
    x = torch.randn(4, 30)
    seen, handles = _output_dtypes(c, ["fc1", "fc2"])
    with torch.no_grad():
        torch.testing.assert_close(c(x), ref(x))
    assert seen == {"fc1": torch.float32, "fc2": torch.float32}
    for h in handles:
        h.remove()
    seen, handles = _output_dtypes(t.model, ["fc1", "fc2"])
    t.step()
    assert seen == {"fc1": torch.float16, "fc2": torch.bfloat16}   # the original keeps its policy
    for h in handles:
        h.remove()
    t.close()


def test_fp16_uses_grad_scaler_and_fp8_rounds_weights() -> None:
    t16 = Trainer(task="mlp", precision="fp16", seed=0, record=False)
    assert isinstance(t16.scaler, torch.amp.GradScaler) and t16.scaler.get_scale() == 65536.0
    seen, handles = _output_dtypes(t16.model, ["fc1", "head"])
    t16.step()
    assert seen == {"fc1": torch.float16, "head": torch.float16}
    t16.close()

    # fp8 is emulated by the policy {"*": "fp8_e4m3"}: inside the forward, each weight a
    # layer computes with is exactly representable in float8_e4m3fn (seen by our own torch
    # function mode at each F.linear: the policy puts the rounded weight in place inside the
    # layer's forward, after any forward pre-hook).
    from torch.overrides import TorchFunctionMode

    class Linears(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.exact: list[bool] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "linear":
                w = args[1]
                self.exact.append(bool((w.to(torch.float8_e4m3fn).float() == w).all()))
            return func(*args, **(kwargs or {}))

    t8 = Trainer(task="mlp", precision="fp8_e4m3", seed=0, record=False)
    assert t8.scaler is None and t8.policy_handle.policy.rules == {"*": "fp8_e4m3"}
    master = t8.model.fc2.weight
    with Linears() as seen:
        t8.step()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in t8.model.modules())
    assert seen.exact == [True] * n_linear
    assert t8.model.fc2.weight is master  # the fp32 master weight is back after the forward
    assert not bool((master.to(torch.float8_e4m3fn).float() == master).all())
    t8.close()


def test_data_and_models_are_deterministic() -> None:
    for task in TASKS.values():
        a, b, c = task.batches(seed=3), task.batches(seed=3), task.batches(seed=4)
        for _ in range(3):
            (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
        assert len(xa) == task.batch_size
        wa, wb = task.model(seed=1).state_dict(), task.model(seed=1).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Two trainers with one seed train bit-identically (what "race" mode relies on).
    ta, tb = (Trainer(task="text", seed=5, record=False) for _ in range(2))
    assert [ta.step()["loss"] for _ in range(3)] == [tb.step()["loss"] for _ in range(3)]
    ta.close(), tb.close()


def test_data_is_what_it_says() -> None:
    # Text: bytes of the stdlib sources; the target is the input shifted by one byte.
    text = stdlib_text()
    assert len(text) == 300_000 and b"def " in text and b"import " in text
    x, y = next(TASKS["text"].batches(seed=0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    window = bytes(x[0].tolist()) + bytes([int(y[0, -1])])
    assert window in text
    # Digits: sklearn's 1797 images, held-out split disjoint and fixed.
    from sklearn.datasets import load_breast_cancer, load_digits

    split = TASKS["digits"].data()
    assert len(split.x_train) + len(split.x_eval) == len(load_digits().images)
    assert split.x_train.shape[1:] == (1, 8, 8) and float(split.x_train.max()) <= 1.0
    # MLP: standardised with training statistics.
    s = TASKS["mlp"].data()
    assert len(s.x_train) + len(s.x_eval) == len(load_breast_cancer().data)
    assert torch.allclose(s.x_train.mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(s.x_train.std(0), torch.ones(30), atol=1e-4)


def test_metrics_match_a_hand_computation() -> None:
    for name in TASKS:
        task = TASKS[name]
        model = task.model(seed=2)
        x, y = task.eval_batch()
        with torch.no_grad():
            out = model(x)
        logits = out.reshape(-1, out.shape[-1])
        nll = -logits.log_softmax(-1).gather(1, y.reshape(-1, 1)).mean().item()
        got = task.evaluate(model)
        assert got["loss"] == pytest.approx(nll, rel=1e-5)
        if task.metric_name == "bits_per_char":
            assert got["bits_per_char"] == pytest.approx(nll / math.log(2), rel=1e-5)
        else:
            hits = sum(int(p == t) for p, t in zip(logits.argmax(-1).tolist(), y.tolist()))
            assert got["accuracy"] == pytest.approx(hits / len(y))


def test_old_import_path_and_one_accuracy() -> None:
    """`from mpviz.demos import ...` (notebooks, benchmarks, other tests) gives the very objects
    of `mpviz.tasks` and `mpviz.training`; a demo's eval_fn, a task's evaluate() and
    `mpviz.evaluate`'s default metric are one accuracy."""
    import mpviz.demos
    import mpviz.precision
    import mpviz.tasks
    import mpviz.training

    for name in mpviz.demos.__all__:
        home = next((m for m in (mpviz.tasks, mpviz.training) if hasattr(m, name)), mpviz.precision)
        assert getattr(mpviz.demos, name) is getattr(home, name), name
    parts = demo_parts("digits", seed=3)
    model, batch = parts["model"].eval(), parts["eval_data"][0]
    with torch.no_grad():
        got = parts["eval_fn"](model, batch)
        hits = sum(int(p == t) for p, t in zip(model(batch[0]).argmax(-1).tolist(), batch[1].tolist()))
    assert parts["eval_fn"].__name__ == "accuracy"
    assert got == TASKS["digits"].evaluate(model)["accuracy"] == pytest.approx(hits / len(batch[1]))
    summary = mpviz.evaluate(model, [batch], precisions=["fp32"]).summary
    assert summary.attrs["metric"] == "accuracy" and summary["metric"][0] == pytest.approx(got)


def test_recorded_trainer_writes_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "rec"
    with Trainer(task="digits", precision="fp16", seed=1, run_dir=run_dir, every=5,
                 meta={"note": "test"}) as t:
        idx = [t.step()["step"] for _ in range(12)]
        t.policy_handle.update({"head": "fp32"})
        idx += [t.step()["step"] for _ in range(3)]
        assert t.run.last_step == 14
    assert idx == list(range(15))
    run = mpviz.load_run(run_dir)
    meta = run.meta
    assert (meta["task"], meta["precision"], meta["batch_size"], meta["lr"], meta["seed"], meta["note"]) == \
        ("digits", "fp16", 64, 3e-3, 1, "test")
    assert meta["status"] == "finished"
    assert len(run.steps) == 15 and run.steps["samples"].eq(64).all()
    assert sorted(run.layer_stats["step"].unique()) == [0, 5, 10]
    changes = run.policy_changes
    assert ((changes["layer"] == "head") & (changes["precision"] == "fp32") & (changes["step"] == 12)).any()
    assert {"conv1", "conv2", "fc1", "head"} <= set(run.layers["layer"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.model.modules())


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'digits'.*digits, text, mlp|digits, text, mlp.*'digits'"):
        get_task("digit")
    with pytest.raises(ValueError, match="fp32"):
        Trainer(task="mlp", precision="fp12", record=False)
    with pytest.raises(ValueError, match="'head'"):
        Trainer(task="mlp", policy={"haed": "fp32"}, run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written for a policy that cannot apply
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(task="mlp", batch_size=0, record=False)


# ----------------------------------------------------------------------------- command line


def test_cli_demo_records_a_readable_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "cli"
    rc = main(["demo", "--task", "mlp", "--precision", "float16", "--steps", "25", "--every", "5",
               "--run-dir", str(run_dir), "--policy", "head=fp32", "--seed", "2", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and str(run_dir) in out and "skipped" in out and "samples/s" in out
    run = mpviz.load_run(run_dir)
    assert len(run.steps) == 25 and run.last_step == 24
    assert (run.meta["task"], run.meta["precision"], run.meta["seed"]) == ("mlp", "fp16", 2)
    assert sorted(run.layer_stats["step"].unique()) == [0, 5, 10, 15, 20]
    head = run.policy_changes.query("layer == 'head'")
    assert list(head["precision"]) == ["fp32"]

    assert main(["info", str(run_dir)]) == 0
    info = capsys.readouterr().out
    assert "25 steps" in info and "task mlp" in info and "finished" in info


def test_cli_subprocess_with_progress_bar(tmp_path: Path) -> None:
    run_dir = tmp_path / "sub"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "mpviz", "demo", "--task", "digits", "--precision", "bf16",
                        "--steps", "12", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "12/12" in p.stderr and "loss=" in p.stderr  # tqdm bar with the loss in its postfix
    assert len(mpviz.load_run(run_dir).steps) == 12


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert TASK_NAMES == tuple(TASKS)  # the CLI's list (kept torch-free for --help) matches
    with pytest.raises(SystemExit) as e:
        main(["demo", "--task", "digitz"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "digits, text, mlp" in err and "did you mean digits" in err
    with pytest.raises(SystemExit):
        main(["demo", "--precision", "fp12"])
    err = capsys.readouterr().err
    assert all(p in err for p in PRECISIONS)
    with pytest.raises(SystemExit):
        main(["demo", "--policy", "head:fp32"])
    assert "LAYER_PATTERN=PRECISION" in capsys.readouterr().err
    assert parse_policy("head=fp32, conv*=mixed_bfloat16") == {"head": "fp32", "conv*": "bf16"}
    assert main(["info", "/nonexistent/run"]) == 2
