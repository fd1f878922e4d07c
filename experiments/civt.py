"""(d) CivT co-advising (Ren et al. 2022) in miniature: a ViT taught by a CNN and an involution network at once.

Student vit_nano (patch 4 at 16 px, EPOCHS epochs, lr 2e-3) with one distillation token per teacher; teachers
cnn_s (convolution, 16 px) and rednet_s (involution, trained at the digits' native 8 px, where it is ~3x cheaper
than at 16 px).  CivT's Eq. 5 with λ0 = λ1 = λ2 = 1 as in the paper and τ1 = τ2 = TAU (the reference gives no τ;
DeiT's τ = 3 is used, since at τ = 1 targets from teachers that are ~100 % right on their training images are almost
one-hot):

    λ0 CE(cls, y) + Σ_i λi τi² KL_τi(teacher i ‖ distillation token i)

(kdtrain --cache cnn.zarr --cache inv.zarr --distill-tokens --alpha 1 --lambdas 1,1 --taus 3,3).  Compared with the
same student and either teacher alone (one token) and with no teacher.  Scored from the class head and from the
mean of all heads.  One pair of teachers (seed 0); students over seeds.  Settings:

* plain (default): no augmentation; 1-view caches of the train images;
* augmented (--setting augmented): everyone trains under AUG and both teachers are dumped over the same VIEWS
  stored views (same augment and seed, so the two caches describe the same crops).  Ten ViT epochs under
  augmentation is the underfit regime (see deit.py).

    .venv/bin/python -m experiments.civt                        # ~3.5 min on 2 shared cores (3 seeds)
    .venv/bin/python -m experiments.civt --setting augmented    # ~4 min
"""

from __future__ import annotations

import numpy as np

from experiments.common import (
    cache_facts,
    head_scores,
    md_table,
    mean_std,
    pm,
    savefig,
    setup,
)
from kdcache.io import open_cache
from kdcache.config import LossConfig as Objective

AUG = "translate(0.1)+rrc(0.7,1)"
VIEWS = 8
SETTINGS = {
    "plain": dict(cnn=dict(student="cnn_s", image_size=16, epochs=10),
                  inv=dict(student="rednet_s", image_size=8, epochs=12), augment=None),
    "augmented": dict(cnn=dict(student="cnn_s", image_size=16, epochs=15, augment=AUG),
                      inv=dict(student="rednet_s", image_size=8, epochs=12, augment=AUG), augment=AUG),
}
VIT = dict(student="vit_nano", student_args={"patch_size": 4}, image_size=16, epochs=10, lr=2e-3)
TAU = 3.0


def _teacher_conditions(cnn: str, inv: str) -> dict[str, dict]:
    """The distilled ViTs: one token per teacher, loss λ0·CE + Σ λi·τi²·KLi with λ = 1 and τ = TAU."""
    return {
        "CNN teacher (1 token)": dict(caches=(cnn,), distill_tokens=True,
                                      objective=Objective("kd", 1.0, TAU, (1.0,), (TAU,))),
        "involution teacher (1 token)": dict(caches=(inv,), distill_tokens=True,
                                             objective=Objective("kd", 1.0, TAU, (1.0,), (TAU,))),
        "CNN + involution (2 tokens, CivT)": dict(caches=(cnn, inv), distill_tokens=True,
                                                  objective=Objective("kd", 1.0, TAU, (1.0, 1.0), (TAU, TAU))),
    }


def _disagreement(a: str, b: str) -> float:
    """Fraction of stored (sample, view) pairs on which the two teachers' argmax differ."""
    with open_cache(a) as ca, open_cache(b) as cb:
        idx = np.arange(ca.n)
        d = [(ca.read(idx, v).values.float().argmax(1) != cb.read(idx, v).values.float().argmax(1)).float().mean()
             for v in range(ca.n_views)]
    return float(np.mean(d))


