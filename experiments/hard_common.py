"""What the experiments share on the `digits-hard` benchmark (kdcache.data.hard): models, test variants, paired
per-seed statistics with 90 % t-intervals.  Training goes through experiments.common.Exp (kdcache's run_train).

Hyperparameters are fixed here once, before any run on digits-hard, from the digits experiments' defaults (no
tuning on this benchmark's test split): KD T = 4, α = 0.1 (the label weight) for the CNN → MLP transfers, the
digits experiments' learning rates, epochs doubled for the larger canvas where a model is far from converged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from experiments.common import head_scores as common_head_scores
from experiments.common import paired_t, scores, test_logits
from kdcache.config import LossConfig

DATA = "digits-hard"
SIZE = 24
VARIANTS = {"test": "digits-hard", "translated": "digits-hard-shift", "smaller": "digits-hard-small",
            "larger": "digits-hard-large"}
CNN = dict(student="cnn_s", student_args={"width": 16}, image_size=SIZE, epochs=12, dataset=DATA)
# born_again, deit and civt (run after a probe on seed 0 showed the 12-epoch CNN at lr 1e-3 still underfit on its
# own training images: train loss 0.84, 83 % right on them; at lr 3e-3 train loss 0.27, 96 %): the same CNN at lr 3e-3
CNN_FIT = dict(CNN, lr=3e-3)
MLP = dict(student="mlp", student_args={"hidden": (256, 256)}, image_size=SIZE, epochs=30, dataset=DATA)
KD = LossConfig("kd", alpha=0.1, temperature=4.0)
# The augmentation of the settings that train under it, and how many views of it a cache stores for replay
AUG = "translate(0.1)+rrc(0.7,1)"
VIEWS = 8
# The CNN of those settings.  A probe on seed 0 under AUG showed 12 epochs leave it underfit (train loss 0.49 at
# epoch 12 of 36 and still falling; 0.24 at 36): under augmentation it trains 36 epochs
CNN_AUG = dict(CNN_FIT, epochs=36)


def cnn_for(views: int) -> dict:
    """The CNN of a setting that caches `views` views: trained under AUG to convergence, or without it (CNN_FIT)."""
    return CNN_AUG if views > 1 else CNN_FIT


def replay(views: int, seed: int) -> tuple[dict, dict]:
    """(training keywords, dump keywords) of a setting that caches `views` views: models from labels train under
    AUG and teachers are dumped over `views` views of it drawn with `seed`; nothing of either for 1 view."""
    if views == 1:
        return {}, {}
    return {"augment": AUG}, {"views": views, "augment": AUG, "seed": seed}


def views_text(views: int) -> str:
    """How a setting's models see the train images, for table titles."""
    return (f"under `{AUG}`, caches of {views} stored views of it per train image" if views > 1
            else "no augmentation, 1-view caches of the train images")
# DeiT's and CivT's student.  Probes on seed 0 (labels, no augmentation, 20 epochs, lr 1e-3, 2 jobs on the idle
# 2-core machine): patch 4 at 16 px (16 patches) 51 % on test in 50 s; patch 4 at 24 px (36 patches) 47 % in 118 s
VIT = dict(student="vit_nano", student_args={"patch_size": 4}, image_size=16, epochs=20, lr=1e-3, dataset=DATA)


def paired(a: Sequence[float], b: Sequence[float], scale: float = 100.0) -> dict:
    """Per-seed a - b: mean, 90 % t-interval, seeds with a > b, all times `scale`."""
    d = scale * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    m, lo, hi, wins = paired_t(d, np.zeros_like(d))
    return {"mean": m, "lo": lo, "hi": hi, "wins": wins, "n": len(d), "diffs": d.tolist()}


def fmt_paired(p: dict, digits: int = 1, unit: str = " pts") -> str:
    return (f"{p['mean']:+.{digits}f}{unit} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}] "
            f"({p['wins']}/{p['n']})")


def excludes_zero(p: dict) -> bool:
    return p["lo"] > 0 or p["hi"] < 0


def logits_on(model: torch.nn.Module, size: int, spec: str = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` on `spec`'s test split (identity views)."""
    return test_logits(model, size, spec)


def head_scores(model: torch.nn.Module, size: int, spec: str = DATA) -> dict:
    """experiments.common.head_scores (every head of a distillation-token model) on digits-hard by default."""
    return common_head_scores(model, size, spec)


def evaluate_variants(model: torch.nn.Module, size: int, teacher_logits: dict | None = None) -> tuple[dict, dict]:
    """Scores on the test split and its three shifted variants, plus agreement with `teacher_logits` (same keys).
    Returns (scores by variant, logits by variant)."""
    out, logits = {}, {}
    for name, spec in VARIANTS.items():
        lg, y = logits_on(model, size, spec)
        r = scores(lg, y)
        if teacher_logits is not None:
            t = teacher_logits[name]
            r["agree"] = float((lg.argmax(1) == t.argmax(1)).float().mean())
            r["kl_to_teacher"] = float(torch.nn.functional.kl_div(lg.log_softmax(1), t.log_softmax(1),
                                                                  log_target=True, reduction="batchmean"))
        out[name], logits[name] = r, lg
    return out, logits


def ensemble_scores(logit_list: Sequence[torch.Tensor], y: torch.Tensor) -> dict:
    p = torch.stack([lg.softmax(-1) for lg in logit_list]).mean(0)
    return scores(p.clamp_min(1e-12).log(), y)


def run_seeds(fn, e, seeds: Sequence[int], *args) -> list:
    """[fn(e, s, *args) for s in seeds], in KD_JOBS parallel forked processes (default: one per seed, at most 5),
    each with the parent's torch thread count.  Every run has its own seed and folder, so results do not depend
    on the number of processes; on a shared 2-core machine it only changes who gets the CPU."""
    import multiprocessing
    import os

    jobs = max(1, min(int(os.environ.get("KD_JOBS", "5")), len(seeds)))
    if jobs == 1:
        return [fn(e, s, *args) for s in seeds]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(fn, [(e, s, *args) for s in seeds])
