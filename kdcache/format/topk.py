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

from kdcache.format.spec import Q8_STEP

FLOAT16_MAX = 65504.0


def to_topk(logits: Tensor, k: int | None, value_dtype: str) -> dict[str, Tensor]:
    """What a cache stores for these logits (…, C): full `values`, or top-k `values`/`indices` plus `tail` — with
    q8 values (format.spec.Q8_DEFINITION) as `top` and `codes`.

    float16 caches clamp logits to ±65504 first, so no stored value is infinite; selection and the tail use those
    clamped float32 logits.
    """
    logits = logits.float()
    if value_dtype == "float16":
        logits = logits.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    if k is None:
        return {"values": logits.to(getattr(torch, value_dtype))}
    vals, idx = logits.topk(k, dim=-1, sorted=True)
    out = {"indices": idx.to(torch.int32), "tail": logits.scatter(-1, idx, float("-inf")).logsumexp(-1)}
    if value_dtype == "q8":
        return out | q8_encode(vals)
    return out | {"values": vals.to(getattr(torch, value_dtype))}


def q8_encode(values: Tensor) -> dict[str, Tensor]:
    """Sorted top-k logits (…, k) as `top` (…,) float32 and `codes` (…, k-1) uint8: the distance of each logit
    below the top in 1/16-nat steps (at most 255 steps, 15.94 nats), stored as differences of neighbours so
    that chunks compress well. Costs about 4e-5 nats of KL at k=64; the tail stays exact."""
    top = values[..., :1].float()
    q = ((top - values[..., 1:].float()) * Q8_STEP).round().clamp(0, 255)
    codes = torch.diff(q, dim=-1, prepend=torch.zeros_like(q[..., :1]))
    return {"top": top[..., 0], "codes": codes.to(torch.uint8)}


def q8_decode(top: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The top-k logits (…, k) float32 that q8_encode stored."""
    steps = np.cumsum(codes, axis=-1, dtype=np.int32).astype(np.float32) / Q8_STEP
    top = np.asarray(top, dtype=np.float32)[..., None]
    return np.concatenate([top, top - steps], axis=-1)


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
    """Sums over the rows of one chunk: correct, labelled, rows, entropy (nats, T = 1), top-k mass.

    values (R, V, W) with labels (R,), or a token cache's (R, V, L, W) with labels (R, L); labels broadcast over
    the views axis.
    """
    v = torch.from_numpy(np.asarray(values, dtype=np.float32))
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)).unsqueeze(1).expand(v.shape[:-1])  # over views
    pred = v.argmax(-1) if indices is None else torch.from_numpy(np.asarray(indices[..., 0], dtype=np.int64))
    labelled = lab >= 0
    # Token caches: a position with label -1 is padding, not an unlabelled sample, so it counts nowhere.
    weight = labelled.float() if v.dim() == 4 else torch.ones(v.shape[:-1])
    out = {"correct": float(((pred == lab) & labelled).sum()), "labelled": float(labelled.sum()),
           "rows": float(weight.sum())}
    if tail is None:
        logp = v.log_softmax(-1)
        out["entropy"] = float((-(logp.exp() * logp).sum(-1) * weight).sum())
        out["mass"] = out["rows"]
        return out
    t = torch.from_numpy(np.asarray(tail, dtype=np.float32))
    logp = bucket_log_probs(v, t, num_classes, 1.0)
    top, rest = logp[..., :-1], logp[..., -1]
    # −Σ p log p over the k classes, plus the rest's C − k equal shares (each p_rest / (C − k)).
    h = -(top.exp() * top).sum(-1) - rest.exp() * (rest - math.log(num_classes - v.shape[-1]))
    out["entropy"] = float((h * weight).sum())
    out["mass"] = float((top.exp().sum(-1) * weight).sum())
    return out


def draw_samples(logits: Tensor, m: int, temperature: float, uniforms: Tensor, block: int = 4096) -> dict[str, Tensor]:
    """Sampled soft labels: M draws per row (…, C) from softmax(logits / T), by the inverse CDF of `uniforms`
    (…, M) — counter-based, so resumed and sharded dumps draw the same ids — stored as the distinct ids drawn
    (`sample_ids`, ascending) with how often each was drawn (`sample_counts`, summing to M; unused slots 0/0).

    (1/M) Σ counts · f(id) is an unbiased estimate of E_p[f] under the teacher at T, so a loss built on it has
    the expected gradient of the full-distribution one (Anshumann et al., 2025)."""
    lead, c = logits.shape[:-1], logits.shape[-1]
    flat, u = logits.reshape(-1, c), uniforms.reshape(-1, m).to(logits.device)
    ids = torch.empty(flat.shape[0], m, dtype=torch.long, device=logits.device)
    for s in range(0, flat.shape[0], block):  # float64 CDFs of a vocabulary are big: a block of rows at a time
        cdf = (flat[s:s + block].float() / temperature).softmax(-1).double().cumsum(-1)
        cdf[:, -1] = 1.0
        ids[s:s + block] = torch.searchsorted(cdf, u[s:s + block].double().contiguous(), right=True).clamp(max=c - 1)
    ids = ids.sort(-1).values
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = new.long().cumsum(-1) - 1
    counts = torch.zeros_like(ids).scatter_add_(-1, group, torch.ones_like(ids))
    distinct = torch.zeros_like(ids).scatter_(-1, group, ids)
    return {"sample_ids": distinct.to(torch.int32).reshape(*lead, m), "sample_counts": counts.reshape(*lead, m)}
