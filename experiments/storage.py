"""(f) What top-k storage costs: accuracy vs bytes for top-k caches, with the tail bucket or renormalised.

The soft targets must be soft for truncation to matter, so the setting is the multi-view one (see multiview.py):
teacher cnn_s trained with augmentation AUG; it is dumped over VIEWS augmented views per train image, as full logits
and as top-k (k in {1, 2, 5}) logits + tail (the log-sum-exp of the dropped logits).  An MLP student (16 px,
20 epochs, KD T=4, alpha=0.1) trains from each cache with kdtrain's two top-k losses:

* "tail":   KL over k + 1 buckets (the top-k classes and one "rest" bucket built from the stored tail);
* "renorm": KL over the k stored classes, both distributions renormalised (the tail is dropped).

Besides student accuracy, the table reports how far each loss's view of the teacher is from the full distribution
(mean total-variation distance at T=4 over all cached samples and views) and the cache's bytes per sample.

    .venv/bin/python -m experiments.storage        # ~2 min on 2 shared cores (3 seeds)
"""

from __future__ import annotations

import os

import numpy as np
import torch

from experiments.common import cache_facts, md_table, mean_std, pm, savefig, setup
from kdcache.io import open_cache
from kdcache.train.batches import to_target
from kdcache.train.losses import teacher_probs
from kdcache.train.objective import Objective

AUG = "translate(0.15)+rrc(0.5,1)"
VIEWS = 8
TEACHER = dict(student="cnn_s", image_size=16, epochs=15, augment=AUG)
STUDENT = dict(student="mlp", student_args={"hidden": (256, 256)}, image_size=16, epochs=20)
T, ALPHA = 4.0, 0.1
KS = (1, 2, 5)