def main() -> None:
    e = setup("civt", __doc__.splitlines()[0], settings=[*SETTINGS, "hard"])
    if e.setting == "hard":
        return main_hard(e)
    st = SETTINGS[e.setting]
    aug = st["augment"]
    teachers = {"cnn_s": e.train("cnn", seed=0, **st["cnn"])["final"],
                "rednet_s": e.train("inv", seed=0, **st["inv"])["final"]}
    e.log("teachers: " + ", ".join(f"{k} {100 * v['test_top1']:.1f}" for k, v in teachers.items()))
    dump_kw = dict(views=VIEWS, augment=aug, seed=0) if aug else {}
    cnn = e.dump("cnn", "cnn", "cnn_s", image_size=16, **dump_kw)
    inv = e.dump("inv", "inv", "rednet_s", image_size=8, **dump_kw)
    facts = {"cnn_s": cache_facts(cnn), "rednet_s": cache_facts(inv), "disagreement": _disagreement(cnn, inv)}
    conds = {"no teacher (labels" + (" + aug)" if aug else ")"): dict(augment=aug) if aug else {},
             **_teacher_conditions(cnn, inv)}
    res: dict[str, list[dict]] = {k: [] for k in conds}
    for s in e.seeds:
        for i, (name, kw) in enumerate(conds.items()):
            e.train(f"c{i}-{s}", seed=s, **VIT, **kw)
            res[name].append(head_scores(*e.load(f"c{i}-{s}")))
        e.log(f"seed {s}: " + ", ".join(f"{k} {100 * v[-1]['cls']['top1']:.1f}" for k, v in res.items()))
    e.data.update({"teachers": teachers, "caches": facts, "students": res,
                   "config": {"setting": e.setting, "augment": aug, "views": VIEWS if aug else 1, "cnn": st["cnn"],
                              "inv": st["inv"], "vit": VIT, "tau": TAU}})

    def cell(name: str, head: str, metric: str = "top1", scale: float = 100, digits: int = 1) -> str:
        vals = [r[head][metric] for r in res[name] if head in r]
        return pm(vals, scale, digits) if vals else "—"

    trows = [[k, f"{100 * v['test_top1']:.1f}", f"{100 * facts[k]['teacher_top1']:.1f}",
              f"{facts[k]['mean_entropy']:.3f}"] for k, v in teachers.items()]
    where = f"under `{aug}`, {VIEWS} stored views per train image" if aug else "no augmentation, 1-view caches"
    e.table(f"Teachers (seed 0), {where}; their argmax differ on {100 * facts['disagreement']:.1f} % of the "
            "cached train views",
            md_table(["teacher", "test top-1 %", "top-1 % on its stored train views", "mean entropy (nats)"], trows))
    rows = [[n, cell(n, "cls"), cell(n, "mean"), cell(n, "dist1"), cell(n, "dist2"), cell(n, "cls", "nll", 1, 3)]
            for n in conds]
    e.table(f"vit_nano students, {VIT['epochs']} epochs: test top-1 % (seeds 0–{len(e.seeds) - 1})",
            md_table(["teachers", "class head", "mean of heads", "token 1 head", "token 2 head", "class-head NLL"],
                     rows))
    _plot(res, e.name)
    e.finish()


