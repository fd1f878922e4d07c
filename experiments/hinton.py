"""(a) Hinton et al. 2015 in miniature: a CNN teacher's cached logits distilled into an MLP.

Three transfer sets, one MLP student (768-256-256-10 on 16 px digits), teacher cnn_s (16 px):

A. "seen"     -- the teacher trains on the digits train split and the cache holds its logits on those same
                 images (the plain recipe; the teacher is ~100 % right there, so its targets are near one-hot).
B. "held-out" -- the teacher trains on half A of the train split; the cache holds its logits on the other half B,
                 images it never saw; the student trains on half B only (and, from scratch, on half B only).
C. "no 3s"    -- Hinton's omitted-class test: the teacher trains on all of the train split; the student's transfer
                 set is the train split without any 3; the test set keeps its 3s.

A and B: a T x alpha grid on seed 0 picks the best setting, then scratch and that setting are rerun on fresh seeds
1..N (so the confirmatory numbers are not the ones the choice was made on).

    .venv/bin/python -m experiments.hinton            # ~3 min on 2 shared cores (5 seeds)
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.common import (
    OMITTED_CLASS,
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
from kdcache.data.datasets import open_dataset

TEACHER = dict(student="cnn_s", image_size=16, epochs=10)
STUDENT = dict(student="mlp", student_args={"hidden": (256, 256)}, image_size=16, epochs=20)
TS = (1.0, 2.0, 4.0, 8.0)
ALPHAS = (0.1, 0.5, 0.9)
NO3_TS = (4.0, 8.0, 20.0)
NO3_ALPHA = 0.1


def main() -> None:
    e = setup("hinton", __doc__.splitlines()[0], default_seeds=5, settings=["digits", "hard", "hard-1view"])
    if e.setting.startswith("hard"):
        return main_hard(e)
    seeds = [s + 1 for s in e.seeds]  # confirmatory seeds; seed 0 is the grid's
    half_a, half_b, no3 = ("experiments.common:digits_a", "experiments.common:digits_b",
                           "experiments.common:digits_no3")

    # ---------------------------------------------------------------- teachers and caches
    teach = {"seen": [], "held-out": []}
    for s in [0, *seeds[:-1]]:  # N teacher seeds each; seed 0's teacher is the one that gets dumped
        teach["seen"].append(e.train(f"teacher-full-{s}", seed=s, **TEACHER)["final"])
        teach["held-out"].append(e.train(f"teacher-a-{s}", seed=s, dataset=half_a, **TEACHER)["final"])
    e.log(f"teachers: full {pm(r['test_top1'] for r in teach['seen'])}, "
          f"half A {pm(r['test_top1'] for r in teach['held-out'])}")
    caches = {"seen": e.dump("full-train", "teacher-full-0", "cnn_s", image_size=16),
              "held-out": e.dump("b-train", "teacher-a-0", "cnn_s", image_size=16, dataset=half_b),
              "no3": e.dump("no3-train", "teacher-full-0", "cnn_s", image_size=16, dataset=no3)}
    facts = {k: cache_facts(p) for k, p in caches.items()}
    e.data["teachers"] = teach
    e.data["caches"] = facts
    datasets = {"seen": None, "held-out": half_b}

    # ---------------------------------------------------------------- A and B: grid, then confirm
    summary_rows, grids = [], {}
    for design in ("seen", "held-out"):
        ds = datasets[design]
        grid = {}
        for T in TS:
            for a in ALPHAS:
                r = e.train(f"{design}-T{T:g}-a{a:g}-0", seed=0, caches=(caches[design],), dataset=ds,
                            objective=Objective("kd", a, T), **STUDENT)["final"]
                grid[(T, a)] = r
        scratch0 = e.train(f"{design}-scratch-0", seed=0, dataset=ds, **STUDENT)["final"]
        best = max(grid, key=lambda k: (grid[k]["test_top1"], -grid[k]["test_nll"]))
        grids[design] = (grid, scratch0, best)
        e.log(f"{design}: grid done, best T={best[0]:g} alpha={best[1]:g}, scratch seed 0 "
              f"{100 * scratch0['test_top1']:.1f}")
        scratch = [e.train(f"{design}-scratch-{s}", seed=s, dataset=ds, **STUDENT)["final"] for s in seeds]
        kd = [e.train(f"{design}-best-{s}", seed=s, caches=(caches[design],), dataset=ds,
                      objective=Objective("kd", best[1], best[0]), **STUDENT)["final"] for s in seeds]
        e.data[design] = {"grid_seed0": {f"T={T:g},alpha={a:g}": v for (T, a), v in grid.items()},
                          "scratch_seed0": scratch0, "best": {"T": best[0], "alpha": best[1]},
                          "scratch": scratch, "kd_best": kd}
        d_top1 = paired_diff([r["test_top1"] for r in kd], [r["test_top1"] for r in scratch])
        d_nll = paired_diff([-r["test_nll"] for r in kd], [-r["test_nll"] for r in scratch])
        n_train = facts[design]["n"]
        t = teach[design]
        summary_rows += [
            [f"{design} ({n_train} transfer images)", "teacher cnn_s (labels)", pm(r["test_top1"] for r in t),
             pm((r["test_ece"] for r in t), 1, 3), pm((r["test_nll"] for r in t), 1, 3), "—"],
            ["", "MLP from scratch (labels)", pm(r["test_top1"] for r in scratch),
             pm((r["test_ece"] for r in scratch), 1, 3), pm((r["test_nll"] for r in scratch), 1, 3), "—"],
            ["", f"MLP KD, best of grid (T={best[0]:g}, α={best[1]:g})", pm(r["test_top1"] for r in kd),
             pm((r["test_ece"] for r in kd), 1, 3), pm((r["test_nll"] for r in kd), 1, 3),
             (f"{100 * d_top1[0]:+.2f} pts (better on {d_top1[2]}/{len(seeds)}); "
              f"NLL better on {d_nll[2]}/{len(seeds)}")],
        ]

    # ---------------------------------------------------------------- C: no 3s in the transfer set
    def threes(run: str) -> dict:
        model, size = e.load(run)
        logits, y = test_logits(model, size)
        is3 = y == OMITTED_CLASS
        return {**scores(logits, y), "top1_3s": float((logits[is3].argmax(1) == OMITTED_CLASS).float().mean()),
                "top1_others": float((logits[~is3].argmax(1) == y[~is3]).float().mean()),
                "pred3_rate": float((logits.argmax(1) == OMITTED_CLASS).float().mean())}

    no3_res = {"scratch": []}
    for s in seeds:
        e.train(f"no3-scratch-{s}", seed=s, dataset=no3, **STUDENT)
        no3_res["scratch"].append(threes(f"no3-scratch-{s}"))
        for T in NO3_TS:
            e.train(f"no3-T{T:g}-{s}", seed=s, caches=(caches["no3"],), dataset=no3,
                    objective=Objective("kd", NO3_ALPHA, T), **STUDENT)
            no3_res.setdefault(f"T={T:g}", []).append(threes(f"no3-T{T:g}-{s}"))
    e.data["no3"] = no3_res
    e.log("no-3 transfer set done")

    # ---------------------------------------------------------------- tables
    e.table("Teacher vs MLP from scratch vs MLP distilled from the cache (confirmatory seeds 1–"
            f"{len(seeds)}; test split, 360 images)",
            md_table(["transfer set", "model", "top-1 %", "ECE", "NLL", "KD − scratch (paired by seed)"],
                     summary_rows, "llrrrl"))
    for design in ("seen", "held-out"):
        grid, scratch0, best = grids[design]
        rows = [[f"T = {T:g}", *[f"{100 * grid[(T, a)]['test_top1']:.1f} / {grid[(T, a)]['test_nll']:.3f}"
                                 for a in ALPHAS]] for T in TS]
        e.table(f"T × α grid, transfer set “{design}”, seed 0: top-1 % / NLL (scratch seed 0: "
                f"{100 * scratch0['test_top1']:.1f} / {scratch0['test_nll']:.3f})",
                md_table(["", *[f"α = {a:g}" for a in ALPHAS]], rows))
    rows = [[name, pm(r["top1"] for r in res), pm(r["top1_3s"] for r in res), pm(r["top1_others"] for r in res),
             pm(r["pred3_rate"] for r in res)] for name, res in
            [("MLP from scratch (labels, no 3s)", no3_res["scratch"]),
             *[(f"MLP KD T={T:g}, α={NO3_ALPHA:g}", no3_res[f"T={T:g}"]) for T in NO3_TS]]]
    e.table(f"No 3s in the transfer set ({facts['no3']['n']} images); test keeps its 37 threes "
            f"(seeds 1–{len(seeds)})",
            md_table(["student", "top-1 % (all)", "top-1 % on 3s", "top-1 % on other digits",
                      "% of test predicted “3”"], rows))
    cache_rows = [[k, f"{v['n']}", f"{100 * v['teacher_top1']:.1f}", f"{v['mean_entropy']:.3f}",
                   f"{v['bytes_per_sample']:.1f}"] for k, v in facts.items()]
    e.table("The three caches (`kdcache info`)",
            md_table(["cache", "images", "teacher top-1 % on them", "mean entropy (nats)", "bytes/sample"],
                     cache_rows))

    _plot(grids, no3_res)
    e.finish()


def _plot(grids: dict, no3_res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, design in zip(axes[:2], ("seen", "held-out")):
        grid, scratch0, _ = grids[design]
        m = np.array([[100 * grid[(T, a)]["test_top1"] for a in ALPHAS] for T in TS])
        d = m - 100 * scratch0["test_top1"]
        lim = max(1.0, np.abs(d).max())
        im = ax.imshow(d, cmap="RdBu", vmin=-lim, vmax=lim)
        for i in range(len(TS)):
            for j in range(len(ALPHAS)):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=9,
                        color="white" if abs(d[i, j]) > 0.6 * lim else "black")
        ax.set_xticks(range(len(ALPHAS)), [f"α={a:g}" for a in ALPHAS])
        ax.set_yticks(range(len(TS)), [f"T={T:g}" for T in TS])
        ax.set_title(f"{design}: top-1 % (colour: − scratch {100 * scratch0['test_top1']:.1f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="pts vs scratch (seed 0)")
    ax = axes[2]
    names = ["scratch", *[f"T={T:g}" for T in NO3_TS]]
    vals = [mean_std(100 * r["top1_3s"] for r in no3_res[n]) for n in names]
    ax.bar(names, [v[0] for v in vals], yerr=[v[1] for v in vals], color=["grey", *["tab:blue"] * len(NO3_TS)],
           capsize=4)
    ax.set_ylabel("top-1 % on test 3s")
    ax.set_ylim(0, 100)
    ax.set_title("no 3s in the transfer set: MLP accuracy on 3s", fontsize=9)
    fig.tight_layout()
    savefig(fig, "hinton.png")


def _hard_member(e, s: int, views: int) -> tuple:
    """CNN s of the hard settings: (test scores, test logits, its train cache, cache facts)."""
    from experiments.hard_common import cnn_for, logits_on, replay

    # every member is dumped over the same views (one seed), so their caches merge view by view
    train_kw, dump_kw = replay(views, seed=0)
    CNN = cnn_for(views)
    e.train(f"cnn-{s}", seed=s, **train_kw, **CNN)
    model, size = e.load(f"cnn-{s}")
    lg, y = logits_on(model, size)
    cache = e.dump(f"cnn-{s}", f"cnn-{s}", "cnn_s", image_size=size, dataset=CNN["dataset"], **dump_kw)
    e.log(f"cnn {s}: {100 * scores(lg, y)['top1']:.1f}")
    return scores(lg, y), lg, cache, cache_facts(cache)


def _to_ensemble(lg: torch.Tensor, ens_logp: torch.Tensor) -> dict:
    """How close a model's test predictions are to the ensemble's: argmax agreement and KL(ensemble ‖ model)."""
    return {"agree": float((lg.argmax(1) == ens_logp.argmax(1)).float().mean()),
            "kl": float(torch.nn.functional.kl_div(lg.log_softmax(1), ens_logp, log_target=True,
                                                   reduction="batchmean"))}


def _hard_students(e, s: int, caches: list[str], ens_path: str, views: int, ens_logp: torch.Tensor) -> dict:
    from experiments.hard_common import KD, MLP, cnn_for, logits_on, replay

    CNN = cnn_for(views)
    out = {}
    e.train(f"cnn-kd-{s}", seed=100 + s, caches=(ens_path,), objective=KD, **CNN)
    lg, y = logits_on(*e.load(f"cnn-kd-{s}"))
    out["CNN student of the ensemble"] = scores(lg, y) | {"to_ensemble": _to_ensemble(lg, ens_logp)}
    e.train(f"mlp-{s}", seed=s, **replay(views, seed=0)[0], **MLP)
    out["MLP from scratch"] = scores(*logits_on(*e.load(f"mlp-{s}")))
    e.train(f"mlp-kd1-{s}", seed=s, caches=(caches[s],), objective=KD, **MLP)
    out["MLP KD from CNN s"] = scores(*logits_on(*e.load(f"mlp-kd1-{s}")))
    e.train(f"mlp-kde-{s}", seed=s, caches=(ens_path,), objective=KD, **MLP)
    out["MLP KD from the ensemble"] = scores(*logits_on(*e.load(f"mlp-kde-{s}")))
    e.log(f"seed {s}: " + ", ".join(f"{k} {100 * v['top1']:.1f}" for k, v in out.items()))
    return out


def main_hard(e) -> None:
    """The hard settings: Hinton's ensemble → one model, on digits-hard (kdcache.data.hard).

    N CNNs (cnn_s width 16, 24 px, lr 3e-3, seeds 0..N-1) are trained from labels: they are the single models and
    the ensemble's members.  `--setting hard`: every model trains under AUG (CNNs 36 epochs) and each member is
    dumped over the same VIEWS stored views of AUG of the train split, which the students replay; `--setting
    hard-1view`: no augmentation, CNNs 12 epochs, 1-view caches of the train images.  The members' caches are merged
    (`kdcache merge --mode mean-prob`) into the ensemble's cache; one CNN of the same architecture, budget and views
    per seed (training seed 100 + s) distils it (T = 4, α = 0.1, fixed in experiments/hard_common.py).  Paired by
    seed s: single model s vs the ensemble vs the student of seed s.  "Recovered" = (student − single) / (ensemble −
    single), pooled over seeds with a 90 % bootstrap interval (resampling seeds).  Also the MLP: from scratch, KD
    from teacher s alone, KD from the ensemble."""
    from experiments.hard_common import AUG, KD, MLP, VIEWS, cnn_for, ensemble_scores, fmt_paired, paired, run_seeds, \
        views_text
    from kdcache.ops.merge import merge

    views = 1 if e.setting == "hard-1view" else VIEWS
    CNN = cnn_for(views)
    first = run_seeds(_hard_member, e, e.seeds, views)
    single = [r for r, _, _, _ in first]
    logits = [lg for _, lg, _, _ in first]
    caches = [c for _, _, c, _ in first]
    facts = [f for _, _, _, f in first]
    y = torch.from_numpy(open_dataset(CNN["dataset"], "test").labels)
    ens_path = e.path("caches", "ensemble.zarr")
    merge(caches, ens_path, mode="mean-prob", overwrite=True, command="experiments/hinton (ensemble)")
    ens_facts = cache_facts(ens_path)
    ens = ensemble_scores(logits, y)
    ens_logp = torch.stack([lg.softmax(-1) for lg in logits]).mean(0).clamp_min(1e-12).log()
    for r, lg in zip(single, logits):
        r["to_ensemble"] = _to_ensemble(lg, ens_logp)
    e.log(f"ensemble {100 * ens['top1']:.1f}")
    per_seed = run_seeds(_hard_students, e, e.seeds, caches, ens_path, views, ens_logp)
    res = {k: [out[k] for out in per_seed] for k in per_seed[0]}

    top = lambda rs: [r["top1"] for r in rs]  # noqa: E731
    n = len(e.seeds)
    gain_ens = paired([ens["top1"]] * n, top(single))
    gain_kd = paired(top(res["CNN student of the ensemble"]), top(single))
    nll_ens = paired([r["nll"] for r in single], [ens["nll"]] * n, 1)
    nll_kd = paired([r["nll"] for r in single], [r["nll"] for r in res["CNN student of the ensemble"]], 1)
    rng = np.random.RandomState(0)
    ge, gk = np.asarray(gain_ens["diffs"]), np.asarray(gain_kd["diffs"])
    boot = []
    for _ in range(10000):
        i = rng.randint(0, n, n)
        if ge[i].mean() > 0:
            boot.append(gk[i].mean() / ge[i].mean())
    frac = {"pooled": float(gk.mean() / ge.mean()), "lo": float(np.percentile(boot, 5)),
            "hi": float(np.percentile(boot, 95))}
    mlp_cmp = {k: paired(top(res[k]), top(res["MLP from scratch"])) for k in ("MLP KD from CNN s",
                                                                            "MLP KD from the ensemble")}
    e.data.update({"single": single, "ensemble": ens, "students": res, "caches": facts, "ensemble_cache": ens_facts,
                   "gain_ensemble": gain_ens, "gain_student": gain_kd, "nll_gain_ensemble": nll_ens,
                   "nll_gain_student": nll_kd, "recovered": frac, "mlp": mlp_cmp,
                   "config": {"cnn": CNN, "mlp": MLP, "kd": vars(KD), "members": n, "views": views,
                              "augment": AUG if views > 1 else None}})
    rows = [[f"single CNN (labels; seeds 0–{n - 1})", pm(top(single)), pm((r["nll"] for r in single), 1, 3),
             pm((r["ece"] for r in single), 1, 3), "—"],
            [f"ensemble of the {n} CNNs (mean softmax)", f"{100 * ens['top1']:.1f}", f"{ens['nll']:.3f}",
             f"{ens['ece']:.3f}", fmt_paired(gain_ens)]]
    for k, v in res.items():
        base = single if k.startswith("CNN") else res["MLP from scratch"]
        rows.append([k, pm(top(v)), pm((r["nll"] for r in v), 1, 3), pm((r["ece"] for r in v), 1, 3),
                     "—" if k == "MLP from scratch" else fmt_paired(paired(top(v), top(base)))])
    where = f"every model trained {views_text(views)}" if views > 1 else views_text(views)
    e.table(f"digits-hard, {where}: ensemble → one model (test split, 1080 images; seeds 0–{n - 1}); paired "
            "column: vs the single CNN of the same seed (CNN rows) or the MLP from scratch (MLP rows), mean [90 % "
            "t-interval] (seeds better)",
            md_table(["model", "top-1 %", "NLL", "ECE", "Δ top-1 (paired)"], rows, "lrrrl"))
    e.table("digits-hard: how much of the ensemble's gain one distilled CNN recovers",
            md_table(["", "top-1 gain over the single CNN, pts", "NLL reduction"],
                     [["ensemble", fmt_paired(gain_ens), fmt_paired(nll_ens, 3, "")],
                      ["distilled CNN", fmt_paired(gain_kd), fmt_paired(nll_kd, 3, "")],
                      ["recovered (student gain / ensemble gain)",
                       f"{100 * frac['pooled']:.0f} % [90 % bootstrap {100 * frac['lo']:.0f}, {100 * frac['hi']:.0f}]",
                       f"{100 * nll_kd['mean'] / nll_ens['mean']:.0f} %"]], "lll"))
    kd = res["CNN student of the ensemble"]
    e.table("digits-hard: how close each CNN's test predictions are to the ensemble's (a member is one of the five "
            "it averages, which favours it)",
            md_table(["model", "argmax agrees with the ensemble, %", "KL(ensemble ‖ model), nats"],
                     [[name, pm(r["to_ensemble"]["agree"] for r in rs), pm((r["to_ensemble"]["kl"] for r in rs), 1, 3)]
                      for name, rs in (("single CNN (a member)", single), ("CNN student of the ensemble", kd))]))
    e.table("digits-hard: the caches of the train split",
            md_table(["cache", "teacher top-1 % on the stored train views", "mean entropy (nats)"],
                     [["one CNN (mean over seeds)", pm(f["teacher_top1"] for f in facts),
                       pm((f["mean_entropy"] for f in facts), 1, 3)],
                      [f"ensemble of {n}", f"{100 * ens_facts['teacher_top1']:.1f}",
                       f"{ens_facts['mean_entropy']:.3f}"]]))
    e.finish()


if __name__ == "__main__":
    main()
