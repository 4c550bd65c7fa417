"""Hugging Face Trainer and Lightning callbacks: a real (tiny) training run with each, recorded
with no other change to the training code, compared with the trainer's own numbers and with the
same run without the callback (bit-identical parameters: mpviz only observes).

Independent references: the trainers' own logs (losses, the Trainer's pre-clip ``grad_norm``),
the test's own forward hooks (per-layer dtypes, activation statistics) and Lightning's
``on_before_optimizer_step`` (gradients after GradScaler's unscale_, before clipping)."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mpviz
from helpers.hooks import hook_snapshot
from models import SPECS

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

HF_STEPS = 5


def grad_rss(run) -> dict[int, float]:
    """Per step, the root-sum-square of the recorded per-layer gradient norms: the total norm of
    the gradients (each parameter belongs to exactly one layer)."""
    grads = run.layer_stats.query("tensor == 'grad'")
    return {int(step): math.sqrt(float((g["norm"] ** 2).sum())) for step, g in grads.groupby("step")}


# ---------------------------------------------------------------- Hugging Face Trainer
class _Samples(torch.utils.data.Dataset):
    """GPT-2 token sequences from tests/models.py, one sample per item."""

    def __init__(self, n: int = 16) -> None:
        batches = SPECS["gpt2"].batches((n + 1) // 2)
        self.items = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))][:n]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def _hf_snapshot():
    """A TrainerCallback, to be put before mpviz's: every hook on the model and the optimizer
    before the recorder attaches (``.before``)."""
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        before: dict | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.before = hook_snapshot(model, optimizer.optimizer)  # accelerate's wrapper

    return Snapshot()


def _hf_train(out: Path, callback=None, **precision) -> tuple:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], seed=0,
                             per_device_train_batch_size=2, max_steps=HF_STEPS, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, **precision)
    callbacks = callback if isinstance(callback, list) else [callback] if callback else None
    trainer = Trainer(model=SPECS["gpt2"].build(), args=args, train_dataset=_Samples(),
                      callbacks=callbacks)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, logged, params


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    from mpviz.integrations.hf import MpvizCallback

    tmp = tmp_path_factory.mktemp("hf")
    _, logged_plain, params_plain = _hf_train(tmp / "plain", bf16=True)
    cb, snap = MpvizCallback(run_dir=tmp / "run", every=2), _hf_snapshot()
    trainer, logged, params = _hf_train(tmp / "rec", [snap, cb], bf16=True)
    return cb, snap, trainer, logged, params, logged_plain, params_plain


def test_hf_trainer_bf16_recorded_and_bit_identical(hf_bf16):
    cb, snap, trainer, logged, params, logged_plain, params_plain = hf_bf16
    run = mpviz.load_run(cb.run_dir)
    steps = run.steps
    assert cb.recorder is None and run.meta["status"] == "finished"
    assert not run.meta.get("recorder_errors"), run.meta.get("recorder_errors")
    # one recorded step per optimizer step, with the loss the Trainer logged (logging_steps=1)
    assert steps["step"].tolist() == list(range(HF_STEPS)) == list(range(trainer.state.global_step))
    assert steps["loss"].tolist() == pytest.approx(logged, rel=1e-6, abs=0)
    assert (steps["samples"] == 2).all() and not steps["skipped"].any()
    assert run.meta["scaler"] is None and run.meta["autocast_dtype"] == "bfloat16"
    # autocast ran the Conv1D projections (addmm) in bf16; LayerNorm stays fp32
    out = run.dtype_map(0)["output"]
    assert out["transformer.h.0.attn.c_attn"] == "bfloat16"
    assert out["transformer.h.0.mlp.c_fc"] == "bfloat16"
    assert out["transformer.h.0.ln_1"] == "float32"
    stats = run.layer_stats
    assert sorted(stats["step"].unique()) == [0, 2, 4]  # every=2
    assert {"activation", "grad", "weight"} <= set(stats["tensor"])
    # mpviz only observes: same losses and bit-identical parameters without the callback
    assert logged == logged_plain
    assert params.keys() == params_plain.keys()
    for k in params:
        assert torch.equal(params[k], params_plain[k]), k
    # nothing of ours is left on any module, parameter or the optimizer (nor in torch's globals)
    assert hook_snapshot(trainer.model, trainer.optimizer.optimizer) == snap.before


@pytest.mark.parametrize("precision", [{"bf16": True}, {}, {"fp16": True, "gradient_accumulation_steps": 2}],
                         ids=["bf16", "fp32", "fp16-on-cpu-accum2"])
def test_hf_trainer_gradients_recorded_before_clipping(tmp_path, precision):
    """The recorded gradients are the ones backward produced, before the Trainer clips them
    (max_grad_norm=1.0, the default): the root-sum-square of the per-layer gradient norms is
    the total norm clip_grad_norm_ returned, which the Trainer logs as grad_norm (every step,
    logging_steps=1). No GradScaler here: on the CPU, fp16=True trains in fp32 (accelerate
    enables fp16 autocast and a GradScaler only on accelerators); that case also accumulates
    two micro-batches per step, so the step's gradients are the sum of two backwards."""
    from mpviz.integrations.hf import MpvizCallback

    cb = MpvizCallback(run_dir=tmp_path / "run", every=1)
    trainer, _, _ = _hf_train(tmp_path / "out", cb, **precision)
    assert trainer.accelerator.scaler is None and trainer.args.max_grad_norm == 1.0
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == HF_STEPS
    assert min(logged) > 1.5, logged  # clipping changed the gradients on every step
    run = mpviz.load_run(cb.run_dir)
    assert not run.meta.get("recorder_errors"), run.meta.get("recorder_errors")
    # every layer that owns parameters has its gradient recorded on every step
    owners, seen = set(), set()
    for name, m in trainer.model.named_modules():
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                owners.add(name)
    grads = run.layer_stats.query("tensor == 'grad'")
    for step in range(HF_STEPS):
        assert set(grads[grads["step"] == step]["layer"]) == owners, step
    recorded = grad_rss(run)
    assert list(recorded) == list(range(HF_STEPS))
    # (a clipped gradient would give exactly 1.0 here)
    assert list(recorded.values()) == pytest.approx(logged, rel=1e-4, abs=0)


