"""evaluate() and memory_report(), each checked against a hand computation on real models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mpviz.demos import TASKS
from mpviz.evaluate import evaluate, memory_report

F = nn.functional
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs")


def _trained_digits(steps: int = 10):
    """The demo CNN after a few real Adam steps, and two held-out batches of unequal size."""
    task = TASKS["digits"]
    model = task.model(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    for _, (x, y) in zip(range(steps), task.batches(seed=0, batch_size=32)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    x, y = task.eval_batch()
    return model, [(x[:40], y[:40]), (x[40:64], y[40:64])]


def _head_output(model, x, dtype=None):
    out = []
    h = model.head.register_forward_hook(lambda m, a, o: out.append(o.detach().float()))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x)
    h.remove()
    return out[0]


def test_evaluate_matches_hand_computed_loss_metric_and_layer_error():
    model, data = _trained_digits()
    model.train()
    model.conv2.eval()  # a mixed state, to check each module's mode comes back
    ev = evaluate(model, data, precisions=["fp32", "bf16", "float16", "fp8_e4m3"])
    # Modes, per module, and hooks are as before.
    assert model.training and not model.conv2.training and model.head.training
    for m in model.modules():
        assert not any(getattr(m, d) for d in HOOK_DICTS)

    assert ev.summary["precision"].tolist() == ["fp32", "bf16", "fp16", "fp8_e4m3"]
    assert ev.summary.attrs["metric"] == "accuracy"
    n = sum(len(y) for _, y in data)
    for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        loss = acc = 0.0
        with torch.no_grad():
            model.eval()
            for x, y in data:  # by hand: plain torch.autocast, sample-weighted means
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = model(x)
                loss += float(F.cross_entropy(out.float(), y)) * len(y)
                acc += float((out.argmax(-1) == y).float().mean()) * len(y)
        row = ev.summary.set_index("precision").loc[prec]
        assert row["samples"] == n and row["batches"] == 2
        assert math.isclose(row["loss"], loss / n, rel_tol=1e-6), prec
        assert math.isclose(row["metric"], acc / n, rel_tol=1e-6), prec

    # The head's error on the first batch, by hand: fp16 autocast output against fp32.
    x0 = data[0][0]
    ref, low = _head_output(model, x0), _head_output(model, x0, torch.float16)
    head = ev.layers[(ev.layers["precision"] == "fp16") & (ev.layers["layer"] == "head")].iloc[0]
    assert head["dtype"] == "float16" and head["type"] == "Linear"
    assert math.isclose(head["rel_l2"], float((low - ref).norm() / ref.norm()), rel_tol=1e-5)
    assert math.isclose(head["max_abs"], float((low - ref).abs().max()), rel_tol=1e-5)
    # Fewer mantissa bits, larger error at the model output: fp16 (10) < bf16 (7) < fp8 e4m3 (3).
    root = ev.layers[ev.layers["layer"] == ""].set_index("precision")["rel_l2"]
    assert 0 < root["fp16"] < root["bf16"] < root["fp8_e4m3"]
    assert set(ev.layers["precision"]) == {"bf16", "fp16", "fp8_e4m3"}
    assert ev.worst_layers("fp8_e4m3", 3)["rel_l2"].is_monotonic_decreasing



def test_evaluate_reads_a_one_shot_iterator_and_a_mixed_policy_on_the_transformer():
    task = TASKS["text"]
    model = task.model(seed=0)
    batches = task.batches(seed=0, batch_size=4)
    gen = (next(batches) for _ in range(2))
    ev = evaluate(model, gen, precisions=["fp32", {"*": "bf16", "blocks.*.ln*": "fp32"}])
    assert ev.summary["batches"].tolist() == [2, 2]  # the generator was read once, used twice
    mixed = ev.layers[ev.layers["precision"] != "fp32"].set_index("layer")
    assert mixed.loc["blocks.0.attn.qkv", "dtype"] == "bfloat16"
    assert mixed.loc["blocks.0.ln1", "dtype"] == "float32"
    assert mixed.loc["tok_emb", "rel_l2"] == 0  # embeddings are not autocast ops: exact


def test_evaluate_rejects_bad_input():
    model, data = _trained_digits(steps=0)
    with pytest.raises(ValueError, match="Unknown precision 'fp9'"):
        evaluate(model, data, precisions=["fp32", "fp9"])
    with pytest.raises(ValueError, match="'haed' is not a layer name.*'head'"):
        evaluate(model, data, precisions=[{"haed": "fp16"}])
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [], precisions=["fp32"])


def test_memory_report_counts_what_autograd_saves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    df = memory_report(model, {"*": "bf16"}, (x, torch.zeros(4))).set_index("layer")
    # By hand. fp32: Linear 0 keeps its input (4x16x4 B; x needs no grad, so not the weight),
    # ReLU its output (4x32x4 B), Linear 2 the ReLU output again (counted once) and its weight
    # (a parameter: not counted). bf16: the same tensors at 2 B each, plus the bf16 copy of
    # Linear 2's weight (8x32x2 B) that autocast made and backward needs.
    assert df["saved_activation_bytes_fp32"].to_dict() == {"": 0, "0": 256, "1": 512, "2": 0}
    assert df["saved_activation_bytes"].to_dict() == {"": 0, "0": 128, "1": 256, "2": 512}
    assert df["param_bytes"].to_dict() == {"": 0, "0": (16 * 32 + 32) * 4, "1": 0, "2": (32 * 8 + 8) * 4}
    assert df.loc["2", "precision"] == "bf16"
    totals = df.attrs["totals"]
    assert totals["saved_activation_bytes"] == 896 and totals["saved_activation_bytes_fp32"] == 768
    assert math.isclose(totals["ratio"], 896 / 768)


def test_memory_report_on_transformer_policy_saves_memory_and_leaves_no_hooks():
    task = TASKS["text"]
    model = task.model(seed=0)
    x, y = next(task.batches(seed=0, batch_size=8))
    ref = model(x)
    df = memory_report(model, {"*": "bf16", "blocks.*.ln*": "fp32"}, (x, y))
    totals = df.attrs["totals"]
    assert 0 < totals["saved_activation_bytes"] < 0.8 * totals["saved_activation_bytes_fp32"]
    assert totals["param_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    ln = df.set_index("layer").loc["blocks.0.ln1"]
    assert ln["precision"] == "fp32" and ln["saved_activation_bytes"] == ln["saved_activation_bytes_fp32"] > 0
    assert torch.equal(model(x), ref)
    for m in model.modules():
        assert not any(getattr(m, d) for d in HOOK_DICTS)
