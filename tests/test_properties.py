"""Property-based tests (hypothesis): the policy rule language against the rules as the
documentation states them, and the run store's round trip (what is written is what is read)."""
from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

import pandas as pd
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
# pandas reads an integer column with NULLs as float64: exact up to 2**53
INTS = st.one_of(st.none(), st.integers(-2**53, 2**53))
COUNTS = st.integers(0, 2**53)
STEPS = st.integers(0, 2**53)
LAYERS = [(0, "", "Net", 0, None, 0, 0), (1, "fc", "Linear", 10, "float32", 1, 1),
          (2, "head", "Linear", 3, "float32", 1, 1)]
LAYER = st.integers(0, len(LAYERS) - 1)
TEXT = st.text(max_size=12)
OPT_TEXT = st.one_of(st.none(), TEXT)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=8)

# Every column drawn on its own, in the types the store declares.
TABLES = st.fixed_dictionaries({
    "steps": st.lists(st.tuples(STEPS, FLOATS, FLOATS, FLOATS, st.booleans(), st.booleans(), FLOATS,
                                INTS, FLOATS, FLOATS), max_size=20, unique_by=lambda r: r[0]),
    "layer_stats": st.lists(st.tuples(STEPS, LAYER, TEXT, OPT_TEXT, FLOATS, FLOATS, FLOATS, COUNTS,
                                      COUNTS, COUNTS, COUNTS, COUNTS, COUNTS,
                                      st.integers(1, 2**53)),
                            max_size=10, unique_by=lambda r: r[:3]),
    "overflows": st.lists(st.tuples(STEPS, LAYER, TEXT, TEXT, st.booleans(), INTS, st.booleans(),
                                    st.one_of(st.none(), st.booleans())), max_size=6),
    "dtypes": st.lists(st.tuples(STEPS, LAYER, TEXT, OPT_TEXT), max_size=6),
    "policy_changes": st.lists(st.tuples(STEPS, LAYER, TEXT, TEXT), max_size=6),
    "diagnostics": st.lists(st.tuples(STEPS, LAYER, TEXT, TEXT, FLOATS), max_size=6),
    "meta": st.dictionaries(TEXT.map(lambda k: "x." + k), JSON, max_size=4),
})


def same(a, b) -> bool:
    """Equal, with NaN and None (SQL NULL) alike, as the store documents for missing values."""
    na, nb = pd.isna(a), pd.isna(b)
    return (na and nb) or (not na and not nb and a == b)


def same_rows(df: pd.DataFrame, want: list[tuple]) -> bool:
    """The rows of a frame ``Run`` returns (without its rank column) are ``want``."""
    got = df.drop(columns="rank", errors="ignore").values.tolist()
    return len(got) == len(want) and all(
        len(g) == len(w) and all(same(x, y) for x, y in zip(g, w)) for g, w in zip(got, want))


def by_step(rows):
    """Rows as a run reads them: by step, in the order written within a step."""
    return sorted(rows, key=lambda r: r[0])


@settings(max_examples=60, deadline=None)
@given(TABLES)
def test_what_the_store_writes_is_what_a_run_reads(t):
    name = [layer[1] for layer in LAYERS]
    with tempfile.TemporaryDirectory() as d:
        w = RunWriter(Path(d) / "run.db", {"status": "running", "every": 1}, LAYERS,
                      flush_every_s=60)
        for table in ("steps", "layer_stats", "overflows", "dtypes", "policy_changes",
                      "diagnostics"):
            w.put(table, [tuple(int(v) if isinstance(v, bool) else v for v in r)
                          for r in t[table]])
        w.set_meta(**t["meta"])
        w.set_meta(status="finished")
        w.close()
        run = mpviz.load_run(d)

        assert same_rows(run.steps, by_step(t["steps"]))
        stats = sorted(t["layer_stats"], key=lambda r: (r[0], r[1], r[2].encode()))
        assert same_rows(run.layer_stats, [
            (s, name[i], tensor, dtype, norm, mx, mn, zeros / n, nonfinite, u16 / n, o16 / n,
             ub16 / n, ob16 / n, n)
            for s, i, tensor, dtype, norm, mx, mn, zeros, nonfinite, u16, o16, ub16, ob16, n
            in stats])
        assert same_rows(run.overflows, [
            (s, name[i], *rest) for s, i, *rest in by_step(t["overflows"])])
        for table in ("dtypes", "policy_changes", "diagnostics"):
            assert same_rows(getattr(run, table), [
                (s, name[i], *rest) for s, i, *rest in by_step(t[table])])
        meta = run.meta
        assert {k: meta[k] for k in t["meta"]} == t["meta"] and meta["status"] == "finished"
        run.close()
