"""Each loss against an explicit loop-based hand computation (float64 numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from kdcache.train.losses import (
    SoftTarget,
    ce,
    cwtm,
    deit_hard,
    dkpp,
    dkpp_target,
    hard,
    kd,
    kl_soft,
    multi_teacher,
    teacher_argmax,
    teacher_probs,
)

TOL = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- hand helpers
def softmax_row(z, T=1.0):
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def kl_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ce_hand_row(z, label):
    return -math.log(softmax_row(z)[label])


def ce_hand(S, y):
    rows = [ce_hand_row(S[b], y[b]) for b in range(len(y)) if y[b] >= 0]
    return sum(rows) / len(rows) if rows else 0.0


def kl_full_hand(S, Tl, T):
    return sum(kl_hand(softmax_row(Tl[b], T), softmax_row(S[b], T)) for b in range(len(S))) / len(S)


def topk_target(t: torch.Tensor, k: int) -> SoftTarget:
    values, indices = t.topk(k, dim=1)
    mask = torch.ones_like(t, dtype=torch.bool).scatter_(1, indices, False)
    tail = t.masked_fill(~mask, float("-inf")).logsumexp(dim=1)
    return SoftTarget(values=values, indices=indices, tail=tail, num_classes=t.shape[1])


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g) * 2
    t = torch.randn(4, 6, generator=g) * 3
    y = torch.tensor([2, -1, 0, 5])
    return s, t, y


# ---------------------------------------------------------------- ce
def test_ce_ignores_unlabelled(data):
    s, _, y = data
    assert_close(ce(s, y).double(), t64(ce_hand(s.tolist(), y.tolist())), **TOL)


def test_ce_all_unlabelled_is_zero_without_nan(data):
    s, _, _ = data
    s = s.clone().requires_grad_()
    loss = ce(s, torch.full((4,), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_ce_accepts_bf16_and_returns_float32(data):
    s, _, y = data
    out = ce(s.bfloat16(), y)
    assert out.dtype == torch.float32
    assert_close(out.double(), t64(ce_hand(s.bfloat16().float().tolist(), y.tolist())), **TOL)


# ---------------------------------------------------------------- kl / kd full
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_soft_full(data, T):
    s, t, _ = data
    got = kl_soft(s, SoftTarget(logits=t), T)
    assert_close(got.double(), t64(kl_full_hand(s.tolist(), t.tolist(), T)), **TOL)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_value(data, T):
    s, t, y = data
    alpha = 0.3
    want = alpha * ce_hand(s.tolist(), y.tolist()) + (1 - alpha) * T**2 * kl_full_hand(
        s.tolist(), t.tolist(), T
    )
    assert_close(kd(s, y, SoftTarget(logits=t), T, alpha).double(), t64(want), **TOL)


def test_kd_unlabelled_is_pure_distillation(data):
    s, t, _ = data
    T = 3.0
    got = kd(s, torch.full((4,), -1), SoftTarget(logits=t), T, alpha=0.9)
    assert_close(got.double(), t64(T**2 * kl_full_hand(s.tolist(), t.tolist(), T)), **TOL)


def test_kd_gradient_closed_form(data):
    """d/ds [alpha CE + (1-alpha) T^2 KL_T] = alpha (q - onehot)/n_lab + (1-alpha) T (q_T - p_T)/B."""
    s, t, _ = data
    y = torch.tensor([2, 1, 0, 5])  # fully labelled so n_lab = B
    B, C = s.shape
    T, alpha = 8.0, 0.25
    s_req = s.clone().requires_grad_()
    kd(s_req, y, SoftTarget(logits=t), T, alpha).backward()
    want = np.zeros((B, C))
    for b in range(B):
        q1 = softmax_row(s[b].tolist())
        qT = softmax_row(s[b].tolist(), T)
        pT = softmax_row(t[b].tolist(), T)
        for c in range(C):
            onehot = 1.0 if c == y[b] else 0.0
            want[b, c] = alpha * (q1[c] - onehot) / B + (1 - alpha) * T * (qT[c] - pT[c]) / B
    assert_close(s_req.grad.double(), torch.from_numpy(want), rtol=1e-4, atol=1e-7)


def test_kl_soft_bf16_student(data):
    s, t, _ = data
    got = kl_soft(s.half(), SoftTarget(logits=t), 2.0)
    assert got.dtype == torch.float32
    assert_close(got.double(), t64(kl_full_hand(s.half().float().tolist(), t.tolist(), 2.0)), **TOL)


# ---------------------------------------------------------------- top-k
def bucket_kl_from_full(S, Tl, k):
    """Exact KL over (top-k classes + rest) buckets from full logits, T=1."""
    out = 0.0
    for srow, trow in zip(S, Tl):
        p, q = softmax_row(trow), softmax_row(srow)
        top = sorted(range(len(trow)), key=lambda c: -trow[c])[:k]
        pb = [p[c] for c in top] + [1 - sum(p[c] for c in top)]
        qb = [q[c] for c in top] + [1 - sum(q[c] for c in top)]
        out += kl_hand(pb, qb)
    return out / len(S)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_kl_topk_tail_exact_at_T1(data, k):
    s, t, _ = data
    got = kl_soft(s, topk_target(t, k), 1.0, "tail")
    assert_close(got.double(), t64(bucket_kl_from_full(s.tolist(), t.tolist(), k)), **TOL)


def test_kl_topk_tail_at_T_uses_even_spread(data):
    """T != 1: rest bucket logit = log(C-k) + (tail - log(C-k))/T, by hand."""
    s, t, _ = data
    k, T = 2, 3.0
    target = topk_target(t, k)
    C = t.shape[1]
    out = 0.0
    for b in range(4):
        top = target.indices[b].tolist()
        tail = target.tail[b].item()
        m = C - k
        tb = [target.values[b, j].item() / T for j in range(k)] + [math.log(m) + (tail - math.log(m)) / T]
        pb = softmax_row(tb)
        q = softmax_row(s[b].tolist(), T)
        qb = [q[c] for c in top] + [sum(q[c] for c in range(C) if c not in top)]
        out += kl_hand(pb, qb)
    assert_close(kl_soft(s, target, T, "tail").double(), t64(out / 4), **TOL)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_topk_C_minus_1_equals_full(data, T):
    """With k = C-1 the rest bucket is one class, so tail mode equals full KL at any T."""
    s, t, _ = data
    got = kl_soft(s, topk_target(t, t.shape[1] - 1), T, "tail")
    assert_close(got.double(), t64(kl_full_hand(s.tolist(), t.tolist(), T)), **TOL)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_kl_topk_k_equals_C_is_full(data, mode):
    s, t, _ = data
    got = kl_soft(s, topk_target(t, t.shape[1]), 2.0, mode)
    assert_close(got.double(), t64(kl_full_hand(s.tolist(), t.tolist(), 2.0)), **TOL)


def test_kl_topk_renorm(data):
    s, t, _ = data
    k, T = 3, 2.0
    target = topk_target(t, k)
    out = 0.0
    for b in range(4):
        idx = target.indices[b].tolist()
        p = softmax_row(target.values[b].tolist(), T)
        q = softmax_row([s[b, c].item() for c in idx], T)
        out += kl_hand(p, q)
    assert_close(kl_soft(s, target, T, "renorm").double(), t64(out / 4), **TOL)


def test_kl_topk_unknown_mode(data):
    s, t, _ = data
    with pytest.raises(ValueError):
        kl_soft(s, topk_target(t, 2), 1.0, "bogus")


def test_kd_topk_gradient_flows_only_finite(data):
    s, t, y = data
    s_req = s.clone().requires_grad_()
    kd(s_req, y, topk_target(t, 2), 4.0, 0.5).backward()
    assert torch.isfinite(s_req.grad).all()


# ---------------------------------------------------------------- teacher_probs / argmax
def test_teacher_probs_full_matches_softmax(data):
    _, t, _ = data
    got = teacher_probs(SoftTarget(logits=t), 2.0)
    want = torch.tensor([softmax_row(r, 2.0) for r in t.tolist()], dtype=torch.float64)
    assert_close(got.double(), want, **TOL)


def test_teacher_probs_topk(data):
    _, t, _ = data
    k = 2
    target = topk_target(t, k)
    got = teacher_probs(target, 1.0)
    assert_close(got.sum(1), torch.ones(4), **TOL)
    for b in range(4):
        p = softmax_row(t[b].tolist())
        top = target.indices[b].tolist()
        rest = (1 - sum(p[c] for c in top)) / (6 - k)
        want = [p[c] if c in top else rest for c in range(6)]
        assert_close(got[b].double(), t64(want), **TOL)
    assert_close(teacher_probs(target, 5.0).sum(1), torch.ones(4), **TOL)


def test_teacher_argmax(data):
    _, t, _ = data
    want = torch.tensor([max(range(6), key=lambda c: r[c]) for r in t.tolist()])
    assert torch.equal(teacher_argmax(SoftTarget(logits=t)), want)
    assert torch.equal(teacher_argmax(topk_target(t, 3)), want)


def test_topk_needs_num_classes(data):
    s, t, _ = data
    v, i = t.topk(2, dim=1)
    with pytest.raises(ValueError):
        kl_soft(s, SoftTarget(values=v, indices=i, tail=v[:, 0]), 1.0)


# ---------------------------------------------------------------- multi-teacher (CivT Eq. 5)
def test_multi_teacher_three_heads(data):
    s, t, y = data
    g = torch.Generator().manual_seed(1)
    h1, h2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    t2 = torch.randn(4, 6, generator=g) * 2
    lam0, lams, taus = 0.7, [0.4, 0.9], [1.0, 3.0]
    got = multi_teacher([s, h1, h2], y, [SoftTarget(logits=t), SoftTarget(logits=t2)], lams, taus, lam0)
    want = (
        lam0 * ce_hand(s.tolist(), y.tolist())
        + lams[0] * taus[0] ** 2 * kl_full_hand(h1.tolist(), t.tolist(), taus[0])
        + lams[1] * taus[1] ** 2 * kl_full_hand(h2.tolist(), t2.tolist(), taus[1])
    )
    assert_close(got.double(), t64(want), **TOL)


def test_multi_teacher_single_head(data):
    s, t, y = data
    t2 = t.flip(1)
    got = multi_teacher([s], y, [SoftTarget(logits=t), topk_target(t2, 5)], [0.5, 0.5], [2.0, 4.0], 1.0)
    want = (
        ce_hand(s.tolist(), y.tolist())
        + 0.5 * 4.0 * kl_full_hand(s.tolist(), t.tolist(), 2.0)
        + 0.5 * 16.0 * kl_full_hand(s.tolist(), t2.tolist(), 4.0)  # k = C-1: exact
    )
    assert_close(got.double(), t64(want), **TOL)


def test_multi_teacher_bad_head_count(data):
    s, t, y = data
    with pytest.raises(ValueError):
        multi_teacher([s, s], y, [SoftTarget(logits=t)] * 2, [1, 1], [1, 1], 1.0)


# ---------------------------------------------------------------- hard / deit
def test_hard_is_ce_to_teacher_argmax(data):
    s, t, _ = data
    am = [max(range(6), key=lambda c: r[c]) for r in t.tolist()]
    want = sum(ce_hand_row(s[b].tolist(), am[b]) for b in range(4)) / 4
    assert_close(hard(s, SoftTarget(logits=t)).double(), t64(want), **TOL)
    assert_close(hard(s, topk_target(t, 2)).double(), t64(want), **TOL)


def test_deit_hard(data):
    s, t, y = data
    d = s.flip(0)
    am = [max(range(6), key=lambda c: r[c]) for r in t.tolist()]
    hard_part = sum(ce_hand_row(d[b].tolist(), am[b]) for b in range(4)) / 4
    want = 0.5 * ce_hand(s.tolist(), y.tolist()) + 0.5 * hard_part
    assert_close(deit_hard(s, d, y, SoftTarget(logits=t)).double(), t64(want), **TOL)
    none = deit_hard(s, d, torch.full((4,), -1), SoftTarget(logits=t))
    assert_close(none.double(), t64(hard_part), **TOL)


# ---------------------------------------------------------------- CWTM
def test_cwtm_weights_by_hand(data):
    s, t, y = data  # sample 1 is unlabelled
    conf = [max(softmax_row(r)) for r in t.tolist()]
    lab = [b for b in range(4) if y[b] >= 0]
    z = sum(conf[b] for b in lab)
    want = sum(conf[b] / z * ce_hand_row(s[b].tolist(), int(y[b])) for b in lab)
    assert_close(cwtm(s, y, SoftTarget(logits=t)).double(), t64(want), **TOL)
    # top-k at T=1 has the exact max probability
    assert_close(cwtm(s, y, topk_target(t, 2)).double(), t64(want), **TOL)


def test_cwtm_unlabelled_is_zero(data):
    s, t, _ = data
    out = cwtm(s, torch.full((4,), -1), SoftTarget(logits=t))
    assert out.item() == 0.0


# ---------------------------------------------------------------- DKPP
def test_dkpp_target_properties(data):
    _, t, _ = data
    target = SoftTarget(logits=t)
    p = teacher_probs(target)
    perm = dkpp_target(target, torch.Generator().manual_seed(3))
    am = teacher_argmax(target)
    for b in range(4):
        assert perm[b, am[b]] == p[b, am[b]]
        assert sorted(perm[b].tolist()) == sorted(p[b].tolist())
    assert not torch.equal(perm, p)  # something actually moved
    again = dkpp_target(target, torch.Generator().manual_seed(3))
    assert torch.equal(perm, again)


def test_dkpp_loss_is_ce_against_permuted(data):
    s, t, y = data
    target = SoftTarget(logits=t)
    perm = dkpp_target(target, torch.Generator().manual_seed(7)).tolist()
    want = 0.0
    for b in range(4):
        q = softmax_row(s[b].tolist())
        want += -sum(perm[b][c] * math.log(q[c]) for c in range(6))
    got = dkpp(s, y, target, torch.Generator().manual_seed(7))
    assert_close(got.double(), t64(want / 4), **TOL)


def test_dkpp_topk_expands_tail(data):
    _, t, _ = data
    target = topk_target(t, 2)
    perm = dkpp_target(target, torch.Generator().manual_seed(0))
    dense = teacher_probs(target)
    assert_close(perm.sum(1), torch.ones(4), **TOL)
    for b in range(4):
        assert sorted(perm[b].tolist()) == sorted(dense[b].tolist())


# ---------------------------------------------------------------- properties
logits_pair = st.integers(2, 6).flatmap(
    lambda c: st.tuples(
        st.lists(st.lists(st.floats(-20, 20), min_size=c, max_size=c), min_size=1, max_size=4),
        st.lists(st.lists(st.floats(-20, 20), min_size=c, max_size=c), min_size=1, max_size=4),
    )
)


@settings(max_examples=60, deadline=None)
@given(pair=logits_pair, T=st.floats(0.5, 8.0))
def test_kl_nonnegative_and_zero_on_self(pair, T):
    a, b = pair
    n = min(len(a), len(b))
    s, t = torch.tensor(a[:n]), torch.tensor(b[:n])
    assert kl_soft(s, SoftTarget(logits=t), T).item() >= -1e-6
    assert abs(kl_soft(t, SoftTarget(logits=t), T).item()) < 1e-5
    if t.shape[1] > 2:
        assert kl_soft(s, topk_target(t, 2), T, "tail").item() >= -1e-6