def _array_bytes(path: str) -> dict[str, int]:
    out = {}
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p):
            out[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
    return out


def _distortion(full: str, topk: str) -> dict[str, float]:
    """Mean TV distance between the full teacher distribution at T and what each top-k loss sees of it."""
    with open_cache(full) as cf, open_cache(topk) as ck:
        idx = np.arange(cf.n)
        tv_tail, tv_renorm, mass = [], [], []
        for v in range(cf.n_views):
            p = torch.softmax(cf.read(idx, v).values.float() / T, dim=1)
            t = to_target(ck.read(idx, v), ck.num_classes, torch.device("cpu"))
            q_tail = teacher_probs(t, T)
            q_renorm = torch.zeros_like(p).scatter_(1, t.indices, torch.softmax(t.values / T, dim=1))
            tv_tail.append(0.5 * (p - q_tail).abs().sum(1))
            tv_renorm.append(0.5 * (p - q_renorm).abs().sum(1))
            mass.append(p.gather(1, t.indices).sum(1))
    return {"tv_tail": float(torch.cat(tv_tail).mean()), "tv_renorm": float(torch.cat(tv_renorm).mean()),
            "topk_mass_T": float(torch.cat(mass).mean())}


def main() -> None:
    e = setup("storage", __doc__.splitlines()[0])
    kd = lambda mode: Objective("kd", ALPHA, T, topk_mode=mode)
    conds = ["full", *[f"top-{k} {m}" for k in KS for m in ("tail", "renorm")]]
    res: dict[str, list[dict]] = {"labels only": [], **{c: [] for c in conds}}
    caches_info: dict[str, list[dict]] = {}
    for s in e.seeds:
        e.train(f"teacher-{s}", seed=s, **TEACHER)
        paths = {"full": e.dump(f"full-{s}", f"teacher-{s}", "cnn_s", image_size=16, views=VIEWS, augment=AUG,
                                seed=s)}
        for k in KS:
            paths[k] = e.dump(f"top{k}-{s}", f"teacher-{s}", "cnn_s", image_size=16, views=VIEWS, augment=AUG,
                              seed=s, topk=k)
        for key, p in paths.items():
            info = cache_facts(p) | {"arrays": _array_bytes(p)}
            if key != "full":
                info |= _distortion(paths["full"], p)
            caches_info.setdefault(str(key), []).append(info)
        res["labels only"].append(e.train(f"labels-{s}", seed=s, augment=AUG, **STUDENT)["final"])
        res["full"].append(e.train(f"full-{s}", seed=s, caches=(paths["full"],), objective=kd("tail"),
                                   **STUDENT)["final"])
        for k in KS:
            for m in ("tail", "renorm"):
                res[f"top-{k} {m}"].append(e.train(f"top{k}-{m}-{s}", seed=s, caches=(paths[k],), objective=kd(m),
                                                   **STUDENT)["final"])
        e.log(f"seed {s}: " + ", ".join(f"{c} {100 * res[c][-1]['test_top1']:.1f}" for c in res))
    e.data.update({"students": res, "caches": caches_info,
                   "config": {"augment": AUG, "views": VIEWS, "T": T, "alpha": ALPHA, "teacher": TEACHER,
                              "student": STUDENT}})

    def bytes_cols(key: str) -> list[str]:
        infos = caches_info[key]
        n = infos[0]["n"]
        disk = np.mean([i["bytes_per_sample"] for i in infos])
        logits = np.mean([sum(v for a, v in i["arrays"].items() if a in ("values", "indices", "tail"))
                          for i in infos]) / n
        views = np.mean([i["arrays"].get("views", 0) for i in infos]) / n
        return [f"{logits:.0f}", f"{views:.0f}", f"{disk:.0f}",
                f"{np.mean([i['decoded_bytes'] for i in infos]) / n:.0f}"]

    rows = [["labels only (no cache)", "—", pm(r["test_top1"] for r in res["labels only"]),
             pm((r["test_nll"] for r in res["labels only"]), 1, 3), "—", "—", "—", "—"]]
    for c in conds:
        key = "full" if c == "full" else c.split()[0][4:]
        mode = "tail" if c == "full" else c.split()[1]
        tv = "0" if c == "full" else f"{np.mean([i[f'tv_{mode}'] for i in caches_info[key]]):.3f}"
        rows.append([c, tv, pm(r["test_top1"] for r in res[c]), pm((r["test_nll"] for r in res[c]), 1, 3),
                     *bytes_cols(key)])
    e.table(f"MLP from {VIEWS}-view caches of `{AUG}` (T={T:g}, α={ALPHA:g}; seeds 0–{len(e.seeds) - 1}). "
            "TV = mean total-variation distance between the teacher's full distribution at T and what the loss "
            "sees of it; bytes per sample (all views) on disk, blosc-zstd, float16 values",
            md_table(["soft targets", "TV to full", "top-1 %", "NLL", "logit bytes/sample", "view bytes/sample",
                      "total on disk B/sample", "decoded B/sample"], rows))
    mrows = [[f"top-{k}", pm(i["topk_mass"] for i in caches_info[str(k)]),
              pm(i["topk_mass_T"] for i in caches_info[str(k)])] for k in KS]
    e.table("Teacher probability mass kept by top-k (mean over samples and views)",
            md_table(["cache", "mass % at T=1 (`kdcache info`)", f"mass % at T={T:g}"], mrows))
    _plot(res, caches_info)
    e.finish()


def _plot(res: dict, caches_info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, color in (("tail", "tab:blue"), ("renorm", "tab:orange")):
        xs, ms, ss = [], [], []
        for k in KS:
            xs.append(np.mean([i["bytes_per_sample"] for i in caches_info[str(k)]]))
            m, s = mean_std(100 * r["test_top1"] for r in res[f"top-{k} {mode}"])
            ms.append(m)
            ss.append(s)
        ax.errorbar(xs, ms, yerr=ss, fmt="o-", color=color, capsize=3, label=f"top-k, {mode}")
        for x, m, k in zip(xs, ms, KS):
            ax.annotate(f"k={k}", (x, m), textcoords="offset points", xytext=(4, -10), fontsize=8, color=color)
    xf = np.mean([i["bytes_per_sample"] for i in caches_info["full"]])
    m, s = mean_std(100 * r["test_top1"] for r in res["full"])
    ax.errorbar([xf], [m], yerr=[s], fmt="s", color="black", capsize=3, label="full logits")
    m, s = mean_std(100 * r["test_top1"] for r in res["labels only"])
    ax.axhspan(m - s, m + s, color="grey", alpha=0.25, label="labels only (no cache)")
    ax.set_xlabel("cache bytes per sample on disk (8 views, incl. view parameters)")
    ax.set_ylabel("student test top-1 %")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, "storage.png")


if __name__ == "__main__":
    main()
