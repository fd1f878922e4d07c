"""(e) DeiT (Touvron et al. 2021) in miniature: hard vs soft distillation, with and without a distillation token.

Student vit_nano (dim 96, depth 4, patch 4 at 16 px: 16 patches), teacher cnn_s (16 px), both trained under the
augmentation AUG; the teacher's logits on VIEWS stored views of AUG replay what DeiT computes online.  (With a
plain, un-augmented cache the teacher is 100 % right on every training image, so "hard" distillation would be
exactly label training; the augmented views are where its argmax and the label part ways -- counted below.)

Objectives (kdtrain --loss / --distill-tokens):

* no teacher:           CE(labels), augmentation AUG
* soft:                 (1 - λ) CE(cls, y) + λ τ² KL_τ(teacher ‖ cls), DeiT's λ = 0.1, τ = 3
* hard:                 ½ CE(cls, y) + ½ CE(cls, teacher argmax)
* soft + dist. token:   (1 - λ) CE(cls, y) + λ τ² KL_τ(teacher ‖ dist)
* hard + dist. token:   ½ CE(cls, y) + ½ CE(dist, teacher argmax)  -- DeiT's recipe

Token models are scored from the class head, the distillation head, and their mean (kdtrain --head-mode mean;
DeiT's inference).  The budget allows EPOCHS epochs: the ViT is still improving when it stops, so these numbers
measure how fast each target teaches as much as where it ends.  One teacher (seed 0); students over seeds.

    .venv/bin/python -m experiments.deit           # ~4 min on 2 shared cores (3 seeds)
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.common import cache_facts, head_scores, md_table, mean_std, pm, savefig, setup
from kdcache.cache import open_cache
from kdcache.train.objective import Objective

AUG = "translate(0.1)+rrc(0.7,1)"
VIEWS = 8
TEACHER = dict(student="cnn_s", image_size=16, epochs=15, augment=AUG)
VIT = dict(student="vit_nano", student_args={"patch_size": 4}, image_size=16, epochs=10, lr=2e-3)
LAMBDA, TAU = 0.1, 3.0
CONDS = {
    "no teacher (labels + aug)": dict(augment=AUG),
    "soft": dict(objective=Objective("kd", 1 - LAMBDA, TAU)),
    "hard": dict(objective=Objective("hard")),
    "soft + dist. token": dict(objective=Objective("kd", 1 - LAMBDA, TAU), distill_tokens=True),
    "hard + dist. token": dict(objective=Objective("hard"), distill_tokens=True),
}


def _hard_vs_label(path: str) -> float:
    """Fraction of stored (sample, view) pairs whose teacher argmax differs from the label."""
    with open_cache(path) as c:
        idx = np.arange(c.n)
        diff = [(c.read(idx, v).values.float().argmax(1).numpy() != c.labels).mean() for v in range(c.n_views)]
    return float(np.mean(diff))


def main() -> None:
    e = setup("deit", __doc__.splitlines()[0])
    teacher = e.train("teacher", seed=0, **TEACHER)["final"]
    cache = e.dump("teacher", "teacher", "cnn_s", image_size=16, views=VIEWS, augment=AUG, seed=0)
    facts = cache_facts(cache) | {"argmax_differs_from_label": _hard_vs_label(cache)}
    res: dict[str, list[dict]] = {k: [] for k in CONDS}
    for s in e.seeds:
        for name, kw in CONDS.items():
            caches = () if "augment" in kw else (cache,)
            run = f"{name.replace(' ', '_').replace('.', '').replace('+', 'plus')}-{s}"
            e.train(run, seed=s, caches=caches, **VIT, **kw)
            res[name].append(head_scores(*e.load(run)))
        e.log(f"seed {s}: " + ", ".join(f"{k} {100 * v[-1]['cls']['top1']:.1f}" for k, v in res.items()))
    e.data.update({"teacher": teacher, "cache": facts, "students": res,
                   "config": {"augment": AUG, "views": VIEWS, "teacher": TEACHER, "vit": VIT, "lambda": LAMBDA,
                              "tau": TAU}})

    def cell(name: str, head: str, metric: str = "top1", scale: float = 100, digits: int = 1) -> str:
        vals = [r[head][metric] for r in res[name] if head in r]
        return pm(vals, scale, digits) if vals else "—"

    rows = [[n, cell(n, "cls"), cell(n, "dist1"), cell(n, "mean"), cell(n, "cls", "nll", 1, 3)] for n in CONDS]
    e.table(f"vit_nano, {VIT['epochs']} epochs under `{AUG}`; teacher cnn_s {100 * teacher['test_top1']:.1f} % "
            f"(its argmax differs from the label on {100 * facts['argmax_differs_from_label']:.1f} % of the "
            f"{VIEWS} stored views per image). Test top-1 % (seeds 0–{len(e.seeds) - 1})",
            md_table(["objective", "class head", "distillation head", "mean of heads", "class-head NLL"], rows))
    _plot(res)
    e.finish()


def _plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = list(res)
    for j, (head, color) in enumerate((("cls", "tab:blue"), ("dist1", "tab:orange"), ("mean", "tab:green"))):
        xs, ms, ss = [], [], []
        for i, n in enumerate(names):
            vals = [100 * r[head]["top1"] for r in res[n] if head in r]
            if vals:
                m, s = mean_std(vals)
                xs.append(i + (j - 1) * 0.2)
                ms.append(m)
                ss.append(s)
        ax.bar(xs, ms, 0.2, yerr=ss, capsize=3, color=color, label={"cls": "class head", "dist1": "distillation head",
                                                                    "mean": "mean of heads"}[head])
    lo = min(100 * r["cls"]["top1"] for v in res.values() for r in v)
    ax.set_ylim(max(0, lo - 15), 100)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(").replace(" + ", "\n+ ") for n in names], fontsize=8)
    ax.set_ylabel("test top-1 %")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    savefig(fig, "deit.png")


if __name__ == "__main__":
    main()
