"""Per-layer precision: each layer runs in the dtype the policy says, live updates, clean removal.

Dtypes are checked with this file's own forward hooks, never the policy's, on the demo CNN and
transformer, an nn.TransformerEncoder model, and a model with nested and shared modules.
"""
from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mpviz.demos import TASKS
from mpviz.precision import (
    PrecisionPolicy,
    apply_policy,
    canonical,
    explain_policy,
    supported_precisions,
)

F = nn.functional
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPUTE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)  # layers autocast runs in its dtype
OUTERS = [None, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- models


class Encoder(nn.Module):
    """The issue's example shape: an nn.TransformerEncoder and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class Nested(nn.Module):
    """Nested containers and shared modules.

    ``mix`` is one Linear registered twice (``left.mix`` and ``right.mix``) with no rule of its own;
    ``tail`` is registered at the root and inside ``right``; ``proj`` is called twice per forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        mix = nn.Linear(16, 16)
        self.tail = nn.Linear(16, 16)
        self.left = nn.Sequential(OrderedDict(fc=nn.Linear(16, 16), act=nn.GELU(), mix=mix, norm=nn.LayerNorm(16)))
        self.right = nn.Sequential(OrderedDict(
            fc=nn.Linear(16, 16), mix=mix,
            inner=nn.Sequential(nn.Linear(16, 16), nn.ReLU()), tail=self.tail))
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        a = self.proj(self.left(h))
        b = self.proj(self.right(h))
        return self.head(self.tail(a + b))


def _batch(name: str):
    task = TASKS[name]
    x, y = next(task.batches(seed=0, batch_size=8))
    return task.model(seed=0), x, y, task.loss_fn


# ----------------------------------------------------------------------------- probes


class Probe:
    """This test's own hooks: every call's floating output dtypes, per module name."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[list[torch.dtype]]] = {}
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, args, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            dts = [o.dtype for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            self.calls.setdefault(name, []).append(dts)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def run_probed(model, x, outer):
    probe = Probe(model)
    try:
        if outer is None:
            model(x)
        else:
            with torch.autocast("cpu", dtype=outer):
                model(x)
    finally:
        probe.remove()
    return probe.calls


def expect(precision, outer):
    """The dtype a Linear/Conv/attention produces when its layer is set to ``precision``."""
    if precision is None:
        return outer or torch.float32
    return DT.get(precision, torch.float32)  # fp8 is emulated in fp32


def check_dtypes(model, calls, expected_precision, outer):
    """Compute layers run in their precision's dtype; everything in fp32/fp8 scope yields fp32."""
    checked = 0
    for name, mod in model.named_modules():
        precision = expected_precision(name)
        for dts in calls.get(name, []):
            if precision in ("fp32", "fp8_e4m3", "fp8_e5m2"):
                assert set(dts) <= {torch.float32}, (name, precision, dts)
            if isinstance(mod, COMPUTE):
                assert dts[0] == expect(precision, outer), (name, type(mod).__name__, precision, outer, dts)
                checked += 1
    assert checked >= 4


def rule_of(rules, scopes):
    """Hand-written reference for policies whose globs are not nested: prefix scopes."""
    def precision(name):
        best = None
        for pattern, prec in rules:  # later, more specific entries listed later in the test
            if name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern):
                best = prec
        return best if best is not None else scopes
    return precision


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("outer", OUTERS, ids=["no-autocast", "fp16", "bf16"])
def test_issue_example_on_transformer_encoder(outer):
    torch.manual_seed(0)
    model = Encoder()
    policy = {"*": "fp16", "encoder.layers.*.norm*": "fp32", "head": "bf16"}

    def reference(name):
        if name == "head":
            return "bf16"
        if fnmatch.fnmatchcase(name, "encoder.layers.*.norm*"):
            return "fp32"
        return "fp16"

    with apply_policy(model, policy, device_type="cpu"):
        calls = run_probed(model, torch.randn(4, 5, 6), outer)
    check_dtypes(model, calls, reference, outer)
    assert calls["encoder.layers.1.norm2"][0] == [torch.float32]
    assert calls["encoder.layers.0.linear1"][0] == [torch.float16]


