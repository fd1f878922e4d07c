"""The top-k + tail rule, once: how a top-k cache is made from logits and what it says about the classes it dropped.

A top-k row keeps the k largest logits (sorted descending), their class ids, and `tail` = logsumexp of the other
C − k logits at T = 1. At T = 1 that is exact over k + 1 buckets (the k classes and "the rest"). What the dropped
classes looked like individually is unknown; wherever one is needed, the rest's mass is spread evenly over them,
i.e. each dropped class gets the logit `tail − log(C − k)` — the maximum-entropy guess consistent with what was
stored. Everything here works on the last axis and broadcasts over leading axes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

FLOAT16_MAX = 65504.0


def to_topk(logits: Tensor, k: int | None, dtype: torch.dtype) -> dict[str, Tensor]:
    """What a cache stores for these logits: full `values`, or top-k `values`/`indices` plus `tail`.

    float16 caches clamp logits to ±65504 first, so no stored value is infinite; selection and the tail use those
    clamped float32 logits.
    """
    logits = logits.float()
    if dtype == torch.float16:
        logits = logits.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    if k is None:
        return {"values": logits.to(dtype)}
    vals, idx = logits.topk(k, dim=-1, sorted=True)
    tail = logits.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return {"values": vals.to(dtype), "indices": idx.to(torch.int32), "tail": tail}


def rest_logit(tail: Tensor, num_classes: int, k: int) -> Tensor:
    """The logit each of the C − k dropped classes gets when the tail's mass is spread evenly."""
    return tail.float() - math.log(num_classes - k)


def dense_logits(values: Tensor, indices: Tensor | None, tail: Tensor | None, num_classes: int) -> Tensor:
    """(…, C) logits at T = 1: full values as they are; top-k scattered into a fill of `rest_logit`."""
    v = values.float()
    if indices is None:
        return v
    fill = rest_logit(tail, num_classes, v.shape[-1]).unsqueeze(-1)
    return fill.expand(*v.shape[:-1], num_classes).clone().scatter_(-1, indices.long(), v)


def bucket_log_probs(values: Tensor, tail: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Teacher log-probs (…, k+1) at temperature T over the top-k classes plus the rest bucket.

    The rest bucket holds C − k equal logits `rest_logit`, so its logit at T is log(C − k) + rest_logit / T:
    exact at T = 1 (and when k = C − 1), the even-spread rule otherwise. `softmax(dense_logits / T)` gives the same
    distribution with the rest expanded.
    """
    k = values.shape[-1]
    log_m = math.log(num_classes - k)
    rest = log_m + rest_logit(tail, num_classes, k) / temperature
    return torch.cat([values.float() / temperature, rest.unsqueeze(-1)], dim=-1).log_softmax(dim=-1)


def chunk_stats(values: np.ndarray, indices: np.ndarray | None, tail: np.ndarray | None,
                labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Sums over rows (…, W) of one chunk: correct, labelled, rows, entropy (nats, T = 1), top-k mass.

    `labels` (R,) broadcasts over the views axis of (R, V, W) values.
    """
    v = torch.from_numpy(np.asarray(values, dtype=np.float32))
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)).reshape(-1, *([1] * (v.dim() - 2))).expand(v.shape[:-1])
    pred = v.argmax(-1) if indices is None else torch.from_numpy(np.asarray(indices[..., 0], dtype=np.int64))
    labelled = lab >= 0
    rows = float(np.prod(v.shape[:-1]))
    out = {"correct": float(((pred == lab) & labelled).sum()), "labelled": float(labelled.sum()), "rows": rows}
    if tail is None:
        logp = v.log_softmax(-1)
        out["entropy"] = float(-(logp.exp() * logp).sum())
        out["mass"] = rows
        return out
    t = torch.from_numpy(np.asarray(tail, dtype=np.float32))
    logp = bucket_log_probs(v, t, num_classes, 1.0)
    top, rest = logp[..., :-1], logp[..., -1]
    # −Σ p log p over the k classes, plus the rest's C − k equal shares (each p_rest / (C − k)).
    h = -(top.exp() * top).sum(-1) - rest.exp() * (rest - math.log(num_classes - v.shape[-1]))
    out["entropy"] = float(h.sum())
    out["mass"] = float(top.exp().sum())
    return out
