"""The training objective: which loss, with which weights, over which student heads."""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from kdcache.config import LossConfig
from kdcache.train import losses
from kdcache.train.losses import SoftTarget


class Objective:
    """A resolved LossConfig as a loss over the student's heads (see LossConfig.resolve)."""

    def __init__(self, cfg: LossConfig) -> None:
        if cfg.loss == "auto":
            raise ValueError("resolve the LossConfig first (LossConfig.resolve(n_teachers))")
        self.cfg = cfg

    def __call__(self, heads: Tensor, y: Tensor, targets: list[SoftTarget],
                 generator: torch.Generator | None = None) -> Tensor:
        """`heads`: (B, H, C) student logits; H = 1, or 1 + one distillation token per teacher. Per-token tasks give
        (B, H, L, C) with labels (B, L): every position is a row, and padding positions (label -1) carry no loss."""
        if heads.dim() == 4:
            keep = y >= 0
            if not bool(keep.any()):
                return heads.sum() * 0.0
            heads, y = heads.permute(0, 2, 1, 3)[keep], y[keep]
            targets = [take_rows(t, keep) for t in targets]
        c = self.cfg
        cls = heads[:, 0]
        per_teacher = [heads[:, i] for i in range(1, heads.shape[1])] or [cls] * len(targets)
        match c.loss:
            case "ce":
                return losses.ce(cls, y)
            case "hard":
                return sum(losses.deit_hard(cls, h, y, t) for h, t in zip(per_teacher, targets)) / len(targets)
            case "cwtm":
                return losses.cwtm(cls, y, targets[0])
            case "dkpp":
                return losses.dkpp(cls, y, targets[0], generator)
        n = len(targets)
        if n == 1 and heads.shape[1] == 1 and c.lambdas is None and c.taus is None:
            return losses.kd(cls, y, targets[0], c.temperature, c.alpha, c.topk_mode)
        lambdas = c.lambdas or tuple((1 - c.alpha) / n for _ in targets)
        taus = c.taus or tuple(c.temperature for _ in targets)
        return losses.multi_teacher([cls, *per_teacher] if heads.shape[1] > 1 else [cls], y, targets,
                                    lambdas, taus, c.alpha, c.topk_mode)


def take_rows(t: SoftTarget, index: Tensor) -> SoftTarget:
    """The soft targets of the rows `index` selects (a permutation for mixup partners, a mask of token positions)."""
    return replace(t, **{f.name: getattr(t, f.name)[index] for f in fields(t)
                         if isinstance(getattr(t, f.name), Tensor)},
                   features={k: v[index] for k, v in t.features.items()})


def mixup_loss(objective: Objective, heads: Tensor, y: Tensor, targets: list[SoftTarget], perm: Tensor,
               lam: float, generator: torch.Generator | None = None) -> Tensor:
    """Loss on a mixup batch x̃ = λ·x + (1−λ)·x[perm]: λ·L(targets) + (1−λ)·L(partners' targets).

    For every cross-entropy/KL term this equals the loss against the λ-mixture of the two teacher
    distributions (up to a constant), i.e. the stored soft targets mixed with the same λ. It is an
    approximation of what the teacher would say about x̃ itself, which the cache never saw.
    """
    partner = [take_rows(t, perm) for t in targets]
    return lam * objective(heads, y, targets, generator) + (1 - lam) * objective(heads, y[perm], partner, generator)
