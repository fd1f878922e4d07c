"""Evaluation metrics: accuracy, teacher agreement, calibration, entropy.

Label-based metrics use the labelled samples only (``y >= 0``) and return NaN
when there are none.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accuracy", "agreement", "ece", "reliability", "entropy"]


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy over labelled samples."""
    labelled = y >= 0
    if not bool(labelled.any()):
        return float("nan")
    return (logits[labelled].argmax(dim=1) == y[labelled]).float().mean().item()


def agreement(student_logits: Tensor, teacher_argmax: Tensor) -> float:
    """Fraction of samples where the student's argmax equals the teacher's."""
    return (student_logits.argmax(dim=1) == teacher_argmax).float().mean().item()


def reliability(probs: Tensor, y: Tensor, n_bins: int = 15) -> dict:
    """Per-bin statistics of max-prob confidence over equal-width bins of [0, 1].

    Bin b holds confidences in ``(b / n_bins, (b + 1) / n_bins]``.  Returns a
    JSON-serialisable dict with ``edges`` (n_bins + 1), per-bin ``confidence``,
    ``accuracy`` (None for empty bins) and ``count``, plus the total ``ece``.
    """
    labelled = y >= 0
    probs, y = probs[labelled].float(), y[labelled]
    conf, pred = probs.max(dim=1)
    correct = (pred == y).float()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, device=probs.device)
    bins = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(bins, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, bins, correct)
    gap = (acc_sum - conf_sum).abs().sum() / count.sum() if len(y) else torch.tensor(float("nan"))
    counts = [int(n) for n in count.tolist()]
    return {
        "edges": edges.tolist(),
        "confidence": [c / n if n else None for c, n in zip(conf_sum.tolist(), counts)],
        "accuracy": [a / n if n else None for a, n in zip(acc_sum.tolist(), counts)],
        "count": counts,
        "ece": float(gap),
    }


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / N) * |acc_b - conf_b|."""
    return reliability(probs, y, n_bins)["ece"]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats per row (N,), with 0 log 0 = 0."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1)
