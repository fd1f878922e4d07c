"""(issue 7) Multi-view caches: how much of online KD under augmentation do V stored views recover?

A student (MLP 768-256-256-10, 16 px) trains under augmentation AUG for EPOCHS epochs.  Its soft targets come from:

1. none -- labels only (kdtrain --augment AUG);
2. an un-augmented 1-view cache (a plain dump, no augmentation): the student sees an augmented view but is told what
   the teacher said about the un-augmented image (the mismatch a plain cache imposes on augmented training);
3. V-view caches of augmented views, V in {1, 4, 16} (kdtrain --cache): each epoch the student sees one of the V
   stored views, rendered from the stored crop parameters, with the teacher's logits for exactly that view (V=1:
   one fixed random view per image, replayed every epoch);
4. online KD: the teacher runs in the loop on the very augmented input the student sees (a fresh view every
   epoch: EPOCHS distinct views per image).

The teacher is cnn_s trained with the same augmentation (one teacher per seed).  Every KD condition uses the same
objective (T, alpha) and the same float16 rounding of teacher logits, so 2-4 differ only in which view the target
belongs to and how many distinct views the student sees.  Conditions 2 and 4 are not expressible with kdtrain's
flags (with a cache its views come from the cache); they run kdtrain's recipe (run_train) with --augment and a
soft-target hook (kdcache.train.recipe.Targets) that answers for the augmented input the student sees.

Headline: the fraction of the (online - un-augmented cache) gap closed by the V-view caches, per seed and pooled.

    .venv/bin/python -m experiments.multiview        # ~3 min on 2 shared cores
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from experiments.common import (
    OnlineTeacher,
    cache_facts,
    md_table,
    mean_std,
    pm,
    savefig,
    scores,
    setup,
    test_logits,
)
from kdcache.io import Cache, open_cache
from kdcache.train.batches import Batch, to_target
from kdcache.config import LossConfig
from kdcache.train.losses import SoftTarget
from kdcache.train.recipe import Targets

AUG = "translate(0.15)+rrc(0.5,1)"
TEACHER = dict(student="cnn_s", image_size=16, epochs=15, augment=AUG)
STUDENT_ARGS = {"hidden": (256, 256)}
EPOCHS, BATCH, SIZE = 20, 64, 16
STUDENT = dict(student="mlp", student_args=STUDENT_ARGS, image_size=SIZE, epochs=EPOCHS, batch_size=BATCH)
KD = LossConfig("kd", alpha=0.1, temperature=4.0)
VS = (1, 4, 16)
SINGLE = "un-augmented 1-view cache"


def fp16(z: torch.Tensor) -> torch.Tensor:
    """Teacher logits rounded to float16, as a cache stores them."""
    return z.half().float()


class ViewZero(Targets):
    """The un-augmented cache's answer (its only view) whatever augmented view the student is shown."""

    def __init__(self, cache: Cache) -> None:
        super().__init__(1)
        self.cache = cache

    def __call__(self, batch: Batch, x: torch.Tensor) -> list[SoftTarget]:
        return [to_target(self.cache.read(batch.indices, 0), self.cache.num_classes, x.device)]