@pytest.mark.parametrize("outer", OUTERS, ids=["no-autocast", "fp16", "bf16"])
def test_demo_transformer_and_cnn_layers_run_in_policy_dtype(outer):
    model, x, _, _ = _batch("text")
    rules = [("*", "fp16"), ("blocks.*.ln*", "fp32"), ("blocks.1.attn", "bf16"), ("head", "fp8_e4m3")]
    with apply_policy(model, dict(rules), device_type="cpu"):
        calls = run_probed(model, x, outer)
    check_dtypes(model, calls, rule_of(rules, None), outer)
    assert calls["blocks.1.attn.qkv"][0] == [torch.bfloat16]
    assert calls["blocks.0.ln1"][0] == [torch.float32]

    # No "*": layers no rule reaches follow the caller's autocast.
    model, x, _, _ = _batch("digits")
    rules = [("conv2", "fp16"), ("head", "fp32")]
    with apply_policy(model, dict(rules), device_type="cpu"):
        calls = run_probed(model, x, outer)
    check_dtypes(model, calls, rule_of(rules, None), outer)
    assert calls["fc1"][0] == [outer or torch.float32]


@pytest.mark.parametrize("outer", OUTERS, ids=["no-autocast", "fp16", "bf16"])
def test_nested_and_shared_modules(outer):
    torch.manual_seed(0)
    model = Nested()
    policy = {"left": "bf16", "right": "fp32", "right.inner.0": "fp16", "proj": "fp32", "tail": "fp16"}
    with apply_policy(model, policy, device_type="cpu"):
        calls = run_probed(model, torch.randn(4, 8), outer)
    o = outer or torch.float32
    assert calls["inp"] == [[o]] and calls["head"] == [[o]]  # no rule: the caller's autocast
    assert calls["left.fc"] == [[torch.bfloat16]]
    assert calls["left.norm"] == [[torch.bfloat16]]  # CPU autocast keeps layer_norm's input dtype
    assert calls["right.fc"] == [[torch.float32]]
    assert calls["right.inner.0"] == [[torch.float16]]
    # ... and its output is cast back to fp32 as it leaves into fp32 `right` (autocast off there).
    assert calls["right.inner.1"] == [[torch.float32]] and calls["right.inner"] == [[torch.float32]]
    # The shared `mix` has no rule: it runs as whichever parent calls it (left, then right).
    assert calls["left.mix"] == [[torch.bfloat16], [torch.float32]]
    # `proj` has its own rule and runs in it on both calls; `tail` keeps fp16 even inside fp32 `right`.
    assert calls["proj"] == [[torch.float32], [torch.float32]]
    assert calls["tail"] == [[torch.float16], [torch.float16]]


def test_hooks_only_where_precision_changes():
    model, x, _, _ = _batch("text")

    def hooked():
        return sorted(n for n, m in model.named_modules() if m._forward_pre_hooks)

    with apply_policy(model, {"*": "fp16"}, device_type="cpu"):
        assert hooked() == [""]  # "*" is one hook pair on the root, not one per module
    with apply_policy(model, {"*": "fp16", "blocks.*.ln*": "fp32", "blocks.1": "fp16"}, device_type="cpu"):
        # blocks.1 is already fp16 through "*": no hooks needed there.
        assert hooked() == ["", "blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2"]
    # A ModuleList is iterated, never called: its rule is carried out by hooks on its items.
    with apply_policy(model, {"*": "fp32", "blocks": "bf16"}, device_type="cpu"):
        assert hooked() == ["", "blocks.0", "blocks.1"]
        calls = run_probed(model, x, None)
    assert calls["blocks.1.mlp.fc"] == [[torch.bfloat16]] and calls["head"] == [[torch.float32]]


# ----------------------------------------------------------------------------- training, update


