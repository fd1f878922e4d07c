"""Evaluation on a held-out split, streamed batch by batch: top-1, NLL (and perplexity for per-token tasks),
calibration (ECE), agreement with the teacher's test-split cache, and top-1 per group where the dataset defines
groups (e.g. the agreement task's number of attractors)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdcache.data.render import ModelInput
from kdcache.data.sources import SourceDataset
from kdcache.data.views import identity_views
from kdcache.device import autocast, to_model_layout
from kdcache.io.reader import Cache
from kdcache.train import metrics
from kdcache.train.batches import to_target
from kdcache.train.losses import teacher_argmax


@torch.inference_mode()
def predict(model: torch.nn.Module, ds: SourceDataset, pre: ModelInput, device: torch.device,
            batch_size: int = 512, views: np.ndarray | None = None) -> torch.Tensor:
    """Model logits (N, C) on CPU for every sample, under the identity view unless `views` (N, 5) given."""
    model.eval()
    out = []
    for samples, _, idx in DataLoader(ds, batch_size=batch_size, shuffle=False):
        v = identity_views(len(idx))[:, 0] if views is None else views[idx.numpy()]
        x = to_model_layout(pre(samples.to(device), torch.as_tensor(v, device=device)))
        with autocast(device):
            out.append(model(x).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, ds: SourceDataset, pre: ModelInput, device: torch.device,
             test_cache: Cache | None = None, batch_size: int = 256) -> dict:
    """top1, nll, ece, reliability, and when available agreement, perplexity (per-token) and top1_by_group.

    Per-token tasks count every position whose label is not -1 (padding); per-sample tasks use labelled samples
    for the label metrics and every sample for agreement."""
    model.eval()
    groups = getattr(ds, "groups", None)  # (name, per-sample int array) when the dataset defines groups
    calib = metrics.Calibration()
    correct = labelled = agree = rows = 0
    nll = 0.0
    by_group: dict[int, list[int]] = {}
    for samples, labels, idx in DataLoader(ds, batch_size=batch_size, shuffle=False):
        views = torch.from_numpy(identity_views(len(idx))[:, 0]).to(device)
        x = to_model_layout(pre(samples.to(device), views))
        with autocast(device):
            logits = model(x).float().cpu()
        y = labels.long()
        teacher = None
        if test_cache is not None:
            teacher = teacher_argmax(to_target(test_cache.read(idx.numpy()), test_cache.num_classes,
                                               torch.device("cpu")))
        if logits.dim() == 3:  # per token: padding positions count nowhere
            keep = y >= 0
            logits, y = logits[keep], y[keep]
            teacher = teacher[keep] if teacher is not None else None
        mask = y >= 0
        if teacher is not None:
            agree += int((logits.argmax(1) == teacher).sum())
            rows += len(y)
        if mask.any():
            lg, yy = logits[mask], y[mask]
            hit = lg.argmax(1) == yy
            correct += int(hit.sum())
            labelled += len(yy)
            nll += float(F.cross_entropy(lg, yy, reduction="sum"))
            calib.add(lg.softmax(1), yy)
            if groups is not None and labels.dim() == 1:
                for g, h in zip(groups[1][idx.numpy()][mask.numpy()], hit.tolist()):
                    by_group.setdefault(int(g), []).append(int(h))
    out: dict = {"top1": correct / labelled if labelled else float("nan"),
                 "nll": nll / labelled if labelled else None}
    rel = calib.result() if labelled else None
    out |= {"ece": rel["ece"] if rel else None, "reliability": rel}
    if rows:
        out["agreement"] = agree / rows
    if ds.info.per_token and labelled:
        out["perplexity"] = math.exp(min(out["nll"], 50.0))
    if by_group:
        out["top1_by_group"] = {"name": groups[0],
                                "top1": {g: sum(h) / len(h) for g, h in sorted(by_group.items())},
                                "count": {g: len(h) for g, h in sorted(by_group.items())}}
    return out
