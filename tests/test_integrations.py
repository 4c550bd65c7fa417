"""Hugging Face Trainer and Lightning callbacks: a real (tiny) training run with each, recorded
with no other change to the training code, compared with the trainer's own numbers and with the
same run without the callback (bit-identical parameters: mpviz only observes)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mpviz
from models import SPECS
from test_recorder_trust import hooks_of

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

HF_STEPS = 5


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


def _hf_train(out: Path, callback=None, **precision) -> tuple:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], seed=0,
                             per_device_train_batch_size=2, max_steps=HF_STEPS, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, **precision)
    trainer = Trainer(model=SPECS["gpt2"].build(), args=args, train_dataset=_Samples(),
                      callbacks=[callback] if callback is not None else None)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, logged, params


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    from mpviz.integrations.hf import MpvizCallback

    tmp = tmp_path_factory.mktemp("hf")
    _, logged_plain, params_plain = _hf_train(tmp / "plain", bf16=True)
    cb = MpvizCallback(run_dir=tmp / "run", every=2)
    trainer, logged, params = _hf_train(tmp / "rec", cb, bf16=True)
    return cb, trainer, logged, params, logged_plain, params_plain


def test_hf_trainer_bf16_recorded_and_bit_identical(hf_bf16):
    cb, trainer, logged, params, logged_plain, params_plain = hf_bf16
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
    # nothing of ours is left on the model
    assert not trainer.model._forward_hooks and not trainer.model._forward_pre_hooks


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

    cb = MpvizCallback(run_dir=tmp_path / "run", every=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], seed=0,
                             per_device_train_batch_size=2, max_steps=HF_STEPS, save_strategy="no",
                             disable_tqdm=True, bf16=True)
    model = SPECS["gpt2"].build()
    before = hooks_of(model, torch.optim.SGD(model.parameters()))
    trainer = Trainer(model=model, args=args, train_dataset=_Samples(), callbacks=[cb, Crash()])
    with pytest.raises(RuntimeError, match="data loader died"):
        with cb:
            trainer.train()
    # the model's forward hooks and the optimizer's step hooks (accelerate's wrapper unwrapped)
    assert cb.recorder is None and hooks_of(model, trainer.optimizer.optimizer) == before
    run = mpviz.load_run(cb.run_dir)
    assert run.meta["status"] == "failed"
    assert run.meta["error"] == "RuntimeError: data loader died"
    assert run.steps["step"].tolist() == [0, 1, 2]   # the steps before the crash are kept


# ---------------------------------------------------------------- Lightning
PL_STEPS = 6


def _pl_module():
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
            loss = torch.nn.functional.cross_entropy(self(x).float(), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _pl_train(callback=None, **trainer_kwargs):
    import lightning.pytorch as pl

    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(PL_STEPS * 4, 16, generator=g),
                                        torch.randint(0, 4, (PL_STEPS * 4,), generator=g))
    pl.seed_everything(0, verbose=False)
    module = _pl_module()
    trainer = pl.Trainer(accelerator="cpu", max_steps=PL_STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback] if callback else None,
                         **trainer_kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=4))
    return trainer, module, {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_recorded_and_bit_identical(tmp_path, precision):
    """bf16-mixed as Lightning runs it on the CPU; 16-mixed (which Lightning turns into bf16 on
    the CPU) through its MixedPrecision plugin with a CPU GradScaler, so the scaler is real."""
    from lightning.pytorch.plugins import MixedPrecision

    from mpviz.integrations.lightning import MpvizCallback

    kw = ({"precision": precision} if precision == "bf16-mixed" else
          {"plugins": [MixedPrecision("16-mixed", "cpu")]})
    _, plain_module, params_plain = _pl_train(**kw)
    cb = MpvizCallback(run_dir=tmp_path / "run", every=3)
    trainer, module, params = _pl_train(cb, **kw)
    run = mpviz.load_run(cb.run_dir)
    steps = run.steps
    assert run.meta["status"] == "finished" and not run.meta.get("recorder_errors")
    assert steps["step"].tolist() == list(range(PL_STEPS)) == list(range(trainer.global_step))
    assert steps["loss"].tolist() == pytest.approx(module.losses, rel=1e-6, abs=0)
    assert (steps["samples"] == 4).all()
    dtype = "bfloat16" if precision == "bf16-mixed" else "float16"
    assert run.meta["autocast_dtype"] == dtype
    assert run.dtype_map(0)["output"]["net.0"] == dtype
    scaler = trainer.precision_plugin.scaler
    if precision == "16-mixed":
        assert run.meta["scaler"]["enabled"] and scaler is not None
        assert steps["loss_scale"].iloc[0] == 2.0 ** 16
        assert steps["loss_scale_after"].iloc[-1] == scaler.get_scale()
        grads = run.layer_stats.query("tensor == 'grad' and layer == 'net.0'")
        assert grads["norm"].max() < 100  # unscaled (scaled ones would be ~65536x larger)
    else:
        assert scaler is None and run.meta["scaler"] is None
    assert module.losses == plain_module.losses  # mpviz only observes
    for k in params:
        assert torch.equal(params[k], params_plain[k]), k
    assert not module._forward_hooks and not module._forward_pre_hooks


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
