"""evaluate() and memory_report(), each checked against a hand computation on real models."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from mpviz.demos import TASKS
from mpviz.evaluation import evaluate, memory_report

F = nn.functional
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs")


# Not helpers.training.record_demo: a plain Adam loop, a model mpviz never touched.
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


# ----------------------------------------------------------------------------- real models, other batches


def _gpt2_and_batches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    batches = []
    for b in (3, 2):
        ids = torch.randint(0, 100, (b, 12))
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding: masked out of attention, ignored by the loss
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return model, batches


def _bert_classifier_and_batches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg)
    batches = [{"input_ids": torch.randint(0, 60, (b, 10)), "attention_mask": torch.ones(b, 10, dtype=torch.long),
                "labels": torch.randint(0, 3, (b,))} for b in (6, 4)]
    return model, batches


def test_evaluate_hugging_face_lm_takes_dict_batches_and_its_own_loss():
    model, batches = _gpt2_and_batches()
    ev = evaluate(model, batches, precisions=["fp32", "bf16", "fp8_e4m3"])
    assert ev.summary["samples"].tolist() == [5, 5, 5] and ev.summary["batches"].tolist() == [2, 2, 2]
    assert ev.summary["metric"].isna().all() and ev.summary.attrs["metric"] is None  # LM labels are shifted
    model.eval()  # as evaluate runs it: no dropout
    for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            # By hand: the model's own (shifted, padding-ignoring) loss, sample-weighted.
            loss = sum(float(model(**b).loss) * len(b["labels"]) for b in batches) / 5
        assert math.isclose(ev.summary.set_index("precision").loc[prec, "loss"], loss, rel_tol=1e-6), prec
    # Not what cross-entropy on the unshifted logits gives: .loss was used.
    with torch.no_grad():
        out = model(**batches[0])
    assert not math.isclose(float(F.cross_entropy(out.logits.flatten(0, 1), batches[0]["labels"].flatten())),
                            float(out.loss), rel_tol=1e-3)
    layers = ev.layers.set_index(["precision", "layer"])
    assert layers.loc[("bf16", "lm_head"), "dtype"] == "bfloat16"
    assert layers.loc[("fp8_e4m3", "transformer.h.0.mlp.c_fc"), "dtype"] == "float32"  # emulated
    assert 0 < layers.loc[("bf16", "lm_head"), "rel_l2"] < layers.loc[("fp8_e4m3", "lm_head"), "rel_l2"]
    assert math.isfinite(ev.summary.set_index("precision").loc["fp8_e4m3", "loss"])


def test_evaluate_hugging_face_classifier_gets_accuracy():
    model, batches = _bert_classifier_and_batches()
    model.train()  # evaluate switches to eval (no dropout) and back
    ev = evaluate(model, batches, precisions=["fp32", "fp16"])
    assert model.training
    assert ev.summary.attrs["metric"] == "accuracy"
    model.eval()
    for prec, dtype in (("fp32", None), ("fp16", torch.float16)):
        loss = acc = 0.0
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            for b in batches:
                out = model(**b)
                loss += float(out.loss) * len(b["labels"])
                acc += float((out.logits.argmax(-1) == b["labels"]).float().mean()) * len(b["labels"])
        row = ev.summary.set_index("precision").loc[prec]
        assert row["samples"] == 10
        assert math.isclose(row["loss"], loss / 10, rel_tol=1e-6) and math.isclose(row["metric"], acc / 10), prec


def test_evaluate_with_forward_matches_plain_pairs():
    model, data = _trained_digits()
    plain = evaluate(model, data, precisions=["fp32", "bf16"])
    dicts = [{"pixels": x, "labels": y} for x, y in data]
    ev = evaluate(model, dicts, precisions=["fp32", "bf16"], forward=lambda m, b: (m(b["pixels"]), "aux"))
    assert ev.summary.attrs["metric"] == "accuracy"
    cols = ["precision", "loss", "metric", "samples", "batches"]
    assert ev.summary[cols].equals(plain.summary[cols])
    assert ev.layers.equals(plain.layers)


def test_evaluate_rejects_batches_it_cannot_read_and_says_how():
    model, data = _trained_digits(steps=0)
    with pytest.raises(ValueError, match=r"type Tensor.*\(x, y\) pairs.*model\(\*\*batch\).*forward=lambda model, batch"):
        evaluate(model, [data[0][0]], precisions=["fp32"])
    with pytest.raises(TypeError, match=r"data is one dict.*\[batch\]"):
        evaluate(model, {"x": data[0][0]}, precisions=["fp32"])
    bert, batches = _bert_classifier_and_batches()
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match=r"Batch 0 has no labels.*SequenceClassifierOutput.*'labels'"):
        evaluate(bert, unlabelled, precisions=["fp32"])


class Keywords(nn.Module):
    """The memory test's MLP, called with keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x, labels=None):
        return self.net(x)


def test_memory_report_takes_dict_batches_and_forward():
    torch.manual_seed(0)
    model, x = Keywords(), torch.randn(4, 16)
    by_hand = {"": 0, "net": 0, "net.0": 128, "net.1": 256, "net.2": 512}  # as in the test above, in bf16
    for df in (memory_report(model, {"*": "bf16"}, {"x": x, "labels": torch.zeros(4)}),
               memory_report(model, "bf16", [x], forward=lambda m, b: m(b[0]))):
        assert df.set_index("layer")["saved_activation_bytes"].to_dict() == by_hand

    gpt2, batches = _gpt2_and_batches()
    b = batches[0]
    df = memory_report(gpt2, {"*": "bf16", "lm_head": "fp32"}, b)
    same = memory_report(gpt2, {"*": "bf16", "lm_head": "fp32"}, b,
                         forward=lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"]).logits)
    totals = df.attrs["totals"]
    assert 0 < totals["saved_activation_bytes"] < 0.8 * totals["saved_activation_bytes_fp32"]
    lm_head = df.set_index("layer").loc["lm_head"]
    assert lm_head["saved_activation_bytes"] == lm_head["saved_activation_bytes_fp32"] == 3 * 12 * 32 * 4
    # The dict batch's labels add the loss's saved tensors at the root; the layers are the same.
    layers = df["layer"] != ""
    assert df[layers].equals(same[layers])


def test_package_exports_stay_callable_in_a_fresh_process():
    code = """
import types, pkgutil, torch, mpviz
from torch import nn
model = nn.Sequential(nn.Linear(4, 3))
batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
mpviz.memory_report(model, "bf16", batches[0])
print(mpviz.evaluate)
mpviz.evaluate(model, batches, precisions=["fp32"])
mpviz.evaluate(model, batches, precisions=["bf16"])
for name in mpviz.__all__:
    getattr(mpviz, name)
shadowed = [n for n in mpviz.__all__ if isinstance(getattr(mpviz, n), types.ModuleType)]
submodules = {m.name for m in pkgutil.iter_modules(mpviz.__path__)}
assert not shadowed and not submodules & set(mpviz.__all__), (shadowed, submodules & set(mpviz.__all__))
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]
