"""A plug-in per-token dataset and language models that know nothing of kdcache, for the token-cache tests.

`counting`: sequences of token ids that count up modulo the vocabulary from a random start, so the next token
is always the current one + 1 — a model that has learnt it predicts `x[j] + 1` at position j, and a cache whose
rows were shifted by one position would say `x[j]` or `x[j] + 2` instead.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, LENGTH = 50, 12


class Counting(torch.utils.data.Dataset):
    vocab_size = VOCAB

    def __init__(self, split: str, n: int = 96) -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        seq = (start + torch.arange(LENGTH + 1)) % VOCAB
        self.x, self.y = seq[:, :-1].clone(), seq[:, 1:].clone()
        self.y[: n // 4, -3:] = -1  # some padding at the end of a quarter of the sequences

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def counting(split: str, root: str | None = None) -> Counting:
    return Counting(split)


class Successor(nn.Module):
    """Predicts token + 1 with confidence `scale`: logits (B, L, V), no parameters to learn."""

    def __init__(self, num_classes: int, scale: float = 6.0) -> None:
        super().__init__()
        self.num_classes, self.scale = num_classes, scale
        self.register_buffer("noise", torch.randn(num_classes, num_classes, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = (x + 1) % self.num_classes
        return self.scale * nn.functional.one_hot(target, self.num_classes).float() + self.noise[x]


def successor(num_classes: int, input_shape: tuple[int, ...], vocab_size: int) -> nn.Module:
    return Successor(num_classes)


class Bigram(nn.Module):
    """A learnable bigram LM: logits (B, L, V) from the current token alone."""

    def __init__(self, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


def bigram(num_classes: int, input_shape: tuple[int, ...], vocab_size: int) -> nn.Module:
    return Bigram(vocab_size, num_classes)
