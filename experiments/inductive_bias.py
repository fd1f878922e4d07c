"""(b) Abnar et al. 2020 in miniature: does distillation carry a CNN's inductive bias into an MLP?

Teacher cnn_s and student MLP (768-256-256-10), both at 16 px, trained on the plain (centred) digits train split.
Evaluated on the test split rendered four ways with fixed views (kdcache.data.views): as is, translated by
0.15 of the side (up, down, left, right; the mean of the four is reported), scaled to 0.7 (zoom out) and to
1.3 (zoom in).  Top-1 and ECE (15 bins).

Rows, each over seeds 0..N-1 (seed s trains teacher s, dumps it, and trains the students with seed s):

* CNN teacher (labels)
* MLP from scratch (labels)
* MLP distilled from the teacher's cache of the centred train images (the paper's setting)
* beyond the paper, to separate "the CNN's answers on shifted images" from "seeing shifted images":
  MLP from labels with augmentation AUG, and MLP distilled from an 8-view cache of the same teacher whose
  views are drawn from AUG (the teacher never trained on such views; its answers there are its bias at work).

    .venv/bin/python -m experiments.inductive_bias      # ~1.5 min on 2 shared cores (5 seeds)
"""

from __future__ import annotations

import numpy as np

from experiments.common import (
    cache_facts,
    md_table,
    mean_std,
    pm,
    savefig,
    scores,
    setup,
    test_logits,
)
from kdcache.config import LossConfig as Objective

TEACHER = dict(student="cnn_s", image_size=16, epochs=10)
STUDENT = dict(student="mlp", student_args={"hidden": (256, 256)}, image_size=16, epochs=20)
KD = Objective("kd", alpha=0.1, temperature=4.0)
AUG = "translate(0.15)+rrc(0.6,1)"
VIEWS = 8
SHIFT = 0.15
N_TEST = 360


def _view(y0: float, x0: float, side: float) -> np.ndarray:
    return np.tile(np.array([y0, x0, side, side, 0.0], dtype=np.float32), (N_TEST, 1))


def _scaled(s: float) -> np.ndarray:
    """Content scaled by s about the centre: a centred box of side 1/s."""
    side = 1.0 / s
    return _view((1 - side) / 2, (1 - side) / 2, side)


TESTS = {
    "test": [_view(0, 0, 1)],
    "translated ±0.15": [_view(SHIFT, 0, 1), _view(-SHIFT, 0, 1), _view(0, SHIFT, 1), _view(0, -SHIFT, 1)],
    "scaled 0.7": [_scaled(0.7)],
    "scaled 1.3": [_scaled(1.3)],
}


def evaluate(e, run: str) -> dict:
    model, size = e.load(run)
    out = {}
    for name, views in TESTS.items():
        per = [scores(*test_logits(model, size, views=v)) for v in views]
        out[name] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    return out


def main() -> None:
    e = setup("inductive_bias", __doc__.splitlines()[0], default_seeds=5, settings=["digits", "hard"])
    if e.setting == "hard":
        return main_hard(e)
    rows = {"CNN teacher (labels)": [], "MLP from scratch (labels)": [], "MLP KD, centred cache (paper)": [],
            f"MLP labels + aug {AUG}": [], f"MLP KD, {VIEWS}-view cache of aug": []}
    names = list(rows)
    facts = []
    for s in e.seeds:
        e.train(f"teacher-{s}", seed=s, **TEACHER)
        rows[names[0]].append(evaluate(e, f"teacher-{s}"))
        plain = e.dump(f"plain-{s}", f"teacher-{s}", "cnn_s", image_size=16)
        multi = e.dump(f"views-{s}", f"teacher-{s}", "cnn_s", image_size=16, views=VIEWS, augment=AUG, seed=s)
        facts.append({"plain": cache_facts(plain), "multi": cache_facts(multi)})
        e.train(f"scratch-{s}", seed=s, **STUDENT)
        rows[names[1]].append(evaluate(e, f"scratch-{s}"))
        e.train(f"kd-{s}", seed=s, caches=(plain,), objective=KD, **STUDENT)
        rows[names[2]].append(evaluate(e, f"kd-{s}"))
        e.train(f"aug-{s}", seed=s, augment=AUG, **STUDENT)
        rows[names[3]].append(evaluate(e, f"aug-{s}"))
        e.train(f"kdviews-{s}", seed=s, caches=(multi,), objective=KD, **STUDENT)
        rows[names[4]].append(evaluate(e, f"kdviews-{s}"))
        e.log(f"seed {s} done")
    e.data["rows"] = rows
    e.data["caches"] = facts
    e.data["config"] = {"teacher": TEACHER, "student": STUDENT, "kd": vars(KD), "augment": AUG, "views": VIEWS}

    tests = list(TESTS)
    e.table(f"Top-1 % on the test split and its shifted renderings (seeds 0–{len(e.seeds) - 1})",
            md_table(["model", *tests], [[n, *[pm(r[t]["top1"] for r in rows[n]) for t in tests]] for n in names]))
    e.table("ECE (15 bins; lower is better)",
            md_table(["model", *tests], [[n, *[pm((r[t]["ece"] for r in rows[n]), 1, 3) for t in tests]]
                                         for n in names]))
    cache_rows = [["centred (1 view)", pm(f["plain"]["teacher_top1"] for f in facts),
                   pm((f["plain"]["mean_entropy"] for f in facts), 1, 3)],
                  [f"{VIEWS} views of {AUG}", pm(f["multi"]["teacher_top1"] for f in facts),
                   pm((f["multi"]["mean_entropy"] for f in facts), 1, 3)]]
    e.table("What the caches hold: teacher top-1 % and mean entropy (nats) on the cached train views",
            md_table(["cache", "teacher top-1 %", "mean entropy"], cache_rows))
    _plot(rows, names, tests)
    e.finish()


