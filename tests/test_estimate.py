"""mpviz.estimate (#21): FLOPs against hand counts and FlopCounterMode, bytes against the model's
own tensors, a real optimizer's state and memory_report's measurement, and predictions that make
common sense on the GPUs of the datasheet table."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mpviz
from mpviz.cost import Counts, count, predict
from mpviz.cost.pricing import OPTIMIZER_ROW
from mpviz.cost.records import LOSS

F = nn.functional
pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks")
EXTRA = [LOSS, OPTIMIZER_ROW]


def _rows(est):
    return est.layers.set_index("layer")


def _gpt2(attn="sdpa", **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256, bos_token_id=0,
               eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw}))


def _gemm_mlp(width, tokens):
    """Two large GEMMs on the meta device: no weights, no compute."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        batch = (torch.randn(tokens, width), torch.randn(tokens, width))
    return model, batch


def _llama7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids}


# ----------------------------------------------------------------------------- FLOPs


def test_linear_flops_are_the_hand_count_and_flop_counter_modes():
    torch.manual_seed(0)
    d_in, d_hidden, d_out = 16, 32, 8
    model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))
    x, y = torch.randn(2, 24, d_in), torch.randint(0, d_out, (2, 24))
    tokens = 2 * 24
    flops = _rows(mpviz.estimate(model, (x, y)))["flops"]
    # Forward, gradient of the input, gradient of the weight: 3 x 2*tokens*in*out.
    assert flops["2"] == 3 * 2 * tokens * d_hidden * d_out
    # The first Linear's input needs no gradient, and autograd computes none.
    assert flops["0"] == 2 * 2 * tokens * d_in * d_hidden
    assert flops["1"] == flops[""] == flops[LOSS] == flops[OPTIMIZER_ROW] == 0

    with FlopCounterMode(display=False) as reference:  # the same step, counted by torch
        F.cross_entropy(model(x).reshape(-1, d_out), y.reshape(-1)).backward()
    model.zero_grad(set_to_none=True)
    assert flops.sum() == reference.get_total_flops()


def test_hugging_face_dict_batch_and_flops_of_a_gpt2():
    model = _gpt2(attn="eager")
    ids = torch.randint(0, 128, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    est = mpviz.estimate(model, batch, policy="bf16")
    assert est.counts.device == "meta"  # the mask of all ones was left out: it means no mask
    with FlopCounterMode(display=False) as reference:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    assert est.counts.flops() == reference.get_total_flops()
    rows = _rows(est)
    assert rows.loc["lm_head", "flops"] > 0 and rows.loc["transformer.h.1.mlp.c_fc", "bound"] is not None
    assert set(rows["precision"]) == {"bf16", "fp32"}  # the model, and the optimizer row

    # SDPA (GPT-2's default): one fused kernel, counted as attention, as a GPU runs it.
    sdpa = _gpt2()
    counts = count(sdpa, batch)
    attention = [o for o in counts.ops if o.kind == "attention"]
    assert {o.layer for o in attention} == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert all(o.flops > 0 for o in attention) and counts.device == "meta"
    # A padded batch: the model reads the mask's values to choose its path, so it runs for real.
    padded = {**batch, "attention_mask": torch.ones_like(ids).index_fill_(1, torch.tensor([15]), 0)}
    real = count(sdpa, padded)
    assert real.device == "cpu" and real.flops() == counts.flops()


def test_torch_transformer_with_a_forward():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           batch_first=True)
    src, tgt = torch.randn(4, 10, 32), torch.randn(4, 12, 32)

    def forward(m, b):
        return m(b[0], b[1])

    est = mpviz.estimate(model, (src, tgt), policy={"*": "bf16", "*norm*": "fp32"}, forward=forward)
    rows = _rows(est)
    assert est.precision == "mixed" and rows.loc["encoder.layers.0.norm1", "precision"] == "fp32"
    assert rows.loc["decoder.layers.0.linear1", "precision"] == "bf16"
    assert rows.loc["encoder.layers.0.self_attn", "flops"] > 0 and rows.loc["decoder.layers.0.linear2", "flops"] > 0
    # The same step on a meta copy, counted by torch (the count runs on meta too).
    meta = count(model, (src, tgt), forward=forward)
    assert meta.device == "meta"
    with torch.device("meta"):
        copy = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=64, batch_first=True)
    with FlopCounterMode(display=False) as reference:
        copy(src.to("meta"), tgt.to("meta")).sum().backward()
    assert meta.flops() == reference.get_total_flops()


# ----------------------------------------------------------------------------- memory


