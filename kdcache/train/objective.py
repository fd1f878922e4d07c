"""The training objective: which loss, with which weights, over which student heads."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from kdcache.errors import KDCacheError
from kdcache.train import losses
from kdcache.train.losses import SoftTarget

LOSSES = ("auto", "ce", "kd", "hard", "cwtm", "dkpp")


@dataclass(frozen=True)
class Objective:
    """`loss` over the student's heads: head 0 is the class token, head i the token of teacher i."""

    loss: str = "auto"
    alpha: float = 0.5
    temperature: float = 4.0
    lambdas: tuple[float, ...] | None = None
    taus: tuple[float, ...] | None = None
    topk_mode: str = "tail"

    def resolve(self, n_teachers: int) -> "Objective":
        """'auto' is CE without a cache and KD with one; check the rest fits the number of teachers."""
        loss = self.loss if self.loss != "auto" else ("kd" if n_teachers else "ce")
        if loss not in LOSSES:
            raise KDCacheError(f"unknown --loss {loss!r}: use one of {', '.join(LOSSES)}")
        if loss != "ce" and n_teachers == 0:
            raise KDCacheError(f"--loss {loss} needs a teacher: pass --cache PATH (dump one with 'kdcache dump')")
        if loss in ("cwtm", "dkpp") and n_teachers != 1:
            raise KDCacheError(f"--loss {loss} (Born-Again) takes exactly one --cache, got {n_teachers}")
        for name, vals in (("--lambdas", self.lambdas), ("--taus", self.taus)):
            if vals is not None and len(vals) != n_teachers:
                raise KDCacheError(f"{name} has {len(vals)} values for {n_teachers} caches: give one per --cache")
        if self.temperature <= 0 or any(t <= 0 for t in self.taus or ()):
            raise KDCacheError("temperatures (-T, --taus) must be positive")
        if not 0 <= self.alpha <= 1 or any(w < 0 for w in self.lambdas or ()):
            raise KDCacheError(f"--alpha must lie in [0, 1] and --lambdas be non-negative (got alpha {self.alpha})")
        if self.topk_mode not in ("tail", "renorm"):
            raise KDCacheError(f"unknown --topk-loss {self.topk_mode!r}: use tail or renorm")
        return Objective(loss, self.alpha, self.temperature, self.lambdas, self.taus, self.topk_mode)

    def __call__(self, heads: Tensor, y: Tensor, targets: list[SoftTarget],
                 generator: torch.Generator | None = None) -> Tensor:
        """`heads`: (B, H, C) student logits; H = 1, or 1 + one distillation token per teacher."""
        cls = heads[:, 0]
        per_teacher = [heads[:, i] for i in range(1, heads.shape[1])] or [cls] * len(targets)
        match self.loss:
            case "ce":
                return losses.ce(cls, y)
            case "hard":
                return sum(losses.deit_hard(cls, h, y, t) for h, t in zip(per_teacher, targets)) / len(targets)
            case "cwtm":
                return losses.cwtm(cls, y, targets[0])
            case "dkpp":
                return losses.dkpp(cls, y, targets[0], generator)
        n = len(targets)
        if n == 1 and heads.shape[1] == 1 and self.lambdas is None and self.taus is None:
            return losses.kd(cls, y, targets[0], self.temperature, self.alpha, self.topk_mode)
        lambdas = self.lambdas or tuple((1 - self.alpha) / n for _ in targets)
        taus = self.taus or tuple(self.temperature for _ in targets)
        return losses.multi_teacher([cls, *per_teacher] if heads.shape[1] > 1 else [cls], y, targets,
                                    lambdas, taus, self.alpha, self.topk_mode)


def permute_target(t: SoftTarget, perm: Tensor) -> SoftTarget:
    """The same soft targets in another sample order (for mixup partners)."""
    return replace(t, **{f.name: getattr(t, f.name)[perm] for f in fields(t)
                         if isinstance(getattr(t, f.name), Tensor)})


def mixup_loss(objective: Objective, heads: Tensor, y: Tensor, targets: list[SoftTarget], perm: Tensor,
               lam: float, generator: torch.Generator | None = None) -> Tensor:
    """Loss on a mixup batch x̃ = λ·x + (1−λ)·x[perm]: λ·L(targets) + (1−λ)·L(partners' targets).

    For every cross-entropy/KL term this equals the loss against the λ-mixture of the two teacher
    distributions (up to a constant), i.e. the stored soft targets mixed with the same λ. It is an
    approximation of what the teacher would say about x̃ itself, which the cache never saw.
    """
    partner = [permute_target(t, perm) for t in targets]
    return lam * objective(heads, y, targets, generator) + (1 - lam) * objective(heads, y[perm], partner, generator)