def main() -> None:
    e = setup("multiview", __doc__.splitlines()[0], default_seeds=5)
    conds = ["labels only", SINGLE, *[f"augmented {v}-view cache" for v in VS], "online KD"]
    res: dict[str, list[dict]] = {k: [] for k in conds}
    teacher_rows, facts = [], []
    for s in e.seeds:
        teacher_rows.append(e.train(f"teacher-{s}", seed=s, **TEACHER)["final"])
        teacher, _ = e.load(f"teacher-{s}")
        t_test, y = test_logits(teacher, SIZE)
        t_arg = t_test.argmax(1)

        def score(model: torch.nn.Module, y: torch.Tensor = y, t_arg: torch.Tensor = t_arg) -> dict:
            logits, _ = test_logits(model, SIZE)
            return {**scores(logits, y), "agreement": float((logits.argmax(1) == t_arg).float().mean())}

        single = e.dump(f"plain-{s}", f"teacher-{s}", "cnn_s", image_size=SIZE)
        multi = {v: e.dump(f"v{v}-{s}", f"teacher-{s}", "cnn_s", image_size=SIZE, views=v, augment=AUG, seed=s)
                 for v in VS}
        facts.append({"un-augmented, V=1": cache_facts(single),
                      **{f"{AUG}, V={v}": cache_facts(p) for v, p in multi.items()}})

        e.train(f"labels-{s}", seed=s, augment=AUG, **STUDENT)
        res["labels only"].append(score(e.load(f"labels-{s}")[0]))
        with open_cache(single) as c:
            e.train(f"single-{s}", seed=s, augment=AUG, objective=KD, targets=ViewZero(c), **STUDENT)
        res[SINGLE].append(score(e.load(f"single-{s}")[0]))
        for v in VS:
            e.train(f"v{v}-{s}", seed=s, caches=(multi[v],), objective=KD, **STUDENT)
            res[f"augmented {v}-view cache"].append(score(e.load(f"v{v}-{s}")[0]))
        e.train(f"online-{s}", seed=s, augment=AUG, objective=KD, targets=OnlineTeacher(teacher, fp16), **STUDENT)
        res["online KD"].append(score(e.load(f"online-{s}")[0]))
        e.log(f"seed {s}: " + ", ".join(f"{k} {100 * res[k][-1]['top1']:.1f}" for k in conds))

    e.data.update({"conditions": res, "teacher": teacher_rows, "caches": facts,
                   "config": {"augment": AUG, "teacher": TEACHER, "student": STUDENT, "kd": dataclasses.asdict(KD)}})

    # ---------------------------------------------------------------- gap closed
    def gap_rows(metric: str, sign: float) -> tuple[list, dict]:
        one = np.array([sign * r[metric] for r in res[SINGLE]])
        onl = np.array([sign * r[metric] for r in res["online KD"]])
        rows, out = [], {}
        for v in VS:
            mv = np.array([sign * r[metric] for r in res[f"augmented {v}-view cache"]])
            pooled = (mv.mean() - one.mean()) / (onl.mean() - one.mean())
            per_seed = (mv - one) / np.where(onl - one == 0, np.nan, onl - one)
            # bootstrap over seeds (paired: a resample keeps each seed's three runs together)
            rng = np.random.default_rng(0)
            boot = []
            for _ in range(2000):
                b = rng.integers(0, len(one), len(one))
                den = onl[b].mean() - one[b].mean()
                if den > 0:
                    boot.append((mv[b].mean() - one[b].mean()) / den)
            lo, hi = np.percentile(boot, [5, 95])
            out[v] = {"pooled": float(pooled), "per_seed": per_seed.tolist(), "bootstrap_90": [lo, hi]}
            rows.append([f"V = {v}", f"{100 * pooled:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]",
                         ", ".join("n/a" if np.isnan(p) else f"{100 * p:.0f}" for p in per_seed)])
        return rows, out

    g_top1_rows, g_top1 = gap_rows("top1", 1.0)
    g_nll_rows, g_nll = gap_rows("nll", -1.0)
    e.data["gap_closed"] = {"top1": g_top1, "nll": g_nll}

    t = teacher_rows
    rows = [["teacher cnn_s (labels + aug)", pm(r["test_top1"] for r in t), pm((r["test_nll"] for r in t), 1, 3),
             pm((r["test_ece"] for r in t), 1, 3), "—"]]
    rows += [[f"MLP: {k}", pm(r["top1"] for r in res[k]), pm((r["nll"] for r in res[k]), 1, 3),
              pm((r["ece"] for r in res[k]), 1, 3), pm(r["agreement"] for r in res[k])] for k in conds]
    e.table(f"MLP student trained under augmentation `{AUG}`, {EPOCHS} epochs, KD T={KD.temperature:g} "
            f"α={KD.alpha:g} (seeds 0–{len(e.seeds) - 1}; test split)",
            md_table(["model / soft targets", "top-1 %", "NLL", "ECE", "agrees with teacher %"], rows))
    e.table("Fraction of the gap between the un-augmented 1-view cache and online KD closed by augmented V-view "
            "caches: "
            "(V-view − un-augmented) / (online − un-augmented)",
            md_table(["cache", "top-1: pooled [90 % bootstrap]", "top-1: per seed %", "NLL: pooled [90 %]",
                      "NLL: per seed %"],
                     [[a[0], a[1], a[2], b[1], b[2]] for a, b in zip(g_top1_rows, g_nll_rows)], "lrlrl"))
    crow = [[k, pm(f[k]["teacher_top1"] for f in facts), pm((f[k]["mean_entropy"] for f in facts), 1, 3),
             f"{np.mean([f[k]['bytes_per_sample'] for f in facts]):.0f}"] for k in facts[0]]
    e.table("The caches: teacher top-1 % and mean entropy on the stored views; bytes per sample on disk",
            md_table(["cache", "teacher top-1 % on stored views", "mean entropy (nats)", "bytes/sample"], crow))
    _plot(res, conds)
    e.finish()


def _plot(res: dict, conds: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    xs = np.arange(len(conds))
    for ax, metric, scale, label in ((axes[0], "top1", 100, "test top-1 %"), (axes[1], "nll", 1, "test NLL")):
        ms = [mean_std(scale * r[metric] for r in res[k]) for k in conds]
        for x, k in zip(xs, conds):
            ax.scatter([x] * len(res[k]), [scale * r[metric] for r in res[k]], s=10, color="grey", zorder=3)
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], fmt="o-", color="tab:blue", capsize=4,
                    zorder=4)
        ticks = [c.replace(" cache", "\ncache").replace("un-augmented ", "plain\n").replace("augmented ", "aug.\n")
                 for c in conds]
        ax.set_xticks(xs, ticks,
                      fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("MLP under augmentation: soft targets from no teacher, a plain cache, 1 / 4 / 16 stored "
                 "augmented views, an online teacher",
                 fontsize=9)
    fig.tight_layout()
    savefig(fig, "multiview.png")


if __name__ == "__main__":
    main()
