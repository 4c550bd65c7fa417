"""Tiny real models for tests, each built from a config in well under a second (no download).

Every builder returns a :class:`Spec`: how to build the model (fixed seed), how to make its
batches (a fixed torch.Generator, so any number of identical copies), and how to get its loss.

    >>> spec = SPECS["gpt2"]
    >>> model = spec.build()
    >>> batch = spec.batches(2)[0]
    >>> loss = spec.loss(model, batch)          # doctest: +SKIP

Hugging Face models keep their default dropout (so training consumes the RNG), and the
hand-made :class:`Toy` packs what breaks naive hooks: an in-place ReLU, tied weights, a module
called twice, a module never called, tuple / dict / dataclass outputs and a BatchNorm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

F = nn.functional

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Spec:
    """A model family: builder, batches and loss."""

    name: str
    family: str                                  # what a README reader calls it
    build: Callable[[], nn.Module]               # fixed seed, train mode
    make_batch: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    image_key: str | None = None                 # a float input that can carry an inf
    has_batchnorm: bool = False

    def batches(self, n: int, seed: int = 1) -> list[Batch]:
        """``n`` batches, the same ones on every call with the same seed."""
        g = torch.Generator().manual_seed(seed)
        return [self.make_batch(g) for _ in range(n)]


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn().train()
    return build


def _hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


BATCH, SEQ, VOCAB = 2, 8, 64


def _ids(g: torch.Generator, shape: tuple[int, ...] = (BATCH, SEQ)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=g)


# ---------------------------------------------------------------- Hugging Face (configs only)
def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                      n_positions=16, bos_token_id=0, eos_token_id=0))


def _gpt2_batch(g: torch.Generator) -> Batch:
    ids = _ids(g)
    return {"input_ids": ids, "labels": ids}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3))


def _bert_batch(g: torch.Generator) -> Batch:
    return {"input_ids": _ids(g), "labels": torch.randint(0, 3, (BATCH,), generator=g)}


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], num_labels=3))


def _resnet_batch(g: torch.Generator) -> Batch:
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g)}


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                               num_layers=1, num_heads=2,
                                               decoder_start_token_id=0, pad_token_id=0,
                                               eos_token_id=1))


def _t5_batch(g: torch.Generator) -> Batch:
    return {"input_ids": _ids(g), "labels": _ids(g, (BATCH, 6))}


# ---------------------------------------------------------------- torch.nn.Transformer
def _transformer() -> nn.Module:
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                          dim_feedforward=32, dropout=0.1)


def _transformer_batch(g: torch.Generator) -> Batch:
    return {"src": torch.randn(SEQ, BATCH, 16, generator=g),
            "tgt": torch.randn(6, BATCH, 16, generator=g),
            "target": torch.randn(6, BATCH, 16, generator=g)}


def _transformer_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(batch["src"], batch["tgt"])
    return F.mse_loss(out.float(), batch["target"])


# ---------------------------------------------------------------- hand-made
@dataclass
class ToyOutput:
    """A plain dataclass output, as many research models return."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class Block(nn.Module):
    """Linear then in-place ReLU (rewrites the Linear's output); returns a tuple with a dict."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.act(self.fc(x)), {"skip": x}


class Toy(nn.Module):
    """In-place ReLU, tied weights, a module called twice, one never called, BatchNorm, dropout,
    and tuple / dict / dataclass outputs."""

    def __init__(self, d_in: int = 8, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.norm = nn.BatchNorm1d(d)
        self.block = Block(d)              # called twice per forward
        self.drop = nn.Dropout(0.1)
        self.proj = nn.Linear(d, d)
        self.proj_tied = nn.Linear(d, d)
        self.proj_tied.weight = self.proj.weight  # tied: one Parameter in two modules
        self.unused = nn.Linear(d, d)      # never called
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ToyOutput:
        h = self.norm(self.embed(x))
        h, aux = self.block(h)
        h, aux = self.block(self.drop(h) + aux["skip"])
        h = self.proj_tied(self.proj(h) + aux["skip"])
        logits = self.head(h)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ToyOutput(loss=loss, logits=logits)


def _toy_batch(g: torch.Generator) -> Batch:
    return {"x": torch.randn(4, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("gpt2", "decoder LM (HF GPT-2)", _seeded(_gpt2), _gpt2_batch, _hf_loss),
    Spec("bert", "encoder classifier (HF BERT)", _seeded(_bert), _bert_batch, _hf_loss),
    Spec("resnet", "conv net + BatchNorm (HF ResNet)", _seeded(_resnet), _resnet_batch, _hf_loss,
         image_key="pixel_values", has_batchnorm=True),
    Spec("t5", "encoder-decoder (HF T5)", _seeded(_t5), _t5_batch, _hf_loss),
    Spec("transformer", "torch.nn.Transformer", _seeded(_transformer), _transformer_batch,
         _transformer_loss),
    Spec("toy", "hand-made (in-place, tied, reused, unused, dataclass out)", _seeded(Toy),
         _toy_batch, _hf_loss, image_key="x", has_batchnorm=True),
]}


def first_float(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a nested output (an independent, plain walker)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, dict):  # also HF ModelOutput (an OrderedDict of its set fields)
        items: Any = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (tuple, list)):
        items = obj
    else:
        return None
    for o in items:
        t = first_float(o)
        if t is not None:
            return t
    return None