def test_update_mid_training_takes_effect_at_next_step():
    model, _, _, loss_fn = _batch("mlp")
    batches = TASKS["mlp"].batches(seed=0, batch_size=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    handle = apply_policy(model, {"*": "fp16"}, device_type="cpu")
    heard, threads = [], []
    handle.add_listener(lambda ch: (heard.append(list(ch)), threads.append(threading.get_ident())))
    assert heard[0][0] == ("", "fp16", "*") and len(heard[0]) == len(list(model.named_modules()))

    fc1_dtypes, losses = [], []
    seen = model.fc1.register_forward_hook(lambda m, a, out: fc1_dtypes.append(out.dtype))
    for step in range(6):
        x, y = next(batches)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step == 2:  # toggled from another thread, as a dashboard does
            t = threading.Thread(target=handle.update, args=({"fc1": "fp32", "head": "bf16"},))
            t.start()
            t.join()
            assert handle.effective()["fc1"] == ("fp16", "*")  # not before the next forward
    seen.remove()
    handle.remove()
    assert fc1_dtypes == [torch.float16] * 3 + [torch.float32] * 3
    assert heard[1:] == [[("fc1", "fp32", "fc1"), ("head", "bf16", "head")]]
    assert set(threads) == {threading.get_ident()}  # listeners ran on the training thread
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_bad_update_is_refused_in_callers_thread_and_loses_nothing():
    model, x, _, _ = _batch("digits")
    handle = apply_policy(model, {"*": "bf16"}, device_type="cpu")
    handle.update({"head": "fp32"})
    with pytest.raises(ValueError, match="'hed'.*Close matches: 'head'"):
        handle.update({"hed": "fp16"})
    with pytest.raises(ValueError, match="Unknown precision 'fp12'"):
        handle.update({"head": "fp12"})
    with pytest.raises(ValueError, match="no such rule"):
        handle.update({"fc1": None})
    head = []
    probe = model.head.register_forward_hook(lambda m, a, out: head.append(out.dtype))
    model(x)
    assert handle.effective()["head"] == ("fp32", "head") and head == [torch.float32]
    handle.update({"fc1": "fp16"})
    handle.update({"fc1": None, "head": None})  # queued updates compose: set, then remove
    # removing a rule gives the layer back to "*"
    out = model(x)
    assert head[1] == torch.bfloat16 and handle.policy.rules == {"*": "bf16"}
    assert out.dtype == torch.float32  # no outer autocast: bf16 outputs leave the model as fp32
    probe.remove()
    handle.remove()
    with pytest.raises(RuntimeError, match="apply_policy"):
        handle.update({"head": "fp32"})


# ----------------------------------------------------------------------------- removal


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks")


@pytest.mark.parametrize("task", ["digits", "text"])
def test_remove_restores_bit_identical_outputs_and_leaves_nothing(task):
    model, x, y, loss_fn = _batch(task)
    before_attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.float16):
        ref16 = model(x)

    policy = {"*": "bf16", "head": "fp8_e5m2"} if task == "digits" else {"*": "fp8_e4m3", "blocks.0": "fp16"}
    with apply_policy(model, policy, device_type="cpu") as handle:
        loss_fn(model(x), y).backward()  # a real forward/backward through the hooks
        handle.update({"*": "fp32"})
        model(x)
    model.zero_grad(set_to_none=True)

    assert torch.equal(model(x), ref)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(model(x), ref16)
    for name, mod in model.named_modules():
        for d in HOOK_DICTS:
            assert not getattr(mod, d), (name, d)
        assert set(vars(mod)) == before_attrs[name], name
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1]), n  # same Parameter, same bits


def test_exception_inside_forward_leaves_autocast_state_and_weights_intact():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    weight = model[1].lin.weight
    with apply_policy(model, {"*": "fp32", "1": "fp8_e4m3"}, device_type="cpu"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError, match="boom"):
                model(torch.randn(2, 4))
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert model[1].lin._parameters["weight"] is weight
    assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------- fp8 emulation


def _round(t, f8):
    return t.clamp(-torch.finfo(f8).max, torch.finfo(f8).max).to(f8).float()


def test_fp8_linear_matches_hand_computation_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    x = torch.randn(5, 8) * 3
    w0 = lin.weight.detach().clone()
    with apply_policy(lin, "fp8_e4m3", device_type="cpu"):
        out = lin(x)
        out.sum().backward()
    f8 = torch.float8_e4m3fn
    expected = F.linear(_round(x, f8), _round(w0, f8), _round(lin.bias.detach(), f8))
    assert torch.equal(out, expected) and not torch.equal(out, F.linear(x, w0, lin.bias))
    # d(sum)/dW = ones^T @ rounded inputs: the gradient of the rounded forward reaches the master.
    assert torch.allclose(lin.weight.grad, torch.ones(5, 4).T @ _round(x, f8))
    assert torch.equal(lin.weight, w0)


