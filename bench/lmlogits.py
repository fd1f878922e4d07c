"""LM-like teacher logits for the token-cache bench, and the KL of what a top-k + tail cache keeps of them.

`LMLogits`: a Zipf unigram over a BPE-like id order, a context term from random 64-d token embeddings, 4-256 boosted
continuations per position, each position's temperature solved for an entropy drawn from LogNormal(log 1.6, 0.5)
in [0.5, 4] nats; deterministic per (seed, batch key).  `kl_stats` applies format.topk's tail rule in float64,
independently of kdcache's code.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class LMLogits:
    """LM-like teacher logits over V ids (see the docstring); deterministic per (seed, batch key)."""

    def __init__(self, V: int, seed: int = 0, dim: int = 64) -> None:
        self.V, self.seed, self.dim = V, seed, dim
        rng = np.random.default_rng(seed)
        r = np.arange(1, V + 1, dtype=np.float64)
        logu = -1.1 * np.log(r + 2.7)
        logu -= np.logaddexp.reduce(logu)
        base = np.empty(V)
        base[np.argsort(np.argsort(np.log(r) + 1.5 * rng.standard_normal(V)))] = logu  # frequent ids tend small
        e = torch.randn(V, dim, generator=torch.Generator().manual_seed(seed))
        self.basis = torch.cat([e / e.norm(dim=1, keepdim=True), torch.tensor(base, dtype=torch.float32)[:, None]], 1)
        cand = np.exp(0.7 * base)
        self.cand_cdf = torch.tensor(np.cumsum(cand / cand.sum()))

    def __call__(self, n: int, key: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key + 1)
        c = torch.randn(n, self.dim, generator=g)
        s = (torch.rand(n, 1, generator=g) + 0.5) * math.sqrt(self.dim) / c.norm(dim=1, keepdim=True)
        raw = torch.cat([c * s, torch.rand(n, 1, generator=g) * 0.5 + 0.5], 1) @ self.basis.T
        cand = torch.searchsorted(self.cand_cdf, torch.rand(n, 256, generator=g, dtype=torch.float64))
        m = torch.exp(torch.rand(n, 1, generator=g) * math.log(64) + math.log(4)).floor()
        pos = torch.arange(256.0)[None]
        b = torch.rand(n, 1, generator=g) * 6 + 2
        boost = torch.where(pos < m, b * torch.exp(-pos / (m / 3)), torch.zeros(()))
        boost[:, 0] += torch.empty(n).exponential_(0.5, generator=g)
        raw.scatter_add_(1, cand.clamp_max(self.V - 1), boost)
        h = torch.exp(math.log(1.6) + 0.5 * torch.randn(n, generator=g)).clamp(0.5, 4.0)
        mean = raw.mean(1)
        beta = torch.minimum(self._beta(raw, h, g), 40.0 / (raw.max(1).values - mean))  # top <= 40 above mean
        return raw.mul_(beta[:, None]).add_((torch.randn(n, generator=g) - beta * mean)[:, None])

    @staticmethod
    def _beta(raw: torch.Tensor, h: torch.Tensor, g: torch.Generator, iters: int = 30) -> torch.Tensor:
        """beta with H(softmax(beta raw)) ~ h: exact top-256 plus a weighted uniform sample of the rest, Newton on
        log beta inside a bisection bracket."""
        n, V = raw.shape
        tv = raw.topk(256, dim=1).values
        sv = raw.gather(1, torch.randint(0, V, (n, 2048), generator=g))
        w = torch.where(sv < tv[:, -1:], torch.full_like(sv, V / 2048), torch.zeros_like(sv))
        x, logw = torch.cat([tv, sv], 1).double(), torch.cat([torch.ones_like(tv), w], 1).double().log()
        u, lo, hi = torch.zeros(n, dtype=torch.float64), torch.full((n,), -6.0).double(), torch.full((n,), 6.0).double()
        for _ in range(iters):
            bt = u.exp()
            z = logw + bt[:, None] * x
            p = (z - z.logsumexp(1, keepdim=True)).exp()
            m1, m2 = (p * x).sum(1), (p * x * x).sum(1)
            err = z.logsumexp(1) - bt * m1 - h.double()
            lo, hi = torch.where(err > 0, u, lo), torch.where(err > 0, hi, u)
            un = u + err / (bt * bt * (m2 - m1 * m1).clamp_min(1e-12))
            u = torch.where((un <= lo) | (un >= hi) | ~torch.isfinite(un), (lo + hi) / 2, un)
        return u.exp().float()


def truth_of(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Exact float32 top-128 (values, ids), logsumexp and entropy (sums in float64) of each row: KL for any k <= 128."""
    vals, ids = logits.topk(128, dim=1)
    e = (logits - vals[:, :1]).exp_()
    z = e.sum(1, dtype=torch.float64)
    lse = vals[:, 0].double() + z.log()
    return {"vals": vals.numpy(), "ids": ids.int().numpy(), "lse": lse.numpy(),
            "H": (lse - e.mul_(logits).sum(1, dtype=torch.float64) / z).numpy()}


def kl_stats(t: dict, values: np.ndarray, indices: np.ndarray, tail: np.ndarray, V: int) -> dict:
    """Mean KL(full || q) per token, q = k buckets + the rest spread evenly over V - k ids (format.topk's rule, in
    float64), for what a cache keeps and for its truncation floor (the exact top-k values, the same tail)."""
    k = values.shape[1]
    x = t["vals"][:, :k].astype(np.float64)
    for r in np.nonzero((indices != t["ids"][:, :k]).any(1))[0]:  # ties may be ordered differently
        where = dict(zip(t["ids"][r].tolist(), t["vals"][r].tolist()))
        x[r] = [where[int(i)] for i in indices[r]]
    tl = tail.astype(np.float64)
    p, p_rest, log_m = np.exp(x - t["lse"][:, None]), np.exp(tl - t["lse"]), math.log(V - k)

    def kl(v: np.ndarray) -> np.ndarray:
        lz = np.logaddexp(np.logaddexp.reduce(v, axis=1), tl)
        return -t["H"] - ((p * (v - lz[:, None])).sum(1) + p_rest * (tl - lz - log_m))

    got, floor = kl(values.astype(np.float64)), kl(x)
    return {"KL": float(got.mean()), "KL floor": float(floor.mean()), "dKL": float((got - floor).mean())}