def _plot(rows: dict, names: list[str], tests: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / len(names)
    colors = ["black", "grey", "tab:blue", "tab:orange", "tab:green"]
    for ax, metric, scale, label in ((axes[0], "top1", 100, "top-1 %"), (axes[1], "ece", 1, "ECE")):
        for i, n in enumerate(names):
            ms = [mean_std(scale * r[t][metric] for r in rows[n]) for t in tests]
            ax.bar(np.arange(len(tests)) + (i - (len(names) - 1) / 2) * width, [m for m, _ in ms], width,
                   yerr=[s for _, s in ms], capsize=2, label=n, color=colors[i % len(colors)])
        ax.set_xticks(range(len(tests)), tests)
        ax.set_ylabel(label)
    axes[0].set_ylim(0, 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    savefig(fig, "inductive_bias.png")


def _hard_seed(e, s: int, names: list[str]) -> tuple[dict, dict]:
    """Seed s of `--setting hard`: teacher s and both MLPs on every test variant; (scores by row, cache facts)."""
    from experiments.hard_common import CNN, KD, MLP, evaluate_variants

    e.train(f"teacher-{s}", seed=s, **CNN)
    model, size = e.load(f"teacher-{s}")
    out = {}
    out[names[0]], tl = evaluate_variants(model, size)
    cache = e.dump(f"teacher-{s}", f"teacher-{s}", "cnn_s", image_size=size, dataset=CNN["dataset"])
    e.train(f"scratch-{s}", seed=s, **MLP)
    out[names[1]] = evaluate_variants(*e.load(f"scratch-{s}"), tl)[0]
    e.train(f"kd-{s}", seed=s, caches=(cache,), objective=KD, **MLP)
    out[names[2]] = evaluate_variants(*e.load(f"kd-{s}"), tl)[0]
    e.log(f"seed {s}: " + ", ".join(f"{n.split(' (')[0]} {100 * out[n]['test']['top1']:.1f}/"
                                     f"{100 * out[n]['translated']['top1']:.1f}" for n in names))
    return out, cache_facts(cache)


def main_hard(e) -> None:
    """`--setting hard`: the same question on digits-hard (kdcache.data.hard), where the MLP is far from the CNN.

    Teacher cnn_s (width 16) and MLP, both at 24 px on digits-hard's train split (no augmentation); the MLP student
    distils the teacher's 1-view cache of those images (T = 4, α = 0.1, fixed in experiments/hard_common.py).
    Evaluated on the test split and its three variants, which move the same test digits beyond the training
    range (translated 5-6 px, smaller, larger).  Seed s trains teacher s and both students with seed s; every
    comparison is paired by seed, with a 90 % t-interval over seeds."""
    from experiments.hard_common import CNN, KD, MLP, VARIANTS, fmt_paired, paired, run_seeds

    names = ["CNN teacher (labels)", "MLP from scratch (labels)", "MLP KD from the CNN's cache"]
    per_seed = run_seeds(_hard_seed, e, e.seeds, names)
    rows = {n: [out[n] for out, _ in per_seed] for n in names}
    facts = [f for _, f in per_seed]
    tests = list(VARIANTS)
    cmp = {t: {"top1": paired([r[t]["top1"] for r in rows[names[2]]], [r[t]["top1"] for r in rows[names[1]]]),
               "ece": paired([r[t]["ece"] for r in rows[names[1]]], [r[t]["ece"] for r in rows[names[2]]], 1),
               "agree": paired([r[t]["agree"] for r in rows[names[2]]], [r[t]["agree"] for r in rows[names[1]]])}
           for t in tests}
    e.data.update({"rows": rows, "caches": facts, "kd_minus_scratch": cmp,
                   "config": {"teacher": CNN, "student": MLP, "kd": vars(KD)}})
    last = len(e.seeds) - 1
    e.table(f"digits-hard: top-1 % on the test split and its shifted variants (1080 images each; seeds 0–{last})",
            md_table(["model", *tests], [[n, *[pm(r[t]["top1"] for r in rows[n]) for t in tests]] for n in names]))
    e.table("digits-hard: ECE (15 bins; lower is better)",
            md_table(["model", *tests], [[n, *[pm((r[t]["ece"] for r in rows[n]), 1, 3) for t in tests]]
                                         for n in names]))
    e.table("digits-hard: MLP KD − MLP from scratch, paired by seed: mean [90 % t-interval] (seeds where KD is "
            "better)",
            md_table(["test set", "top-1, pts", "ECE reduction (scratch − KD)", "agreement with the teacher, pts"],
                     [[t, fmt_paired(cmp[t]["top1"]), fmt_paired(cmp[t]["ece"], 3, ""),
                       fmt_paired(cmp[t]["agree"])] for t in tests]))
    e.table("digits-hard: the teacher's cache of the train split",
            md_table(["teacher top-1 % on its train images", "mean entropy (nats)"],
                     [[pm(f["teacher_top1"] for f in facts), pm((f["mean_entropy"] for f in facts), 1, 3)]]))
    e.finish()


if __name__ == "__main__":
    main()
