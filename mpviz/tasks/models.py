"""The demo tasks' models. Module names are stable: users toggle per-layer precision by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpviz.tasks.data import CONTEXT

__all__ = ["DigitsCNN", "MLP", "Attention", "MLPBlock", "Block", "CharTransformer"]


class DigitsCNN(nn.Module):
    """conv1 -> relu1 -> pool1 -> conv2 -> relu2 -> pool2 -> fc1 -> relu3 -> head (8x8 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.head(self.relu3(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """fc1 -> act1 -> fc2 -> act2 -> fc3 -> act3 -> head."""

    def __init__(self, n_in: int = 30, hidden: int = 64, n_out: int = 2) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(n_in, hidden), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(hidden, hidden), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(hidden, hidden), nn.ReLU()
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        return self.head(x)


class Attention(nn.Module):
    """Causal multi-head self-attention: ``qkv`` projection, softmax attention, ``proj``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLPBlock(nn.Module):
    """``fc`` -> GELU ``act`` -> ``proj`` (4x expansion)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Byte-level GPT: ``tok_emb`` + ``pos_emb`` -> ``blocks.0``, ``blocks.1`` -> ``ln_f`` -> ``head``."""

    def __init__(self, vocab: int = 256, dim: int = 32, n_heads: int = 4, n_blocks: int = 2,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
