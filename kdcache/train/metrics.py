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


class Calibration:
    """Reliability-diagram statistics accumulated batch by batch (so a per-token evaluation never holds all logits):
    per-bin counts, confidence sums and correct sums over equal-width bins of the max-prob confidence."""

    def __init__(self, n_bins: int = 15) -> None:
        self.n_bins = n_bins
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.conf = torch.zeros(n_bins, dtype=torch.float64)
        self.correct = torch.zeros(n_bins, dtype=torch.float64)

    def add(self, probs: Tensor, y: Tensor) -> None:
        """Add labelled rows (labels >= 0) of probabilities (N, C)."""
        labelled = y >= 0
        probs, y = probs[labelled].float().cpu(), y[labelled].cpu()
        conf, pred = probs.max(dim=1)
        edges = torch.linspace(0.0, 1.0, self.n_bins + 1)
        bins = torch.bucketize(conf, edges[1:-1], right=False)
        self.count += torch.bincount(bins, minlength=self.n_bins).double()
        self.conf.index_add_(0, bins, conf.double())
        self.correct.index_add_(0, bins, (pred == y).double())

    def result(self) -> dict:
        """``edges`` (n_bins + 1), per-bin ``confidence``, ``accuracy`` (None for empty bins) and ``count``, and
        ``ece`` = sum_b (n_b / N) |acc_b - conf_b| (NaN with no rows); JSON-serialisable."""
        total = float(self.count.sum())
        gap = float((self.correct - self.conf).abs().sum() / total) if total else float("nan")
        counts = [int(n) for n in self.count.tolist()]
        return {
            "edges": torch.linspace(0.0, 1.0, self.n_bins + 1).tolist(),
            "confidence": [c / n if n else None for c, n in zip(self.conf.tolist(), counts)],
            "accuracy": [a / n if n else None for a, n in zip(self.correct.tolist(), counts)],
            "count": counts,
            "ece": gap,
        }


def reliability(probs: Tensor, y: Tensor, n_bins: int = 15) -> dict:
    """Per-bin statistics of max-prob confidence over equal-width bins of [0, 1] (see Calibration.result).

    Bin b holds confidences in ``(b / n_bins, (b + 1) / n_bins]``; only labelled rows count.
    """
    calib = Calibration(n_bins)
    calib.add(probs, y)
    return calib.result()


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / N) * |acc_b - conf_b|."""
    return reliability(probs, y, n_bins)["ece"]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats per row (N,), with 0 log 0 = 0."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1)