@pytest.mark.parametrize("task,policy,changed", [
    ("digits", {"conv2": "fp8_e4m3", "head": "fp8_e5m2"}, lambda n: n in ("", "conv2", "head")),
    ("text", {"blocks.0.mlp": "fp8_e4m3"},
     lambda n: n.startswith("blocks.0.mlp") or n in ("", "blocks.0")),
])
def test_fp8_changes_exactly_the_layers_it_is_set_on(task, policy, changed):
    """Replay each layer in plain fp32 on the inputs it really got: only fp8 layers (and the
    containers holding them) give a different output."""
    model, x, _, _ = _batch(task)
    seen = {}
    handle = apply_policy(model, policy, device_type="cpu")
    probes = []
    for name, mod in model.named_modules():
        def pre(m, args, name=name):  # prepend: sees the inputs before the policy rounds them
            seen[name] = [args]
        def post(m, args, out, name=name):
            seen[name].append(out.detach())
        probes += [mod.register_forward_pre_hook(pre, prepend=True), mod.register_forward_hook(post)]
    with torch.no_grad():
        model(x)
    for p in probes:
        p.remove()
    handle.remove()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name not in seen:
                continue  # containers that are iterated, never called (ModuleList)
            args, out = seen[name]
            same = torch.equal(mod(*args), out)
            assert same != changed(name), (name, same)


# ----------------------------------------------------------------------------- rules, errors


def test_explain_policy_precedence_and_inheritance():
    model = nn.Sequential(OrderedDict(
        enc=nn.Sequential(OrderedDict(l0=nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)),
                                      l1=nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))),
        head=nn.Linear(2, 2)))
    policy = PrecisionPolicy({
        "*": "float16",            # the default
        "enc.l0": "bf16",          # covers l0's children too, though "*" matches them
        "enc.*.1": "fp32",         # glob: beats the inherited bf16 on enc.l0.1
        "enc.l1.*": "fp16",        # ties with the next rule on literal characters ...
        "enc.l1.?": "mixed_bfloat16",  # ... which is written later, so wins on enc.l1.0 and .1
        "head": "fp32", "he*": "bf16",  # an exact name beats any glob
    })
    table = explain_policy(model, policy).set_index("layer")
    assert list(table.columns) == ["type", "precision", "rule", "inherited"]
    got = {n: tuple(r) for n, r in table[["precision", "rule", "inherited"]].iterrows()}
    assert got == {
        "": ("fp16", "*", False), "enc": ("fp16", "*", True),
        "enc.l0": ("bf16", "enc.l0", False), "enc.l0.0": ("bf16", "enc.l0", True),
        "enc.l0.1": ("fp32", "enc.*.1", False),
        "enc.l1": ("fp16", "*", True), "enc.l1.0": ("bf16", "enc.l1.?", False),
        "enc.l1.1": ("bf16", "enc.l1.?", False),  # beats "enc.*.1": more literal characters
        "head": ("fp32", "head", False),
    }
    assert table.loc["enc.l0.1", "type"] == "LayerNorm"


def test_names_patterns_and_precisions_are_checked():
    model, _, _, _ = _batch("text")
    with pytest.raises(ValueError, match=r"'blocks\.0\.atn' is not a layer name.*'blocks\.0\.attn'"):
        apply_policy(model, {"blocks.0.atn": "fp16"}, device_type="cpu")
    with pytest.raises(ValueError, match=r"'block\.\*\.attn' matches no layer.*Close matches: .*'blocks\.\d\.attn'"):
        explain_policy(model, {"block.*.attn": "fp16"})
    with pytest.raises(ValueError, match="Unknown precision 'fp12'. Use one of fp32, fp16, bf16"):
        PrecisionPolicy({"head": "fp12"})
    assert [canonical(n) for n in ("float32", "mixed_float16", "bfloat16", torch.bfloat16, "FP8_E5M2")] == \
        ["fp32", "fp16", "bf16", "bf16", "fp8_e5m2"]
    assert not any(m._forward_pre_hooks for m in model.modules())  # failed applies leave nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_precision_the_device_cannot_run_names_those_it_can():
    assert supported_precisions("cpu") == ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'fp16' cannot run on device 'cuda'.*can run: fp32"):
        apply_policy(model, {"*": "fp16"}, device_type="cuda")
    handle = apply_policy(model, {"*": "fp32"}, device_type="cuda")
    with pytest.raises(ValueError, match="'bf16' cannot run on device 'cuda'"):
        handle.update({"*": "bf16"})
    handle.remove()


# ----------------------------------------------------------------------------- output containers


@dataclass
class DataOut:
    logits: torch.Tensor
    ids: torch.Tensor
    extra: tuple


