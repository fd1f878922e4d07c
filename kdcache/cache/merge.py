"""`kdcache merge`: an ensemble cache from several teachers' caches of the same dataset.

Rule for top-k members (what a cache does not know): the C−k logits a member dropped are only known
through their total mass (the stored tail), so they are taken as equal — the tail spread evenly over
the missing classes, the maximum-entropy guess consistent with what was stored. The merged cache is
full when every member is full, else top-k with the largest member k (its tail recomputed).
"""

from __future__ import annotations

import datetime
import hashlib
import math
from contextlib import ExitStack

import numpy as np
import torch

from kdcache import __version__
from kdcache.cache.derive import check_target, derived_cache
from kdcache.cache.format import FORMAT_NAME, Layout, default_chunk_rows, version_for
from kdcache.cache.reader import Cache, CacheBatch, open_cache
from kdcache.cache.writer import Rows
from kdcache.errors import KDCacheError

MODES = ("mean-prob", "mean-logit")
IDENTITY = ("n", "num_classes", "class_names", "fingerprint", "labels_sha256")


def dense_logits(b: CacheBatch, num_classes: int) -> torch.Tensor:
    """(B, C) logits at T=1; for top-k, each dropped class gets tail − log(C−k) (the tail spread evenly)."""
    v = b.values.float()
    if b.indices is None:
        return v
    fill = (b.tail.float() - math.log(num_classes - v.shape[1]))[:, None]
    return fill.expand(len(v), num_classes).clone().scatter_(1, b.indices, v)


def combine(dense: list[torch.Tensor], weights: list[float], mode: str, temperature: float) -> torch.Tensor:
    """mean-logit: Σ wᵢ zᵢ. mean-prob: T·log Σ wᵢ softmax(zᵢ/T), so softmax(z/T) is the mean distribution."""
    w = torch.tensor(weights, dtype=torch.float32)[:, None, None]
    z = torch.stack(dense)
    if mode == "mean-logit":
        return (w * z).sum(0)
    return temperature * torch.logsumexp(torch.log_softmax(z / temperature, -1) + w.log(), 0)


def _check_members(caches: list[Cache]) -> None:
    first = caches[0]
    for other in caches[1:]:
        for key in IDENTITY:
            a, b = first.attrs["dataset"].get(key), other.attrs["dataset"].get(key)
            if a != b:
                raise KDCacheError(f"cannot merge {first.path} and {other.path}: dataset {key} differs "
                                   f"({str(a)[:40]} vs {str(b)[:40]}); merge caches of the same dataset and split")
        for key in ("n_views", "rows"):
            if first.attrs.get(key) != other.attrs.get(key):
                raise KDCacheError(f"cannot merge {first.path} and {other.path}: {key} differs")
        if first.attrs["views"]["augment"] != other.attrs["views"]["augment"] or \
                first.attrs["views"]["seed"] != other.attrs["views"]["seed"]:
            raise KDCacheError(f"cannot merge {first.path} and {other.path}: they stored different views")


def _attrs(caches: list[Cache], layout: Layout, mode: str, temperature: float, weights: list[float],
           command: str) -> dict:
    members = [{"path": c.path, "teacher": c.attrs["teacher"]["name"],
                "weights_sha256": c.attrs["teacher"]["weights"].get("sha256"), "kind": c.kind, "k": c.k}
               for c in caches]
    digest = hashlib.sha256("".join(str(m["weights_sha256"]) for m in members).encode()).hexdigest()
    first = caches[0].attrs
    return {
        "format": FORMAT_NAME, "version": version_for(first.get("rows")), **layout.to_attrs(),
        "tail": first.get("tail") if layout.k else None,
        "teacher": {"name": "ensemble(" + "+".join(m["teacher"] for m in members) + ")",
                    "weights": {"source": "merge", "sha256": digest}, "params": None,
                    "preprocess": first["teacher"]["preprocess"], "arch_args": {},
                    "members": members},
        "merge": {"mode": mode, "temperature": temperature, "weights": weights,
                  "topk_rule": "dropped logits = tail − log(C−k) (tail spread evenly)"},
        "dataset": first["dataset"], "rows": first.get("rows"), "views": first["views"],
        "dump": {"merge_of": [m["path"] for m in members]},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": f"kdcache {__version__}", "command": command,
    }


def merge(paths: list[str], out: str, mode: str = "mean-prob", temperature: float = 1.0,
          weights: list[float] | None = None, overwrite: bool = False, command: str = "") -> None:
    """Write the weighted ensemble of `paths` to `out` (a .zarr; .h5 output is converted at the end)."""
    if len(paths) < 2:
        raise KDCacheError("merge needs at least two caches")
    if mode not in MODES:
        raise KDCacheError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
    weights = weights or [1.0 / len(paths)] * len(paths)
    if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise KDCacheError(f"--weights needs {len(paths)} non-negative numbers, one per cache")
    weights = [w / sum(weights) for w in weights]
    check_target(out, paths, "merge")
    with ExitStack() as stack:
        caches = [stack.enter_context(open_cache(p)) for p in paths]
        _check_members(caches)
        c0 = caches[0]
        topks = [c.k for c in caches if c.k is not None]
        k = max(topks) if topks else None
        layout = Layout(c0.n, c0.n_views, c0.num_classes, k, "float16",  # chunk rows by the dataset, as dump
                        min(default_chunk_rows(k or c0.num_classes, c0.n_views, "float16"),
                            c0.attrs["dataset"]["n"]))
        attrs = _attrs(caches, layout, mode, temperature, weights, command)
        with derived_cache(out, layout, attrs, overwrite) as writer:
            for c in range(layout.n_chunks):
                sl = layout.chunk_slice(c)
                idx = np.arange(sl.start, sl.stop)
                per_view = []
                for v in range(layout.n_views):
                    z = combine([dense_logits(cc.read(idx, v), cc.num_classes) for cc in caches], weights, mode,
                                temperature)
                    per_view.append(z)
                z = torch.stack(per_view, 1).clamp(-65504.0, 65504.0)
                own = [c0.read(idx, v) for v in range(layout.n_views)]
                arrays: dict[str, object] = {"labels": own[0].labels.numpy(),
                                             "views": np.stack([b.views.numpy() for b in own], 1)}
                if k is None:
                    arrays["values"] = z.half().numpy()
                else:
                    vals, ind = z.topk(k, -1)
                    arrays |= {"values": vals.half().numpy(), "indices": ind.int().numpy(),
                               "tail": z.scatter(-1, ind, float("-inf")).logsumexp(-1).numpy()}
                writer.put(Rows(start=sl.start, arrays=arrays))
