"""How long ``mpviz.estimate`` itself takes: a GPT-2 built from a config, no download.

Each run counts one forward and backward of a tokenizer-style batch (``input_ids``,
``attention_mask``, ``labels``; the count runs on a meta copy of the model) and prices it on an
H100 in bf16; the median of the runs is printed, one line:

    python benchmarks/estimate_speed.py                # GPT-2 small (12 layers, 768 wide), 8 x 512 tokens
    python benchmarks/estimate_speed.py --llama7b      # a Llama-7B config built on meta, 2,048 tokens
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import mpviz


def gpt2(layers: int = 12, width: int = 768, heads: int = 12, vocab: int = 50257, seq: int = 512,
         batch: int = 8) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=seq)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (batch, seq))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def llama7b(tokens: int = 2048) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids}


def measure(model: Any, batch: Any, runs: int = 5) -> tuple[float, Any]:
    """Median seconds of ``runs`` calls of ``mpviz.estimate``, and the last estimate."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        est = mpviz.estimate(model, batch, policy="bf16", device="h100")
        times.append(time.perf_counter() - t)
    return statistics.median(times), est


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--llama7b", action="store_true", help="a Llama-7B config on the meta device instead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the figure does not depend on how many cores are free
    if args.llama7b:
        model, batch = llama7b()
        what = "Llama-7B config on meta, 1 x 2,048 tokens"
    else:
        model, batch = gpt2()
        what = "GPT-2 small config, 8 x 512 tokens"
    measure(model, batch, runs=1)  # imports and first calls
    seconds, est = measure(model, batch, runs=args.runs)
    print(f"mpviz.estimate, {what}: {seconds:.2f} s (median of {args.runs}, one thread); "
          f"predicted {est.step_time_s * 1e3:.1f} ms per step on an H100 in bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