def test_hf_trainer_fp16_on_cpu_runs_fp32(tmp_path):
    """The Trainer accepts fp16=True with use_cpu=True, but accelerate enables fp16 autocast and a
    GradScaler only on accelerators: on the CPU it trains in fp32, and the run says so."""
    from mpviz.integrations.hf import MpvizCallback

    cb = MpvizCallback(run_dir=tmp_path / "run", every=5)
    # with gradient accumulation: a step is 2 micro-batches, its loss the one the Trainer logs
    trainer, logged, _ = _hf_train(tmp_path / "out", cb, fp16=True, gradient_accumulation_steps=2)
    assert trainer.accelerator.scaler is None
    run = mpviz.load_run(cb.run_dir)
    assert run.meta["scaler"] is None and run.meta["autocast_dtype"] is None
    assert set(run.dtypes["dtype"].dropna()) == {"float32"}
    assert run.steps["loss"].tolist() == pytest.approx(logged, rel=1e-6, abs=0)
    assert len(logged) == HF_STEPS and (run.steps["samples"] == 4).all()


def test_hf_train_that_raises_marks_the_run_failed_and_removes_the_hooks(tmp_path):
    """The Trainer has no exception event: `with callback: trainer.train()` closes the run as
    failed, with the error, and the model has no hook left (without `with`, it stays "running")."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mpviz.integrations.hf import MpvizCallback

    class Crash(TrainerCallback):   # the user's own code failing at step 3
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("data loader died")

    cb, snap = MpvizCallback(run_dir=tmp_path / "run", every=2), _hf_snapshot()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], seed=0,
                             per_device_train_batch_size=2, max_steps=HF_STEPS, save_strategy="no",
                             disable_tqdm=True, bf16=True)
    model = SPECS["gpt2"].build()
    trainer = Trainer(model=model, args=args, train_dataset=_Samples(), callbacks=[snap, cb, Crash()])
    with pytest.raises(RuntimeError, match="data loader died"):
        with cb:
            trainer.train()
    # every module's, parameter's and the optimizer's hooks (accelerate's wrapper unwrapped)
    assert cb.recorder is None and hook_snapshot(model, trainer.optimizer.optimizer) == snap.before
    run = mpviz.load_run(cb.run_dir)
    assert run.meta["status"] == "failed"
    assert run.meta["error"] == "RuntimeError: data loader died"
    assert run.steps["step"].tolist() == [0, 1, 2]   # the steps before the crash are kept


# ---------------------------------------------------------------- Lightning
PL_STEPS = 6
PL_CLIP = 0.05  # gradient_clip_val: below every step's gradient norm here, so Lightning clips


def _pl_module(call: str):
    """A tiny LightningModule whose training_step calls the module itself (``self(x)``, as
    Lightning's examples do) or its child (``self.net(x)``: the module's forward never runs)."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                           torch.nn.Dropout(0.1), torch.nn.Linear(32, 4))
            self.losses: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self(x) if call == "self(x)" else self.net(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _pl_reference(module):
    """The test's own view of a Lightning run (a callback put before mpviz's):

    - its forward hooks on ``net`` and each module in it: per step, each one's input and output
      dtype and its output's max |x| and norm (training forwards only);
    - ``on_before_optimizer_step``: per step, each layer's gradient norm as backward produced it
      (Lightning calls it after GradScaler's unscale_ and before it clips the gradients);
    - ``on_train_start``: every hook on the model and the optimizer before mpviz's callback
      attaches (``.before``)."""
    import lightning.pytorch as pl

    class Reference(pl.Callback):
        def __init__(self) -> None:
            self.fwd: list[dict[str, tuple]] = []
            self.grads: list[dict[str, float]] = []
            self.before: dict | None = None
            for name, m in module.net.named_modules():
                m.register_forward_hook(self._hook(f"net.{name}" if name else "net"))

        def _hook(self, name: str):
            def hook(m, args, out):
                if torch.is_grad_enabled() and m.training:
                    o = out.detach().double()
                    self.fwd[-1][name] = (_dtype(args[0]), _dtype(out), o.abs().max().item(),
                                          o.norm().item())
            return hook

        def on_train_start(self, trainer, pl_module):
            self.before = hook_snapshot(pl_module, trainer.optimizers[0])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.fwd.append({})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms = {}
            for name, m in pl_module.named_modules():
                grads = [p.grad.double() for p in m.parameters(recurse=False) if p.grad is not None]
                if grads:
                    norms[name] = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            self.grads.append(norms)

    return Reference()


def _pl_train(call: str, callback=None, **trainer_kwargs):
    import lightning.pytorch as pl

    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(PL_STEPS * 4, 16, generator=g),
                                        torch.randint(0, 4, (PL_STEPS * 4,), generator=g))
    pl.seed_everything(0, verbose=False)
    module = _pl_module(call)
    ref = _pl_reference(module)  # in both runs, so that they differ only by mpviz's callback
    trainer = pl.Trainer(accelerator="cpu", max_steps=PL_STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[ref, callback] if callback else [ref], **trainer_kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=4))
    return trainer, module, {k: v.detach().clone() for k, v in module.state_dict().items()}, ref


