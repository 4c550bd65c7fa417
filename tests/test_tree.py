"""mpviz.tree: every walk over model inputs/outputs keeps the containers users rely on."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import torch
from transformers import BatchEncoding
from transformers.modeling_outputs import CausalLMOutput

from mpviz import tree

half = lambda t: t.half()  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Frozen:
    logits: torch.Tensor
    ids: torch.Tensor
    note: str = "x"


def test_containers_keep_their_type_and_only_float_tensors_change():
    NT = namedtuple("NT", "a b")
    ids = torch.arange(3)
    cases = [
        CausalLMOutput(loss=torch.ones(()), logits=torch.ones(2, 3)),
        Frozen(torch.ones(2), ids),
        NT(torch.ones(1), [ids, {"k": torch.ones(1)}]),
        OrderedDict(a=torch.ones(1), b=ids),
        BatchEncoding({"input_ids": ids, "mask": torch.ones(3)}),
    ]
    for obj in cases:
        out = tree.map_floats(half, obj)
        assert type(out) is type(obj)
        before, after = list(tree.tensors(obj)), list(tree.tensors(out))
        assert len(before) == len(after) > 0
        for a, b in zip(before, after):
            assert b.dtype == (torch.float16 if a.is_floating_point() else a.dtype)
            assert torch.equal(a.to(b.dtype), b)
    lm = tree.map_floats(half, cases[0])
    assert lm.logits.dtype == torch.float16 and lm[1] is lm.logits  # attribute and index agree
    assert tree.map_floats(half, cases[1]).note == "x"


def test_first_float_and_unchanged_structures_are_returned_as_they_are():
    ids = torch.arange(3)
    out = CausalLMOutput(logits=torch.ones(2))
    assert tree.first_float((ids, {"x": out})) is out.logits
    assert tree.first_float(Frozen(torch.ones(1), ids)).dtype == torch.float32
    assert tree.first_float((ids, "text", None)) is None
    obj = {"ids": ids, "f": Frozen(torch.ones(1), ids)}
    assert tree.map_floats(lambda t: t, obj) is obj  # nothing replaced: the same object
