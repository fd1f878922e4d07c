"""(c) Born-Again Networks (Furlanello et al. 2018) in miniature: same-architecture generations, CWTM and DKPP.

Student and teacher are the same MLP (768-256-256-10, 16 px).  BAN trains its students on augmented images with
the teacher run on the same inputs; the offline analogue used here is a multi-view cache (multiview.py shows that
8-16 stored views recover online KD on this data):

    gen 0: labels + augmentation AUG            -> dump VIEWS views of AUG
    gen k: KD from gen k-1's cache (T=1, alpha=0: the teacher's distribution only, as in BAN) -> dump -> ...

for 3 born-again generations, plus two controls distilled from gen 0's cache that test what the dark knowledge
is (kdtrain --loss cwtm / dkpp):

* CWTM: labels only, each sample's cross-entropy weighted by the teacher's confidence (its max probability);
* DKPP: the teacher's distribution with its non-argmax probabilities permuted at random per sample.

Also the BAN ensemble: the mean softmax of generations 1-3.  Generation g of seed s trains with seed 100 g + s.

    .venv/bin/python -m experiments.born_again      # ~2 min on 2 shared cores (5 seeds)
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.common import (
    cache_facts,
    md_table,
    mean_std,
    paired_diff,
    pm,
    savefig,
    scores,
    setup,
    test_logits,
)
from kdcache.config import LossConfig as Objective

AUG = "translate(0.15)+rrc(0.5,1)"
VIEWS = 8
MLP = dict(student="mlp", student_args={"hidden": (256, 256)}, image_size=16, epochs=20)
BAN = Objective("kd", alpha=0.0, temperature=1.0)
GENS = 3


def main() -> None:
    e = setup("born_again", __doc__.splitlines()[0], default_seeds=5, settings=["digits", "hard", "hard-1view"])
    if e.setting.startswith("hard"):
        return main_hard(e)
    names = ["gen 0 (labels + aug)", *[f"gen {g} (BAN, KD from gen {g - 1})" for g in range(1, GENS + 1)],
             f"BAN ensemble (gens 1–{GENS})", "CWTM from gen 0", "DKPP from gen 0"]
    res: dict[str, list[dict]] = {n: [] for n in names}
    facts: list[dict] = []
    for s in e.seeds:
        e.train(f"gen0-{s}", seed=s, augment=AUG, **MLP)
        logits = [test_logits(*e.load(f"gen0-{s}"))]
        cache = e.dump(f"gen0-{s}", f"gen0-{s}", "mlp", image_size=16, views=VIEWS, augment=AUG, seed=s)
        gen0_cache, f = cache, {"gen 0": cache_facts(cache)}
        for g in range(1, GENS + 1):
            e.train(f"gen{g}-{s}", seed=100 * g + s, caches=(cache,), objective=BAN, **MLP)
            logits.append(test_logits(*e.load(f"gen{g}-{s}")))
            if g < GENS:
                cache = e.dump(f"gen{g}-{s}", f"gen{g}-{s}", "mlp", image_size=16, views=VIEWS, augment=AUG, seed=s)
                f[f"gen {g}"] = cache_facts(cache)
        facts.append(f)
        for g, (lg, y) in enumerate(logits):
            res[names[g]].append(scores(lg, y))
        y = logits[0][1]
        ens = torch.stack([lg.softmax(-1) for lg, _ in logits[1:]]).mean(0)
        res[names[GENS + 1]].append(scores(ens.clamp_min(1e-12).log(), y))
        for name, loss in ((names[GENS + 2], "cwtm"), (names[GENS + 3], "dkpp")):
            e.train(f"{loss}-{s}", seed=100 + s, caches=(gen0_cache,), objective=Objective(loss), **MLP)
            res[name].append(scores(*test_logits(*e.load(f"{loss}-{s}"))))
        e.log(f"seed {s}: " + ", ".join(f"{n.split(' (')[0]} {100 * res[n][-1]['top1']:.1f}" for n in names))
    e.data.update({"results": res, "caches": facts,
                   "config": {"augment": AUG, "views": VIEWS, "mlp": MLP, "ban": vars(BAN), "gens": GENS}})

    base = [r["top1"] for r in res[names[0]]]
    base_nll = [r["nll"] for r in res[names[0]]]
    rows = []
    for n in names:
        d = paired_diff([r["top1"] for r in res[n]], base)
        dn = paired_diff(base_nll, [r["nll"] for r in res[n]])
        rows.append([n, pm(r["top1"] for r in res[n]), pm((r["nll"] for r in res[n]), 1, 3),
                     pm((r["ece"] for r in res[n]), 1, 3),
                     "—" if n == names[0]
                     else f"{100 * d[0]:+.2f} ({d[2]}/{len(base)}); NLL better {dn[2]}/{len(base)}"])
    e.table(f"MLP generations under augmentation `{AUG}` with {VIEWS}-view caches (seeds 0–{len(e.seeds) - 1}; "
            "test split)",
            md_table(["model", "top-1 %", "NLL", "ECE", "top-1 vs gen 0, pts (seeds better)"], rows, "lrrrl"))
    crow = [[k, pm(f[k]["teacher_top1"] for f in facts), pm((f[k]["mean_entropy"] for f in facts), 1, 3)]
            for k in facts[0]]
    e.table("What each generation's cache holds: teacher top-1 % and mean entropy (nats) on the stored views",
            md_table(["teacher", "top-1 % on its stored train views", "mean entropy"], crow))
    _plot(res, names)
    e.finish()


def _plot(res: dict, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    xs = np.arange(len(names))
    labels = [n.split(" (")[0].replace("BAN ensemble", "ensemble") for n in names]
    for ax, metric, scale, lab in ((axes[0], "top1", 100, "test top-1 %"), (axes[1], "nll", 1, "test NLL")):
        for x, n in zip(xs, names):
            ax.scatter([x] * len(res[n]), [scale * r[metric] for r in res[n]], s=10, color="grey", zorder=3)
        ms = [mean_std(scale * r[metric] for r in res[n]) for n in names]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], fmt="o", color="tab:blue", capsize=4, zorder=4)
        ax.set_xticks(xs, labels, fontsize=8, rotation=20)
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, "born_again.png")


def _hard_seed(e, s: int, n_views: int) -> tuple[dict, dict]:
    """One seed of a hard setting: gen 0..GENS, the BAN ensemble, CWTM and DKPP; (scores by row, cache facts)."""
    from experiments.hard_common import cnn_for, ensemble_scores, logits_on, replay

    names = _hard_names()
    out: dict[str, dict] = {}
    CNN = cnn_for(n_views)
    aug, views = replay(n_views, seed=s)
    e.train(f"gen0-{s}", seed=s, **aug, **CNN)
    lg, y = logits_on(*e.load(f"gen0-{s}"))
    logits = [lg]
    cache = e.dump(f"gen0-{s}", f"gen0-{s}", "cnn_s", image_size=CNN["image_size"], dataset=CNN["dataset"], **views)
    gen0_cache, f = cache, {"gen 0": cache_facts(cache)}
    for g in range(1, GENS + 1):
        e.train(f"gen{g}-{s}", seed=100 * g + s, caches=(cache,), objective=BAN, **CNN)
        logits.append(logits_on(*e.load(f"gen{g}-{s}"))[0])
        if g < GENS:
            cache = e.dump(f"gen{g}-{s}", f"gen{g}-{s}", "cnn_s", image_size=CNN["image_size"],
                           dataset=CNN["dataset"], **views)
            f[f"gen {g}"] = cache_facts(cache)
    for g, lg in enumerate(logits):
        out[names[g]] = scores(lg, y)
    out[names[GENS + 1]] = ensemble_scores(logits[1:], y)
    for name, loss in ((names[GENS + 2], "cwtm"), (names[GENS + 3], "dkpp")):
        e.train(f"{loss}-{s}", seed=100 + s, caches=(gen0_cache,), objective=Objective(loss), **CNN)
        out[name] = scores(*logits_on(*e.load(f"{loss}-{s}")))
    e.log(f"seed {s}: " + ", ".join(f"{n.split(' (')[0]} {100 * out[n]['top1']:.1f}" for n in names))
    return out, f


def _hard_names() -> list[str]:
    return ["gen 0 (labels)", *[f"gen {g} (BAN, KD from gen {g - 1})" for g in range(1, GENS + 1)],
            f"BAN ensemble (gens 1–{GENS})", "CWTM from gen 0", "DKPP from gen 0"]


def main_hard(e) -> None:
    """The hard settings: born-again CNNs on digits-hard (kdcache.data.hard).

    `--setting hard`: every generation is cnn_s (width 16, 24 px, 36 epochs, lr 3e-3: hard_common.CNN_AUG).  Gen 0
    learns from labels under AUG; gen k replays gen k-1's cache of VIEWS stored views of AUG of the train split
    (seed s) with BAN's objective (the teacher's distribution alone, T = 1, α = 0); CWTM and DKPP distil gen 0's
    cache.  `--setting hard-1view`: no augmentation, 12 epochs (CNN_FIT), 1-view caches of the train images.  The
    BAN ensemble averages the softmax of gens 1-3.  Generation g of seed s trains with seed 100 g + s; CWTM/DKPP
    with 100 + s.  Paired by seed against gen 0, 90 % t-intervals."""
    from experiments.hard_common import AUG, VIEWS, cnn_for, fmt_paired, paired, run_seeds, views_text

    names = _hard_names()
    views = 1 if e.setting == "hard-1view" else VIEWS
    CNN = cnn_for(views)
    per_seed = run_seeds(_hard_seed, e, e.seeds, views)
    res = {n: [out[n] for out, _ in per_seed] for n in names}
    facts = [f for _, f in per_seed]
    base = [r["top1"] for r in res[names[0]]]
    base_nll = [r["nll"] for r in res[names[0]]]
    cmp = {n: {"top1": paired([r["top1"] for r in res[n]], base),
               "nll": paired(base_nll, [r["nll"] for r in res[n]], 1)} for n in names[1:]}
    e.data.update({"results": res, "caches": facts, "vs_gen0": cmp,
                   "config": {"cnn": CNN, "augment": AUG if views > 1 else None, "views": views, "ban": vars(BAN),
                              "gens": GENS}})
    rows = [[n, pm(r["top1"] for r in res[n]), pm((r["nll"] for r in res[n]), 1, 3),
             pm((r["ece"] for r in res[n]), 1, 3), "—" if n == names[0] else fmt_paired(cmp[n]["top1"]),
             "—" if n == names[0] else fmt_paired(cmp[n]["nll"], 3, "")] for n in names]
    e.table(f"digits-hard: cnn_s (width 16, {CNN['epochs']} epochs) generations, {views_text(views)} (test split, "
            f"1080 images; seeds 0–{len(e.seeds) - 1}); paired vs gen 0: mean [90 % t-interval] (seeds better)",
            md_table(["model", "top-1 %", "NLL", "ECE", "Δ top-1 vs gen 0", "NLL reduction vs gen 0"], rows,
                     "lrrrll"))
    crow = [[k, pm(f[k]["teacher_top1"] for f in facts), pm((f[k]["mean_entropy"] for f in facts), 1, 3)]
            for k in facts[0]]
    e.table("digits-hard: what each generation's cache holds (stored views of the train split)",
            md_table(["teacher", "top-1 % on its stored train views", "mean entropy (nats)"], crow))
    e.finish()


if __name__ == "__main__":
    main()
