"""Finish a dump: summary statistics from the stored arrays, status `complete`, HDF5 conversion."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from kdcache.cache.format import STATUS_COMPLETE, Layout, version_for
from kdcache.cache.store import Store, backend_for, write_hdf5
from kdcache.errors import KDCacheError


def chunk_stats(values: np.ndarray, indices: np.ndarray | None, tail: np.ndarray | None,
                labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Sums over the rows of one chunk (all views): correct, labelled, entropy (nats), top-k mass."""
    v = torch.from_numpy(np.asarray(values, dtype=np.float32))          # (R, V, W)
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))[:, None].expand(v.shape[:2])
    pred = v.argmax(-1) if indices is None else torch.from_numpy(indices[..., 0].astype(np.int64))
    labelled = lab >= 0
    out = {"correct": float(((pred == lab) & labelled).sum()), "labelled": float(labelled.sum()),
           "rows": float(v.shape[0] * v.shape[1])}
    if tail is None:
        logp = v.log_softmax(-1)
        out["entropy"] = float(-(logp.exp() * logp).sum(-1).sum())
        out["mass"] = out["rows"]
        return out
    t = torch.from_numpy(np.asarray(tail, dtype=np.float32))[..., None]  # (R, V, 1)
    logz = torch.cat([v, t], -1).logsumexp(-1, keepdim=True)
    logp, logp_tail = v - logz, (t - logz)
    missing = num_classes - v.shape[-1]
    # Tail mass spread evenly over the missing classes (an estimate: the stored tail is its total only).
    h = -(logp.exp() * logp).sum(-1) - (logp_tail.exp() * (logp_tail - math.log(missing)))[..., 0]
    out["entropy"] = float(h.sum())
    out["mass"] = float(logp.exp().sum())
    return out


def cache_stats(store: Store, layout: Layout) -> dict:
    """Teacher top-1 against the stored labels, mean entropy and mean top-k mass, read chunk by chunk."""
    acc = {"correct": 0.0, "labelled": 0.0, "rows": 0.0, "entropy": 0.0, "mass": 0.0}
    has_topk = layout.k is not None
    for c in range(layout.n_chunks):
        sl = layout.chunk_slice(c)
        s = chunk_stats(store["values"][sl], store["indices"][sl] if has_topk else None,
                        store["tail"][sl] if has_topk else None, store["labels"][sl], layout.num_classes)
        for k in acc:
            acc[k] += s[k]
    return {
        "teacher_top1": acc["correct"] / acc["labelled"] if acc["labelled"] else None,
        "mean_entropy": acc["entropy"] / acc["rows"],
        "topk_mass": acc["mass"] / acc["rows"] if has_topk else 1.0,
    }


def finalize(store: Store, out: str, compressor: str) -> None:
    """Mark a fully written staging store complete; for HDF5 output, convert it atomically into place."""
    layout = Layout.from_attrs(store.attrs)
    done = np.asarray(store["done"][...], dtype=bool)
    if not done.all():
        missing = np.nonzero(~done)[0]
        raise KDCacheError(f"{len(missing)} chunks of {store.path} are still missing (first: {missing[0]}); "
                           "rerun with --resume")
    attrs = store.attrs
    attrs["stats"] = cache_stats(store, layout)
    attrs["status"] = STATUS_COMPLETE
    attrs["version"] = version_for(attrs.get("rows"))  # a range dump begun as 1.1 and resumed ends as 2.0
    attrs["compressor"] = compressor
    if backend_for(out) == "zarr":
        store.set_attrs(attrs)
        return
    tmp = out + ".tmp"
    try:
        write_hdf5(store, tmp, compressor, attrs)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