class _Tied(nn.Module):
    """Buffers (BatchNorm), a frozen parameter and a weight shared by two layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.BatchNorm1d(16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.frozen(self.norm(self.emb(ids))))


def test_weight_gradient_and_adamw_bytes_are_exact():
    torch.manual_seed(0)
    model = _Tied()
    ids, y = torch.randint(0, 50, (8,)), torch.randint(0, 50, (8,))
    est = mpviz.estimate(model, (ids, y), policy="bf16", optimizer="adamw")

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    # By hand, from the model's own tensors (a shared weight once) and a real AdamW step.
    assert est.memory["weights"] == nbytes(model.parameters()) + nbytes(model.buffers())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(ids), y).backward()
    opt.step()
    assert est.memory["grads"] == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    assert est.memory["optimizer"] == nbytes(v for s in opt.state.values() for k, v in s.items() if k != "step")
    assert est.memory["total"] == sum(est.memory[k] for k in ("weights", "grads", "optimizer", "activations"))
    assert est.fits
    assert mpviz.estimate(model, (ids, y), optimizer="sgd").memory["optimizer"] == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("which", ["mlp", "gpt2"])
def test_activation_bytes_agree_with_memory_report(which, precision):
    torch.manual_seed(0)
    if which == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        batch = (torch.randn(32, 64), torch.randint(0, 10, (32,)))
    else:
        # Attention without dropout and GELU written as F.gelu: here CPU autocast (what
        # memory_report measures) and CUDA autocast (what the estimate predicts) keep the same
        # dtypes. (GPT-2's default GELU calls pow, which CUDA autocast runs in fp32 and the CPU's
        # does not; the CPU runs attention with dropout on its math path, a GPU fused.)
        model = _gpt2(attn_pdrop=0.0, activation_function="gelu")
        ids = torch.randint(0, 128, (4, 32))
        batch = {"input_ids": ids, "labels": ids}
    est = mpviz.estimate(model, batch, policy=precision)
    measured = mpviz.memory_report(model, {"*": precision}, batch)
    predicted = _rows(est)["activation_bytes"].drop(EXTRA)  # memory_report runs no loss
    assert predicted.sum() == pytest.approx(measured.attrs["totals"]["saved_activation_bytes"], rel=0.10)
    assert est.memory["activations"] >= predicted.sum()


# ----------------------------------------------------------------------------- common sense


def test_bf16_is_several_times_faster_on_gemms_but_not_on_a_tiny_model():
    model, batch = _gemm_mlp(4096, 8192)
    fp32, bf16 = (mpviz.estimate(model, batch, policy=p) for p in ("fp32", "bf16"))
    assert fp32.step_time_s > 4 * bf16.step_time_s
    assert _rows(bf16).loc["0", "bound"] == "compute"
    assert bf16.memory["activations"] < fp32.memory["activations"]

    tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = (torch.randn(4, 8), torch.randint(0, 2, (4,)))
    fp32, bf16 = (mpviz.estimate(tiny, batch, policy=p) for p in ("fp32", "bf16"))
    assert 0.5 < fp32.step_time_s / bf16.step_time_s < 1.2  # launch-bound: casts cost as much as they save
    assert set(fp32.layers["bound"].dropna()) == {"overhead"}


def test_an_a100_is_slower_than_an_h100_and_has_no_fp8():
    model, batch = _gemm_mlp(2048, 4096)
    counts = count(model, batch)
    for p in ("fp32", "tf32", "bf16", "fp16"):
        assert predict(counts, p, "a100").step_time_s > predict(counts, p, "h100").step_time_s
    with pytest.raises(ValueError, match="no fp8 peak.*h100"):
        predict(counts, "fp8", "a100")


def test_fp8_linears_beat_bf16_by_less_than_2x_once_casts_count():
    model, batch = _gemm_mlp(8192, 16384)
    counts = count(model, batch)
    bf16 = predict(counts, "bf16")
    fp8 = predict(counts, {"": "bf16", "0": "fp8", "2": "fp8"})
    assert fp8.precision == "mixed"
    linears = ["0", "2"]
    gain = _rows(bf16).loc[linears, "time_s"].sum() / _rows(fp8).loc[linears, "time_s"].sum()
    assert 1.2 < gain < 2.0  # the fp8 peak is twice bf16's; scaling and casts take some back
    assert 1.0 < bf16.step_time_s / fp8.step_time_s < gain
    # Small GEMMs: the casts cost more than the fp8 GEMMs save.
    small = count(*_gemm_mlp(256, 256))
    assert predict(small, {"": "bf16", "0": "fp8", "2": "fp8"}).step_time_s > predict(small, "bf16").step_time_s


def test_llama_7b_on_meta_counts_in_under_a_second_and_does_not_fit_an_h100():
    model, batch = _llama7b()
    seconds = []
    for _ in range(3):  # the best of three: the machine is shared
        start = time.perf_counter()
        counts = count(model, batch)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0
    params = sum(p.numel() for p in model.parameters())
    assert 6.5e9 < params < 7e9
    # Forward and backward of the GEMMs alone are 6 x params x tokens.
    assert counts.flops() > 6 * params * 2048

    est = predict(counts, "bf16", "h100", optimizer="adamw")
    assert est.step_time_s >= counts.flops() / est.device.peak("bf16")  # no faster than the datasheet
    assert not est.fits and est.memory["total"] > 80e9
    # fp32 master weights, their gradients and two AdamW moments: 16 bytes per parameter.
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    assert est.memory["weights"] + est.memory["grads"] + est.memory["optimizer"] == 16 * params + buffers
    assert "does not fit" in repr(est)


# ----------------------------------------------------------------------------- refusals, policies


def test_unknown_device_optimizer_and_layer_are_refused_with_the_known_ones():
    model = nn.Sequential(nn.Linear(4, 4))
    batch = (torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="Known GPUs: a100, h100, h200, l4, l40s, rtx4090") as e:
        mpviz.estimate(model, batch, device="h10")
    assert "'h100'" in str(e.value)
    with pytest.raises(ValueError, match="Unknown optimizer 'adam_w'.*'adamw'"):
        mpviz.estimate(model, batch, optimizer="adam_w")
    with pytest.raises(ValueError, match="Policy rule 'head'"):
        mpviz.estimate(model, batch, policy={"head": "bf16"})
    # torch.cuda.get_device_name() spellings are known.
    assert mpviz.cost.get_device("NVIDIA H100 80GB HBM3").name == "h100"
    assert mpviz.cost.get_device("NVIDIA GeForce RTX 4090").name == "rtx4090"
    table = mpviz.devices().set_index("name")
    assert {"a100", "h100", "l4", "l40s", "rtx4090"} <= set(table.index)
    assert table["fp8"].isna().loc["a100"] and table.loc["h100", "bf16"] == 989.5
    assert table["source"].str.contains("datasheet|whitepaper").all()


def test_a_policy_per_layer_changes_those_layers_rows():
    model = _gpt2(n_embd=1024, n_head=16)  # GEMMs large enough not to be launch-bound
    ids = torch.randint(0, 128, (4, 256))
    batch = {"input_ids": ids, "labels": ids}
    counts = count(model, batch)
    base = _rows(predict(counts, "bf16"))
    changed = "transformer.h.0.mlp"
    rows = _rows(mpviz.estimate(model, batch, policy={"*": "bf16", changed: "fp32"}))
    inside = [n for n in rows.index if n == changed or n.startswith(changed + ".")]
    assert (rows.loc[inside, "precision"] == "fp32").all()
    assert (rows.drop(inside + EXTRA)["precision"] == "bf16").all()
    assert rows.loc[changed + ".c_fc", "time_s"] > base.loc[changed + ".c_fc", "time_s"]  # an fp32 GEMM
    assert (rows["flops"] == base["flops"]).all()
    # Elsewhere nothing changes but the block around it, whose residual add now reads the
    # MLP's output in fp32.
    others = rows.index.difference(inside + ["transformer.h.0"])
    cols = ["time_s", "bytes", "bound", "activation_bytes"]
    assert rows.loc[others, cols].equals(base.loc[others, cols])
    assert rows.loc["transformer.h.0", "bytes"] > base.loc["transformer.h.0", "bytes"]


def test_a_layer_norm_in_fp32_costs_nothing_more_under_autocast():
    # CUDA autocast runs layer_norm in fp32 anyway: keeping it there is free.
    model = _gpt2()
    batch = {"input_ids": torch.randint(0, 128, (4, 32))}
    counts = count(model, batch)
    everywhere, ln = predict(counts, "bf16"), predict(counts, {"": "bf16", "transformer.h.0.ln_1": "fp32"})
    assert ln.step_time_s == pytest.approx(everywhere.step_time_s)
    assert _rows(ln).loc["transformer.h.0.ln_1", "precision"] == "fp32"


def test_fp16_adds_the_grad_scalers_pass_to_the_optimizer_row():
    model, batch = _gemm_mlp(512, 512)
    counts = count(model, batch)
    opt16, opt32 = (_rows(predict(counts, p)).loc[OPTIMIZER_ROW, "bytes"] for p in ("fp16", "bf16"))
    params = sum(p.numel() for p in model.parameters())
    assert opt16 - opt32 == 2 * 4 * params  # one read and one write of each fp32 gradient


# ----------------------------------------------------------------------------- the model, the records


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 2))
    model[1].eval()
    batch = (torch.randn(16, 8), torch.randint(0, 2, (16,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    counts = count(model, batch)
    real = count(model, batch, meta=False)  # the run on the model itself
    assert counts.device == "meta" and real.device == "cpu"
    assert counts.flops() == real.flops()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model[1].training
    assert not any(getattr(m, d, None) for m in model.modules() for d in HOOK_DICTS)


def test_a_real_count_leaves_a_recorder_on_the_model_nothing_to_see(tmp_path):
    """A forward that reads values cannot run on meta: the count runs for real, on a copy, so
    the user's hooks (here a recorder's) never see that extra forward and backward."""
    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x if bool((x > 0).any()) else -x)

    model = ReadsValues()
    batch = (torch.randn(16, 8), torch.randint(0, 2, (16,)))
    seen = []
    model.fc.register_forward_hook(lambda *a: seen.append("forward"))
    model.fc.weight.register_hook(lambda g: seen.append("backward"))
    with mpviz.Recorder(model, run_dir=tmp_path / "run") as rec:
        counts = count(model, batch)
        assert counts.device == "cpu" and counts.flops("forward") == 2 * 16 * 8 * 2
        rec.flush()
        assert seen == [] and len(rec.run.steps) == 0


def test_a_compiled_model_or_one_under_a_policy_is_counted_as_its_own_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    batch = (torch.randn(4, 8), torch.randint(0, 2, (4,)))
    eager = mpviz.estimate(model, batch, policy={"*": "bf16", "2": "fp32"})
    compiled = mpviz.estimate(torch.compile(model), batch, policy={"*": "bf16", "2": "fp32"})
    assert compiled.layers.equals(eager.layers)
    # A policy applied for training does not change what is counted: the estimate's policy rules.
    with mpviz.apply_policy(model, {"*": "fp16"}, device_type="cpu"):
        applied = mpviz.estimate(model, batch, policy={"*": "bf16", "2": "fp32"})
    assert applied.layers.equals(eager.layers)


def test_stored_counts_predict_the_same_without_the_model_or_torch():
    model, batch = _gemm_mlp(256, 512)
    est = mpviz.estimate(model, batch, policy={"*": "bf16", "1": "fp32"})
    stored = json.loads(json.dumps(est.counts.to_dict()))
    again = predict(Counts.from_dict(stored), {"": "bf16", "1": "fp32"})
    assert again.step_time_s == est.step_time_s and again.memory == est.memory
    code = ("import sys, mpviz.cost.pricing, mpviz.cost.gpus, mpviz.cost.records, mpviz.cost; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_the_speed_benchmark_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import estimate_speed

    model, batch = estimate_speed.gpt2(layers=1, width=32, heads=2, vocab=64, seq=16, batch=2)
    seconds, est = estimate_speed.measure(model, batch, runs=1)
    assert seconds > 0 and est.step_time_s > 0


@pytest.mark.parametrize("which", ["mlp", "gpt2"])
def test_a_count_scaled_k_times_prices_as_the_count_of_a_k_times_larger_batch(which):
    """`Counts.scaled(k)` against a real count of k times the batch: FLOPs exactly, bytes, memory
    and step time within 2%, in fp32 and bf16. The MLP's batch makes an activation's gradient the
    size of a weight (256 x 256), and the GPT-2 ties its embedding to its head (two gradients of
    one weight added): both must stay unscaled as parameter gradients, or not, as they are."""
    torch.manual_seed(0)
    if which == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        b, k = 256, 64

        def batch(n):
            return torch.randn(n, 64), torch.randint(0, 10, (n,))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256,
                                           n_positions=32, bos_token_id=0, eos_token_id=0))
        b, k = 2, 512

        def batch(n):
            ids = torch.randint(0, 256, (n, 16))
            return {"input_ids": ids, "labels": ids}
    small, big = count(model, batch(b)), count(model, batch(b * k))
    scaled = small.scaled(k)
    assert scaled.flops() == big.flops() == small.flops() * k
    assert small.scaled(1) == small
    for precision in ("fp32", "bf16"):
        got, want = predict(scaled, precision), predict(big, precision)
        assert got.step_time_s == pytest.approx(want.step_time_s, rel=0.02)
        assert got.layers["bytes"].sum() == pytest.approx(want.layers["bytes"].sum(), rel=0.02)
        for key, value in want.memory.items():
            assert got.memory[key] == pytest.approx(value, rel=0.02), key
        assert got.memory["grads"] == predict(small, precision).memory["grads"]
        # The large batch is no longer all floor per kernel: the times say something.
        overhead = want.layers.loc[want.layers["bound"] == "overhead", "time_s"].sum()
        assert overhead < 0.5 * want.step_time_s
