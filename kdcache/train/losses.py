"""Distillation losses computed from cached teacher soft targets.

Every function casts its inputs to float32, so bf16/fp16 student logits from
autocast are safe, and works in log-space (``log_softmax``/``logsumexp``).

Conventions
-----------
* Labels ``y`` are int64 with ``-1`` meaning "unlabelled"; label terms average
  over the labelled samples only and are exactly 0 when none is labelled.
* KL terms are ``KL(p_teacher || q_student)`` summed over classes and averaged
  over the batch ("batchmean").  DeiT's reference code divides by ``B * C``
  instead; here the value does not shrink with the number of classes.
* A top-k target stores the teacher's k largest logits (``values``), their
  class ids (``indices``) and ``tail = logsumexp`` (T=1) of the other ``C - k``
  logits; :mod:`kdcache.format.topk` says what that means for the dropped
  classes (their mass spread evenly), here and everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.format import topk

__all__ = [
    "SoftTarget",
    "ce",
    "kl_soft",
    "kd",
    "multi_teacher",
    "hard",
    "deit_hard",
    "cwtm",
    "dkpp",
    "dkpp_target",
    "teacher_probs",
    "teacher_argmax",
]


@dataclass(frozen=True)
class SoftTarget:
    """Cached teacher output: full ``logits`` (B, C), top-k ``values``/``indices``/``tail``, or sampled soft labels
    ``sample_ids``/``sample_counts`` (B, M) drawn at ``sample_temperature``; ``features`` are the teacher's cached
    layer outputs (FitNets hints), by layer name."""

    logits: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    tail: Tensor | None = None
    num_classes: int = 0
    sample_ids: Tensor | None = None
    sample_counts: Tensor | None = None
    sample_temperature: float = 1.0
    features: dict[str, Tensor] = field(default_factory=dict)

    @property
    def is_full(self) -> bool:
        return self.logits is not None

    @property
    def is_sampled(self) -> bool:
        """Only sampled soft labels (a loss then uses them, not logits)."""
        return self.logits is None and self.values is None

    @property
    def k(self) -> int:
        return self.logits.shape[-1] if self.is_full else self.values.shape[-1]

    def classes(self) -> int:
        """Number of classes C (``num_classes`` is required for top-k and sampled targets)."""
        if self.is_full:
            return self.logits.shape[-1]
        if self.num_classes <= 0:
            raise ValueError("a top-k or sampled SoftTarget needs num_classes > 0")
        return self.num_classes


def _check_classes(student_logits: Tensor, target: SoftTarget) -> int:
    c = student_logits.shape[-1]
    if target.classes() != c:
        raise ValueError(f"student has {c} classes, target has {target.classes()}")
    return c


def _dense_logits(target: SoftTarget) -> Tensor:
    """Teacher logits (B, C) for a full target, or a top-k target with k == C."""
    if target.is_full:
        return target.logits.float()
    if target.k != target.classes():
        raise ValueError("dense logits need k == num_classes")
    out = torch.empty_like(target.values, dtype=torch.float32)
    return out.scatter_(1, target.indices, target.values.float())


def _bucket_log_probs(target: SoftTarget, T: float) -> Tensor:
    """Teacher log-probs (B, k+1) over the top-k classes plus the rest bucket (format.topk's rule)."""
    return topk.bucket_log_probs(target.values, target.tail, target.classes(), T)


def _batch_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Batch mean of sum_c p (log p - log q); terms with p == 0 contribute 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).mean()


def _sample_weights(target: SoftTarget) -> Tensor:
    """(B, C) empirical distribution of the draws: counts / M at the drawn ids."""
    counts = target.sample_counts.float()
    dense = torch.zeros(len(counts), target.classes(), device=counts.device)
    return dense.scatter_add_(1, target.sample_ids, counts) / counts.sum(1, keepdim=True)


