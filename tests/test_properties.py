"""Property-based tests (hypothesis): the policy rule language against the rules as the
documentation states them, and the run store's round trip (what is written is what is read)."""
from __future__ import annotations

import fnmatch
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mpviz
from mpviz.precision import PRECISIONS, PrecisionPolicy, canonical, resolve_policy
from mpviz.store import RunWriter

SEGMENTS = st.sampled_from(["enc", "dec", "layers", "0", "1", "norm", "attn", "fc", "head"])
# A model is a tree of names: each node's children, depth <= 3.
TREES = st.recursive(st.just({}), lambda kids: st.dictionaries(SEGMENTS, kids, max_size=3),
                     max_leaves=10)


class Node(nn.Module):
    def forward(self, x):  # a callable module (its rule applies to its children)
        return x


def build(tree: dict) -> nn.Module:
    m = Node()
    for name, sub in tree.items():
        m.add_module(name, build(sub))
    return m


def glob_of(name: str, draw_mask: list[bool]) -> str:
    """``name`` with some segments replaced by ``*``."""
    parts = name.split(".")
    return ".".join("*" if draw_mask[i % len(draw_mask)] else p for i, p in enumerate(parts))


@st.composite
def model_and_rules(draw):
    model = build(draw(TREES))
    names = [n for n, _ in model.named_modules()]
    rules: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["exact", "glob", "default"]))
        if kind == "default":
            pattern = "*"
        elif len(names) > 1:
            name = draw(st.sampled_from(names[1:]))
            pattern = name if kind == "exact" else glob_of(
                name, draw(st.lists(st.booleans(), min_size=1, max_size=3)))
        else:
            continue
        rules[pattern] = draw(st.sampled_from(["fp32", "fp16", "bf16"]))
    return model, rules


def reference_decisions(model: nn.Module, rules: dict[str, str]) -> dict[str, str | None]:
    """The README's rules, implemented plainly: a rule covers the module it matches and what is
    inside it unless something inside has its own rule; the most specific wins (an exact name
    beats a glob, more literal characters beat fewer, a tie goes to the later rule); a pattern of
    only '*' is the default (the root's rule)."""
    order = list(rules)

    def literal(p: str) -> int:
        return sum(c not in "*?" for c in p)

    def own(name: str) -> str | None:
        hits = []
        for i, p in enumerate(order):
            if set(p) == {"*"}:
                if name == "":
                    hits.append(((-1, -1, i), p))
            elif (fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else name == p):
                exact = not any(c in p for c in "*?[")
                hits.append(((int(exact), literal(p), i), p))
        return max(hits)[1] if hits else None

    out: dict[str, str | None] = {}
    for name, _ in model.named_modules():
        rule = own(name)
        parent = out.get(name.rpartition(".")[0]) if name else None
        out[name] = rules[rule] if rule is not None else parent
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_and_rules())
def test_the_most_specific_rule_decides_every_layer(case):
    model, rules = case
    resolved = resolve_policy(model, PrecisionPolicy(rules))
    got = {n: d.precision for n, d in resolved.decisions.items()}
    assert got == reference_decisions(model, rules)


ALIASES = st.sampled_from(["fp32", "float32", "float", "fp16", "float16", "half", "mixed_float16",
                           "bf16", "bfloat16", "mixed_bfloat16", "fp8_e4m3", "float8_e4m3fn",
                           "fp8_e5m2", "float8_e5m2"])


@given(ALIASES, st.sampled_from(["", " ", "  "]), st.booleans())
def test_precision_names_are_canonical_whatever_their_case_and_spacing(name, pad, upper):
    spelled = pad + (name.upper() if upper else name) + pad
    assert canonical(spelled) == canonical(name) in PRECISIONS
    assert canonical(canonical(spelled)) == canonical(name)


FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64))
STEP_ROWS = st.lists(st.tuples(FLOATS, FLOATS, st.booleans(), st.integers(0, 10**6),
                               st.floats(0, 1e3)), min_size=1, max_size=20)


def same(a, b) -> bool:
    """Equal, with NaN and None (SQL NULL) alike, as the store documents for missing values."""
    na = a is None or (isinstance(a, float) and math.isnan(a))
    nb = b is None or (isinstance(b, float) and math.isnan(b))
    return (na and nb) or a == b


@settings(max_examples=60, deadline=None)
@given(STEP_ROWS, st.lists(st.tuples(st.integers(0, 2), st.sampled_from(PRECISIONS),
                                     st.text(max_size=12)), max_size=5))
def test_what_the_store_writes_is_what_a_run_reads(rows, changes):
    layers = [(0, "", "Net", 0, None, 0, 0), (1, "fc", "Linear", 10, "float32", 1, 1),
              (2, "head", "Linear", 3, "float32", 1, 1)]
    with tempfile.TemporaryDirectory() as d:
        w = RunWriter(Path(d) / "run.db", {"status": "running", "every": 1}, layers,
                      flush_every_s=60)
        steps = [(i, loss, scale, int(skipped), 0, t, samples, None, 0.0)
                 for i, (loss, scale, skipped, samples, t) in enumerate(rows)]
        w.put("steps", [(s[0], s[1], s[2], s[2], s[3], s[4], s[5], s[6], s[7], s[8]) for s in steps])
        w.put("policy_changes", [(i, layer, p, rule) for i, (layer, p, rule) in enumerate(changes)])
        w.set_meta(status="finished", note={"nested": [1, 2.5, None]})
        w.close()
        run = mpviz.load_run(d)
        got = run.steps
        assert got["step"].tolist() == list(range(len(rows)))
        for (loss, scale, skipped, samples, t), (_, r) in zip(rows, got.iterrows()):
            assert same(r["loss"], loss) and same(r["loss_scale"], scale)
            assert same(r["loss_scale_after"], scale)
            assert bool(r["skipped"]) == skipped and r["samples"] == samples
            assert r["step_time_s"] == pytest.approx(t)
        pc = run.policy_changes
        assert pc[["step", "layer", "precision", "rule"]].values.tolist() == [
            [i, layers[layer][1], p, rule] for i, (layer, p, rule) in enumerate(changes)]
        assert run.meta["status"] == "finished" and run.meta["note"] == {"nested": [1, 2.5, None]}
        run.close()