@pytest.mark.parametrize("call", ["self(x)", "self.net(x)"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_recorded_and_bit_identical(tmp_path, precision, call):
    """bf16-mixed as Lightning runs it on the CPU; 16-mixed (which Lightning turns into bf16 on
    the CPU) through its MixedPrecision plugin with a CPU GradScaler, so the scaler is real.
    training_step calls the module (``self(x)``) or its child (``self.net(x)``, so the
    LightningModule's forward never runs): either way the recorded per-layer dtypes and
    activation statistics are what the test's own forward hooks saw, and the gradients are the
    ones backward produced (unscaled, before Lightning's gradient clipping)."""
    from lightning.pytorch.plugins import MixedPrecision

    from mpviz.integrations.lightning import MpvizCallback

    kw = ({"precision": precision} if precision == "bf16-mixed" else
          {"plugins": [MixedPrecision("16-mixed", "cpu")]})
    kw["gradient_clip_val"] = PL_CLIP
    _, plain_module, params_plain, _ = _pl_train(call, **kw)
    cb = MpvizCallback(run_dir=tmp_path / "run", every=1)
    trainer, module, params, ref = _pl_train(call, cb, **kw)
    run = mpviz.load_run(cb.run_dir)
    steps = run.steps
    assert run.meta["status"] == "finished" and not run.meta.get("recorder_errors")
    assert steps["step"].tolist() == list(range(PL_STEPS)) == list(range(trainer.global_step))
    assert steps["loss"].tolist() == pytest.approx(module.losses, rel=1e-6, abs=0)
    assert (steps["samples"] == 4).all() and not steps["skipped"].any()
    dtype = "bfloat16" if precision == "bf16-mixed" else "float16"
    assert len(ref.fwd) == len(ref.grads) == PL_STEPS
    assert all(seen["net.0"][1] == seen["net.3"][1] == dtype for seen in ref.fwd)  # autocast ran

    # per-layer input and output dtypes, step by step, as the test's hooks saw them
    dtypes = run.dtypes
    for step, seen in enumerate(ref.fwd):
        now = dtypes[dtypes["step"] <= step].groupby(["layer", "tensor"])["dtype"].last()
        recorded = {name: (now.get((name, "input")), now.get((name, "output"))) for name in seen}
        assert recorded == {name: v[:2] for name, v in seen.items()}, f"dtypes at step {step}"
    assert run.meta["autocast_dtype"] == dtype

    # activation statistics (every=1: every step) of each module's output, against the hooks'
    acts = run.layer_stats.query("tensor == 'activation' and layer.str.startswith('net')")
    rec_max = {(int(r.step), r.layer): r.max_abs for r in acts.itertuples()}
    rec_norm = {(int(r.step), r.layer): r.norm for r in acts.itertuples()}
    rec_dtype = {(int(r.step), r.layer): r.dtype for r in acts.itertuples()}
    ref_max = {(s, name): v[2] for s, seen in enumerate(ref.fwd) for name, v in seen.items()}
    ref_norm = {(s, name): v[3] for s, seen in enumerate(ref.fwd) for name, v in seen.items()}
    ref_dtype = {(s, name): v[1] for s, seen in enumerate(ref.fwd) for name, v in seen.items()}
    assert sorted(rec_max) == sorted(ref_max), "activation rows (step, layer)"
    assert rec_max == pytest.approx(ref_max, rel=1e-6, abs=0)
    assert rec_norm == pytest.approx(ref_norm, rel=1e-4, abs=0)
    assert rec_dtype == ref_dtype

    # gradients as backward produced them: unscaled, and not clipped (clipping was active)
    assert min(math.sqrt(sum(n * n for n in g.values())) for g in ref.grads) > 2 * PL_CLIP
    grads = run.layer_stats.query("tensor == 'grad'")
    rec_grads = {(int(r.step), r.layer): r.norm for r in grads.itertuples()}
    ref_grads = {(s, name): n for s, g in enumerate(ref.grads) for name, n in g.items()}
    assert sorted(rec_grads) == sorted(ref_grads), "gradient rows (step, layer)"
    assert rec_grads == pytest.approx(ref_grads, rel=1e-4, abs=0)

    scaler = trainer.precision_plugin.scaler
    if precision == "16-mixed":
        assert run.meta["scaler"]["enabled"] and scaler is not None
        assert steps["loss_scale"].iloc[0] == 2.0 ** 16
        assert steps["loss_scale_after"].iloc[-1] == scaler.get_scale()
    else:
        assert scaler is None and run.meta["scaler"] is None
    assert module.losses == plain_module.losses  # mpviz only observes
    for k in params:
        assert torch.equal(params[k], params_plain[k]), k
    # nothing of ours is left on any module, parameter or the optimizer (nor in torch's globals)
    assert hook_snapshot(module, trainer.optimizers[0]) == ref.before


# ---------------------------------------------------------------- optional extras
def test_extras_are_optional():
    """import mpviz (and reading, exporting) never imports transformers or lightning; without them
    the integrations raise an ImportError that names the extra. One fresh interpreter."""
    code = textwrap.dedent("""
        import sys
        import mpviz, mpviz.run, mpviz.integrations, mpviz.integrations.export
        mpviz.load_run, mpviz.export, mpviz.thin
        heavy = sorted(m for m in ("transformers", "lightning", "pytorch_lightning", "accelerate")
                       if m in sys.modules)
        assert not heavy, heavy
        sys.modules["transformers"] = None   # as if not installed
        sys.modules["lightning"] = None
        sys.modules["lightning.pytorch"] = None
        for mod in ("hf", "lightning"):
            try:
                __import__("mpviz.integrations." + mod)
            except ImportError as e:
                print(e)
            else:
                raise AssertionError(mod + " imported without its package")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].endswith('pip install "mpviz[hf]"') and "transformers" in lines[0]
    assert lines[1].endswith('pip install "mpviz[lightning]"') and "lightning" in lines[1]
