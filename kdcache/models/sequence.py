"""Models over sequences of token ids: causal language models (one distribution per position) and sequence
classifiers (one per sequence), small enough to train on two CPU cores.

Inputs are int64 ids (B, L). Language models return (B, L, num_classes) — position j predicts the token after j —
and classifiers (B, num_classes). Id 0 is padding for the classifiers (left or right), which they ignore exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..errors import KDCacheError

PAD = 0


def _length(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 1:
        raise KDCacheError(f"model {name!r} takes sequences of token ids (inputs of shape (L,)), not "
                           f"{tuple(input_shape)}: use a token dataset (text:PATH, tokens:DIR, pydoc, agreement)")
    return int(input_shape[0])


def _vocab(vocab_size: int | None, name: str) -> int:
    if not vocab_size:
        raise KDCacheError(f"model {name!r} embeds token ids but the dataset declares no vocabulary: use a token "
                           "dataset (its vocabulary sets the embedding size)")
    return int(vocab_size)


class CausalBlock(nn.Module):
    """Pre-norm Transformer block with causal self-attention (scaled_dot_product_attention, is_causal)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A decoder-only Transformer LM (nanoGPT-style): token + learned position embeddings, causal blocks, a head
    tied to the token embedding when the outputs are the vocabulary."""

    def __init__(self, vocab_size: int, num_classes: int, context: int, dim: int, depth: int, heads: int,
                 dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise KDCacheError(f"gpt dim {dim} does not split into {heads} heads: use a dim divisible by heads")
        self.num_classes, self.context = num_classes, context
        self.tok, self.pos = nn.Embedding(vocab_size, dim), nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(CausalBlock(dim, heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes, bias=False)
        if vocab_size == num_classes:
            self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        if n > self.context:
            raise KDCacheError(f"a sequence of {n} tokens exceeds the model's context of {self.context}: use "
                               "--seq-len at most the context, or build the model with a larger context")
        h = self.drop(self.tok(x) + self.pos(torch.arange(n, device=x.device)))
        return self.head(self.norm(self.blocks(h)))


class LSTMLM(nn.Module):
    """Embedding → LSTM → linear: a recurrent LM, causal by construction."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tok = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(self.tok(x))[0])


def _to_front(x: Tensor) -> tuple[Tensor, Tensor]:
    """Ids with every sequence's tokens moved to the front in order (right padding), and the lengths."""
    real = x != PAD
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    return x.gather(1, order), real.sum(1)


class LSTMClassifier(nn.Module):
    """A sequence classifier from the LSTM state after the last real token; padding (id 0, either side) is packed
    away, so a sequence's logits do not depend on how it was padded."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int, layers: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.lstm = nn.LSTM(dim, dim, layers, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        ids, lengths = _to_front(x)
        packed = pack_padded_sequence(self.tok(ids), lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


class TransformerClassifier(nn.Module):
    """A bidirectional Transformer encoder classifying from the mean of its outputs at the real tokens. Positions
    count from the first real token and padding is masked out of attention and the mean, so padding (id 0, either
    side) does not change the logits; no [CLS] token, as the mean serves the same role with nothing to learn."""

    def __init__(self, vocab_size: int, num_classes: int, context: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.pos = nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        ids, lengths = _to_front(x)
        real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        # an all-padding row attends to its (padding) self rather than to nothing (NaN); the mean then drops it all
        h = self.norm(self.encoder(h, src_key_padding_mask=~real & (lengths > 0)[:, None]))
        w = real.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1).clamp(min=1))


def gpt_nano(num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None = None, dim: int = 128,
             depth: int = 4, heads: int = 4, context: int | None = None, dropout: float = 0.0) -> GPT:
    """A small causal Transformer LM: dim 128, 4 blocks, 4 heads; context defaults to the sequence length."""
    length = _length(input_shape, "gpt_nano")
    context = context or length
    if length > context:
        raise KDCacheError(f"--seq-len {length} exceeds gpt_nano's context of {context}: use --seq-len {context} or "
                           f"build it with context={length}")
    return GPT(vocab_size or num_classes, num_classes, context, dim, depth, heads, dropout)


def lstm_lm(num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None = None, dim: int = 256,
            layers: int = 1, dropout: float = 0.0) -> LSTMLM:
    """A recurrent LM: embedding, LSTM (dim 256), linear head."""
    _length(input_shape, "lstm_lm")
    return LSTMLM(vocab_size or num_classes, num_classes, dim, layers, dropout)


def lstm_cls(num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None = None, dim: int = 128,
             layers: int = 1) -> LSTMClassifier:
    """A sequence classifier: LSTM (dim 128) over the real tokens, its last state to a linear head."""
    _length(input_shape, "lstm_cls")
    return LSTMClassifier(_vocab(vocab_size, "lstm_cls"), num_classes, dim, layers)


def transformer_cls(num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None = None, dim: int = 128,
                    depth: int = 2, heads: int = 4) -> TransformerClassifier:
    """A sequence classifier: a 2-block bidirectional Transformer encoder (dim 128), mean-pooled."""
    length = _length(input_shape, "transformer_cls")
    return TransformerClassifier(_vocab(vocab_size, "transformer_cls"), num_classes, length, dim, depth, heads)