Pair = namedtuple("Pair", "logits ids")


class Returns(nn.Module):
    """A Linear whose output is wrapped in ``kind`` (a plain dataclass or a namedtuple)."""

    def __init__(self, kind) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        ids = y.argmax(-1)
        if self.kind is DataOut:
            return DataOut(y, ids, (y * 2, ids))
        return Pair(y, ids)


@pytest.mark.parametrize("kind", [DataOut, Pair])
def test_low_precision_outputs_keep_their_container_type(kind):
    torch.manual_seed(0)
    model, x = Returns(kind), torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)  # by hand: plain autocast, all outputs bf16
    with apply_policy(model, {"*": "bf16"}, device_type="cpu"):
        out = model(x)  # no outer autocast: floats come back as fp32
    assert type(out) is kind
    assert out.logits.dtype == torch.float32 and torch.equal(out.logits, ref.logits.float())
    assert out.ids.dtype == torch.int64 and torch.equal(out.ids, ref.ids)
    if kind is DataOut:
        assert out.extra[0].dtype == torch.float32 and torch.equal(out.extra[0], ref.extra[0].float())
        assert out.extra[1].dtype == torch.int64


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 100, (2, 8))


@pytest.mark.parametrize("policy, dtype", [
    ({"*": "fp16"}, torch.float16),
    ({"transformer": "bf16", "lm_head": "bf16"}, torch.bfloat16),  # GPT2Model's output too
])
def test_hugging_face_lm_output_keeps_its_type_and_is_fp32(policy, dtype):
    model, ids = _tiny_gpt2()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        ref = model(ids, labels=ids)  # by hand: the whole model under plain autocast
    with torch.no_grad(), apply_policy(model, policy, device_type="cpu"):
        out = model(ids, labels=ids)
    assert type(out) is type(ref) and type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert out.logits.dtype == torch.float32 and out[1] is out.logits and out[0] is out.loss
    assert torch.equal(out.logits, ref.logits.float())
    assert torch.allclose(out.loss, ref.loss.float(), rtol=1e-3)


def test_hugging_face_bert_classifier_under_a_mixed_policy():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    batch = {"input_ids": torch.randint(0, 50, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    ref = model(**batch)
    probe = Probe(model)
    with apply_policy(model, {"*": "bf16", "bert.encoder.layer.*.attention*": "fp32"}) as handle:
        out = model(**batch)
        out.loss.backward()
    probe.remove()
    assert type(out) is type(ref) and out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert probe.calls["bert.encoder.layer.1.attention.self.query"] == [[torch.float32]]
    assert probe.calls["bert.encoder.layer.1.intermediate.dense"] == [[torch.bfloat16]]
    assert probe.calls["classifier"] == [[torch.bfloat16]]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert handle.effective()["bert.encoder.layer.0.attention.output.dense"] == \
        ("fp32", "bert.encoder.layer.*.attention*")
    after = model(**batch)
    assert torch.equal(after.logits, ref.logits) and torch.equal(after.loss, ref.loss)


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_a_whole_model_policy_computes_exactly_what_autocast_does(dtype, name):
    """{"*": p} without an outer autocast, and inside an equal one, give autocast's own numbers,
    gradients included, also for a weight used twice (autocast casts it once, from its cache)."""
    from models import SPECS

    spec = SPECS["toy"]
    grads = {}
    for arm in ("autocast", "policy", "both"):
        torch.manual_seed(0)
        model = spec.build()
        batch = spec.make_batch(torch.Generator().manual_seed(0))
        with apply_policy(model, {"*": name}) if arm != "autocast" else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=dtype, enabled=arm != "policy"):
                out = model(**batch)
            out.loss.backward()
        grads[arm] = [p.grad for p in model.parameters() if p.grad is not None]
    for arm in ("policy", "both"):
        assert len(grads[arm]) == len(grads["autocast"]) > 0
        assert all(torch.equal(a, b) for a, b in zip(grads["autocast"], grads[arm])), arm


def test_a_model_under_a_policy_can_be_deep_copied():
    """An EMA copy or a checkpoint deepcopy while a policy is on: the copy computes what the
    model computes (a policy's lock is not copied)."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    handle = apply_policy(model, {"*": "bf16", "0": "fp32"})
    twin = copy.deepcopy(model)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        a, b = model(x), twin(x)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    handle.remove()
