"""Evaluation: top-1, calibration (ECE), agreement with the teacher, on a held-out split."""

from __future__ import annotations

import numpy as np
import torch
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


def evaluate(model: torch.nn.Module, ds: SourceDataset, pre: ModelInput, device: torch.device,
             test_cache: Cache | None = None, batch_size: int = 512) -> dict:
    """top1, ece, nll and (with a test-split cache) agreement with the teacher's argmax."""
    logits = predict(model, ds, pre, device, batch_size)
    y = torch.from_numpy(ds.labels)
    probs = logits.softmax(-1)
    labelled = y >= 0
    out = {
        "top1": metrics.accuracy(logits, y),
        "ece": metrics.ece(probs[labelled], y[labelled]) if labelled.any() else None,
        "nll": float(torch.nn.functional.cross_entropy(logits[labelled], y[labelled])) if labelled.any() else None,
        "reliability": metrics.reliability(probs[labelled], y[labelled]) if labelled.any() else None,
    }
    if test_cache is not None:
        t = to_target(test_cache.read(np.arange(len(ds))), test_cache.num_classes, torch.device("cpu"))
        out["agreement"] = metrics.agreement(logits, teacher_argmax(t))
    return out