def teacher_probs(target: SoftTarget, T: float = 1.0) -> Tensor:
    """Dense teacher distribution (B, C) at temperature T; top-k targets spread the rest mass evenly over the
    absent classes (format.topk's rule); sampled targets give their draws' frequencies (at their own T)."""
    if target.is_sampled:
        return _sample_weights(target)
    c = target.classes()
    if target.is_full or target.k == c:
        return (_dense_logits(target) / T).softmax(dim=1)
    return (topk.dense_logits(target.values, target.indices, target.tail, c) / T).softmax(dim=1)


def teacher_argmax(target: SoftTarget) -> Tensor:
    """Teacher's predicted class (B,) (sampled targets: the id drawn most often)."""
    if target.is_sampled:
        return target.sample_ids.gather(1, target.sample_counts.argmax(1, keepdim=True)).squeeze(1)
    if target.is_full:
        return target.logits.argmax(dim=1)
    return target.indices.gather(1, target.values.argmax(dim=1, keepdim=True)).squeeze(1)


def ce(student_logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over labelled samples (y >= 0); 0 if none is labelled."""
    labelled = (y >= 0).float()
    per_sample = F.cross_entropy(student_logits.float(), y.clamp(min=0), reduction="none")
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1.0)


def kl_soft(student_logits: Tensor, target: SoftTarget, T: float, topk_mode: str = "tail") -> Tensor:
    """Batch-mean KL(p_teacher^T || q_student^T), not scaled by T**2.

    Full targets compare all C classes.  Top-k targets:

    * ``"tail"``: k+1 buckets (top-k classes + everything else).  The student's
      rest bucket is the logsumexp of its non-top-k log-probs; the teacher's is
      built from ``tail`` assuming the missing mass is spread evenly over the
      ``C - k`` absent classes, which is exact at T=1 and approximate at other
      T.  With k == C this is the full KL.
    * ``"renorm"``: both distributions restricted to the k stored classes and
      renormalised over them (drops the tail mass).
    """
    c = _check_classes(student_logits, target)
    s = student_logits.float() / T
    if target.is_sampled:
        return sampled_kl(student_logits, target, T)
    if target.is_full or (topk_mode == "tail" and target.k == c):
        return _batch_kl((_dense_logits(target) / T).log_softmax(dim=1), s.log_softmax(dim=1))
    if topk_mode == "renorm":
        log_p = (target.values.float() / T).log_softmax(dim=1)
        return _batch_kl(log_p, s.gather(1, target.indices).log_softmax(dim=1))
    if topk_mode != "tail":
        raise ValueError(f"unknown topk_mode {topk_mode!r}")
    log_q = s.log_softmax(dim=1)
    in_topk = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, target.indices, True)
    log_q_rest = log_q.masked_fill(in_topk, float("-inf")).logsumexp(dim=1, keepdim=True)
    log_q_buckets = torch.cat([log_q.gather(1, target.indices), log_q_rest], dim=1)
    return _batch_kl(_bucket_log_probs(target, T), log_q_buckets)


def sampled_kl(student_logits: Tensor, target: SoftTarget, T: float) -> Tensor:
    """KL(p_teacher^T || q_student^T) estimated from sampled soft labels (Anshumann et al., 2025): the batch mean of
    -(1/M) Σ counts · log q^T(id), which is the cross-entropy estimate minus nothing — it differs from the KL by the
    teacher's entropy, a constant, so its gradient is an unbiased estimate of the KL's. The draws must be from the
    teacher at this T (kdtrain refuses another T)."""
    log_q = (student_logits.float() / T).log_softmax(dim=1)
    counts = target.sample_counts.float()
    picked = log_q.gather(1, target.sample_ids)
    return -((counts * picked).sum(1) / counts.sum(1)).mean()


def kd(
    student_logits: Tensor,
    y: Tensor,
    target: SoftTarget,
    T: float,
    alpha: float,
    topk_mode: str = "tail",
) -> Tensor:
    """Hinton KD: ``alpha * CE(s, y) + (1 - alpha) * T**2 * KL_T``.

    If no sample in the batch is labelled, returns ``T**2 * KL_T`` alone
    (pure distillation on an unlabelled transfer set).
    """
    soft = T**2 * kl_soft(student_logits, target, T, topk_mode)
    mixed = alpha * ce(student_logits, y) + (1.0 - alpha) * soft
    return torch.where((y >= 0).any(), mixed, soft)


def multi_teacher(
    student_heads: Sequence[Tensor],
    y: Tensor,
    targets: Sequence[SoftTarget],
    lambdas: Sequence[float],
    taus: Sequence[float],
    lambda0: float,
    topk_mode: str = "tail",
) -> Tensor:
    """CivT (Eq. 5): ``lambda0 * CE(head_0, y) + sum_i lambda_i * tau_i**2 * KL_i``.

    ``student_heads[0]`` is the class head and ``student_heads[i]`` the head
    distilled from teacher i; a single head serves every term (ensemble KD on
    a plain student).  The CE term is 0 when no sample is labelled.
    """
    n = len(targets)
    if not (len(lambdas) == len(taus) == n):
        raise ValueError("targets, lambdas and taus must have the same length")
    if len(student_heads) not in (1, n + 1):
        raise ValueError(f"expected 1 or {n + 1} student heads, got {len(student_heads)}")
    heads = list(student_heads) if len(student_heads) > 1 else [student_heads[0]] * (n + 1)
    loss = lambda0 * ce(heads[0], y)
    for head, target, lam, tau in zip(heads[1:], targets, lambdas, taus):
        loss = loss + lam * tau**2 * kl_soft(head, target, tau, topk_mode)
    return loss


def hard(student_logits: Tensor, target: SoftTarget, y: Tensor | None = None) -> Tensor:
    """DeiT hard distillation: mean CE(student, teacher argmax) over the batch.

    ``y`` is accepted for API compatibility and unused (the target is the teacher's).
    """
    return F.cross_entropy(student_logits.float(), teacher_argmax(target))


def deit_hard(cls_logits: Tensor, dist_logits: Tensor, y: Tensor, target: SoftTarget) -> Tensor:
    """``0.5 * CE(cls, y) + 0.5 * CE(dist, argmax t)``; pass the same logits twice
    for a plain student.  With no labelled sample, returns the hard term alone."""
    hard_term = hard(dist_logits, target)
    mixed = 0.5 * ce(cls_logits, y) + 0.5 * hard_term
    return torch.where((y >= 0).any(), mixed, hard_term)


def cwtm(student_logits: Tensor, y: Tensor, target: SoftTarget) -> Tensor:
    """Born-Again CWTM: per-sample CE(student, y) weighted by the teacher's max
    probability (T=1), weights normalised to sum to 1 over the labelled samples.
    0 when no sample is labelled."""
    labelled = (y >= 0).float()
    conf = teacher_probs(target, 1.0).amax(dim=1) * labelled
    weights = conf / conf.sum().clamp(min=torch.finfo(conf.dtype).tiny)
    per_sample = F.cross_entropy(student_logits.float(), y.clamp(min=0), reduction="none")
    return (weights * per_sample).sum()


def dkpp_target(target: SoftTarget, generator: torch.Generator | None = None) -> Tensor:
    """Teacher probabilities (T=1) with the argmax kept in place and the other
    C-1 entries shuffled independently per sample (top-k: dense expansion of
    ``teacher_probs``, tail mass spread evenly)."""
    p = teacher_probs(target, 1.0)
    b, c = p.shape
    top = teacher_argmax(target)
    is_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top[:, None], True)
    # Non-argmax positions of each row in ascending order (stable sort puts False first).
    others = torch.argsort(is_top.to(torch.uint8), dim=1, stable=True)[:, : c - 1]
    device = generator.device if generator is not None else p.device
    keys = torch.rand(b, c - 1, generator=generator, device=device).to(p.device)
    sources = others.gather(1, keys.argsort(dim=1))
    return p.scatter(1, others, p.gather(1, sources))


def dkpp(
    student_logits: Tensor,
    y: Tensor,
    target: SoftTarget,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Born-Again DKPP: batch-mean cross-entropy of the student against
    ``dkpp_target``.  ``y`` is accepted for API compatibility and unused."""
    permuted = dkpp_target(target, generator)
    return -(permuted * student_logits.float().log_softmax(dim=1)).sum(dim=1).mean()
