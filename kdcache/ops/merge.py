"""`kdcache merge`: an ensemble cache from several teachers' caches of the same dataset.

Top-k members are expanded to dense logits by format.topk's rule (the tail spread evenly over the
classes a member dropped). The merged cache is full when every member is full, else top-k with the
largest member k (its tail recomputed).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import ExitStack

import numpy as np
import torch

from kdcache.errors import KDCacheError
from kdcache.format import topk
from kdcache.format.attrs import cache_attrs, check_compatible
from kdcache.format.spec import Layout
from kdcache.io.output import check_target, derived_cache
from kdcache.io.reader import Cache, open_cache
from kdcache.io.writer import Rows

MODES = ("mean-prob", "mean-logit")
TOPK_RULE = "dropped logits = tail − log(C−k) (tail spread evenly)"


def combine(dense: list[torch.Tensor], weights: list[float], mode: str, temperature: float) -> torch.Tensor:
    """mean-logit: Σ wᵢ zᵢ. mean-prob: T·log Σ wᵢ softmax(zᵢ/T), so softmax(z/T) is the mean distribution."""
    z = torch.stack(dense)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * (z.dim() - 1)))
    if mode == "mean-logit":
        return (w * z).sum(0)
    return temperature * torch.logsumexp(torch.log_softmax(z / temperature, -1) + w.log(), 0)


def _attrs(caches: list[Cache], layout: Layout, mode: str, temperature: float, weights: list[float],
           command: str) -> dict:
    members = [{"path": c.path, "teacher": c.attrs["teacher"]["name"],
                "weights_sha256": c.attrs["teacher"]["weights"].get("sha256"), "kind": c.kind, "k": c.k}
               for c in caches]
    digest = hashlib.sha256("".join(str(m["weights_sha256"]) for m in members).encode()).hexdigest()
    first = caches[0].attrs
    return cache_attrs(
        layout,
        teacher={"name": "ensemble(" + "+".join(m["teacher"] for m in members) + ")",
                 "weights": {"source": "merge", "sha256": digest}, "params": None,
                 "preprocess": first["teacher"]["preprocess"], "arch_args": {}, "members": members},
        dataset=first["dataset"], views=first["views"], dump={"merge_of": [m["path"] for m in members]},
        rows=first.get("rows"), command=command,
        merge={"mode": mode, "temperature": temperature, "weights": weights, "topk_rule": TOPK_RULE})


def merge(paths: list[str], out: str, mode: str = "mean-prob", temperature: float = 1.0,
          weights: list[float] | None = None, overwrite: bool = False, command: str = "") -> None:
    """Write the weighted ensemble of `paths` to `out` (a .zarr; .h5 output is converted at the end)."""
    if len(paths) < 2:
        raise KDCacheError("merge needs at least two caches")
    if mode not in MODES:
        raise KDCacheError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise KDCacheError(f"--temperature must be a finite number greater than 0, got {temperature}")
    weights = weights or [1.0 / len(paths)] * len(paths)
    if len(weights) != len(paths) or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise KDCacheError(f"--weights needs {len(paths)} non-negative numbers, one per cache")
    weights = [w / sum(weights) for w in weights]
    check_target(out, paths, "merge")
    with ExitStack() as stack:
        caches = [stack.enter_context(open_cache(p)) for p in paths]
        check_compatible([(c.path, c.attrs) for c in caches], ["data", "views", "rows"], "merge",
                         "merge caches of the same dataset, split, rows and views")
        c0 = caches[0]
        topks = [c.k for c in caches if c.k is not None]
        k = max(topks) if topks else None
        layout = Layout.for_dataset(c0.n, c0.attrs["dataset"]["n"], c0.n_views, c0.num_classes, k, "float16",
                                    positions=c0.layout.positions)
        attrs = _attrs(caches, layout, mode, temperature, weights, command)
        with derived_cache(out, layout, attrs, overwrite, "merge", paths) as writer:
            for c in range(layout.n_chunks):
                sl = layout.chunk_slice(c)
                idx = np.arange(sl.start, sl.stop)
                per_view = []
                for v in range(layout.n_views):
                    batches = [cc.read(idx, v) for cc in caches]
                    dense = [topk.dense_logits(b.values, b.indices, b.tail, cc.num_classes)
                             for b, cc in zip(batches, caches)]
                    per_view.append(combine(dense, weights, mode, temperature))
                own = [c0.read(idx, v) for v in range(layout.n_views)]
                arrays: dict[str, object] = {"labels": own[0].labels.numpy(),
                                             "views": np.stack([b.views.numpy() for b in own], 1)}
                arrays |= {name: t.numpy() for name, t in topk.to_topk(torch.stack(per_view, 1), k,
                                                                       "float16").items()}
                writer.put(Rows(start=sl.start, arrays=arrays))