def _plot(res: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(res)
    for j, (head, color, label) in enumerate((("cls", "tab:blue", "class head"),
                                              ("mean", "tab:green", "mean of heads"))):
        ms = [mean_std(100 * r[head]["top1"] for r in res[n]) if head in res[n][0] else (np.nan, 0) for n in names]
        ax.bar(np.arange(len(names)) + (j - 0.5) * 0.35, [m for m, _ in ms], 0.35, yerr=[s for _, s in ms],
               capsize=3, color=color, label=label)
    lo = min(100 * r["cls"]["top1"] for v in res.values() for r in v)
    ax.set_ylim(max(0, lo - 15), 100)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("test top-1 %")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    savefig(fig, f"{name}.png")


HARD_INV = dict(student="rednet_s", image_size=16, epochs=12, lr=3e-3, dataset="digits-hard")


def _hard_task(e, task: tuple, cnn: dict, conds: dict) -> tuple:
    """One run of `--setting hard`: ("teacher", 0 | 1) trains cnn_s or rednet_s (seed 0) under AUG and dumps it over
    VIEWS views of it (seed 0 for both, so the two caches hold the same crops) -> (final metrics, cache path);
    (i, s) trains student condition i of `conds` with seed s -> its scores by head."""
    from experiments.hard_common import AUG, VIEWS, VIT, head_scores

    if task[0] == "teacher":
        name, cfg = ("cnn", cnn) if task[1] == 0 else ("inv", HARD_INV)
        final = e.train(name, seed=0, augment=AUG, **cfg)["final"]
        return final, e.dump(name, name, cfg["student"], image_size=cfg["image_size"], dataset=cfg["dataset"],
                             views=VIEWS, augment=AUG, seed=0)
    i, s = task
    name, kw = list(conds.items())[i]
    e.train(f"c{i}-{s}", seed=s, **VIT, **kw)
    r = head_scores(*e.load(f"c{i}-{s}"))
    e.log(f"seed {s}, {name}: {100 * r['cls']['top1']:.1f}")
    return r


def main_hard(e) -> None:
    """`--setting hard` (5 seeds by default): CivT co-advising on digits-hard (kdcache.data.hard).

    Teachers (seed 0, labels + AUG, lr 3e-3): cnn_s (hard_common.CNN_AUG: width 16, 24 px, 36 epochs) and rednet_s
    (involution, HARD_INV), each dumped over the same VIEWS stored views of AUG.  Students vit_nano
    (hard_common.VIT: patch 4 at 16 px, 20 epochs, lr 1e-3) replay those views, with one distillation token per
    teacher and CivT's Eq. 5 with λ0 = λi = 1, τ = 3 as in the digits setting; the no-teacher ViT trains under AUG.
    Paired by seed, 90 % t-intervals."""
    from experiments.hard_common import AUG, CNN_AUG as CNN, VIEWS, VIT, fmt_paired, paired, run_seeds

    e.n_seeds = max(e.n_seeds, 5) if "--seeds" not in " ".join(e.argv) else e.n_seeds
    # the two teachers and the students without one run together, then the distilled students (so that no core
    # idles while the involution teacher trains)
    base = {"no teacher (labels + aug)": dict(augment=AUG)}
    first = run_seeds(_hard_task, e, [("teacher", 0), ("teacher", 1), *[(0, s) for s in e.seeds]], CNN, base)
    (cnn_r, cnn), (inv_r, inv) = first[:2]
    teachers = {"cnn_s": cnn_r, "rednet_s": inv_r}
    e.log("teachers: " + ", ".join(f"{k} {100 * v['test_top1']:.1f}" for k, v in teachers.items()))
    facts = {"cnn_s": cache_facts(cnn), "rednet_s": cache_facts(inv), "disagreement": _disagreement(cnn, inv)}
    conds = {**base, **_teacher_conditions(cnn, inv)}
    tasks = [(i, s) for s in e.seeds for i in range(1, len(conds))]
    rest = dict(zip(tasks, run_seeds(_hard_task, e, tasks, CNN, conds)))
    res = {name: [first[2 + k] if i == 0 else rest[(i, s)] for k, s in enumerate(e.seeds)]
           for i, name in enumerate(conds)}
    names = list(conds)
    top = lambda n, h="cls": [r[h]["top1"] for r in res[n]]  # noqa: E731
    cmp = {}
    for h in ("cls", "mean"):
        for other in names[:3]:
            oh = "cls" if other == names[0] else h
            cmp[f"CivT − {other.split(' (')[0]} ({'class head' if h == 'cls' else 'mean of heads'})"] = \
                paired(top(names[3], h), top(other, oh))
    e.data.update({"teachers": teachers, "caches": facts, "students": res, "paired": cmp,
                   "config": {"setting": "hard", "augment": AUG, "views": VIEWS, "cnn": CNN, "inv": HARD_INV,
                              "vit": VIT, "tau": TAU}})

    def cell(name: str, head: str, metric: str = "top1", scale: float = 100, digits: int = 1) -> str:
        vals = [r[head][metric] for r in res[name] if head in r]
        return pm(vals, scale, digits) if vals else "—"

    trows = [[k, f"{100 * v['test_top1']:.1f}", f"{100 * facts[k]['teacher_top1']:.1f}",
              f"{facts[k]['mean_entropy']:.3f}"] for k, v in teachers.items()]
    e.table(f"digits-hard teachers (seed 0, trained under `{AUG}`), caches of {VIEWS} stored views of it per train "
            f"image; their argmax differ on {100 * facts['disagreement']:.1f} % of the stored views",
            md_table(["teacher", "test top-1 %", "top-1 % on its stored train views", "mean entropy (nats)"], trows))
    rows = [[n, cell(n, "cls"), cell(n, "mean"), cell(n, "dist1"), cell(n, "dist2"), cell(n, "cls", "nll", 1, 3)]
            for n in conds]
    e.table(f"digits-hard: vit_nano (patch {VIT['student_args']['patch_size']}, {VIT['image_size']} px) students, "
            f"{VIT['epochs']} epochs: test top-1 % (1080 "
            f"images; seeds 0–{len(e.seeds) - 1})",
            md_table(["teachers", "class head", "mean of heads", "token 1 head", "token 2 head", "class-head NLL"],
                     rows))
    e.table("digits-hard: co-advising vs one teacher, paired by seed, top-1 pts: mean [90 % t-interval] (seeds "
            "where CivT is better)", md_table(["comparison", "Δ top-1"], [[k, fmt_paired(v)] for k, v in cmp.items()],
                                              "ll"))
    e.finish()


if __name__ == "__main__":
    main()
