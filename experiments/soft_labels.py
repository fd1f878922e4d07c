"""(issue 17b, c) Equal bytes: top-k + tail vs sampled soft labels vs full logits; bytes per sample by mode.

(b) The setting of storage.py (§6), where the soft targets are soft: teacher `cnn_s` trained with augmentation AUG,
dumped over VIEWS augmented views per train image; an MLP student (16 px, 20 epochs, KD T=4, α=0.1) trains from
each cache.  One teacher (seed 0) and one cache per mode; the student seeds vary.  Byte budgets, per stored view
of the soft-label arrays (2 B per float16 value, 2 B per int16 index, 4 B per float32 tail; a draw is a 2 B id and
a 1 B count):

* stored (uncompressed, also the decoded bytes in RAM): top-1 + tail 8 B, top-2 + tail 12 B = M=4 draws 12 B,
  top-4 + tail 20 B = full float16 20 B;
* on disk (blosc-zstd, measured): draws compress far better, because at most C = 10 distinct ids are stored
  and unused slots are 0: M=16 ≈ top-1 + tail (~6 B), M=32 ≈ top-2 + tail (~8 B), and from M ≈ 48 up sampled
  caches saturate near 8 B per view (M=64).

The draws are taken at the training temperature (`kdcache dump --sample M --sample-temperature 4`): the sampled
loss is then an unbiased estimate of the T = 4 KD gradient.  Per student: test top-1, ECE, NLL, KL(teacher ‖
student) at T = 1 on the test split (the teacher's own test logits), and TV = the mean total-variation distance
between the teacher's full T = 4 distribution on the cached train views and what the loss sees of it (top-k: the
k + 1 buckets with the rest spread evenly; sampled: the draws' frequencies).

(c) Bytes per sample by mode from real single-view caches of the seed-0 teacher on the digits train split (1437
images, 10 classes): full float32 / float16, top-k + tail at k = 1, 2, 5 (float16 and q8), sampled M = 2, 4, 8,
16, and cached features (`pool` pooled to 128 floats; the `features.7` map at 4 × 4).

    .venv/bin/python -m experiments.soft_labels        # 5 seeds
"""

from __future__ import annotations

import os

import numpy as np
import torch
import zarr

from experiments.common import cache_facts, md_table, paired_t, pm, scores, setup
from experiments.hints import kl_to, test_logits
from experiments.storage import _array_bytes
from kdcache.config import LossConfig
from kdcache.io import open_cache
from kdcache.train.batches import to_target
from kdcache.train.losses import teacher_probs

AUG = "translate(0.15)+rrc(0.5,1)"
VIEWS = 8
TEACHER = dict(student="cnn_s", image_size=16, epochs=15, augment=AUG)
STUDENT = dict(student="mlp", student_args={"hidden": (256, 256)}, image_size=16, epochs=20)
T, ALPHA = 4.0, 0.1
KD = LossConfig("kd", ALPHA, T)
# (condition, dump options, budget it is matched on): stored = uncompressed array bytes, disk = measured blosc-zstd
CONDS = (("top-1 + tail", {"topk": 1}, "~6 B on disk"), ("sampled M=16", {"sample": 16}, "~6 B on disk"),
         ("top-2 + tail", {"topk": 2}, "12 B stored, ~8 B on disk"), ("sampled M=4", {"sample": 4}, "12 B stored"),
         ("sampled M=32", {"sample": 32}, "~8 B on disk"), ("top-4 + tail", {"topk": 4}, "20 B stored"),
         ("sampled M=64", {"sample": 64}, "(saturates ~8 B on disk)"), ("full fp16", {}, "20 B stored"))
SOFT = ("values", "top", "codes", "indices", "tail", "sample_ids", "sample_counts")
STORE = {"full fp32": {"dtype": "float32"}, "full fp16": {},
         **{f"top-{k} + tail fp16": {"topk": k} for k in (1, 2, 5)},
         **{f"top-{k} + tail q8": {"topk": k, "dtype": "q8"} for k in (2, 5)},
         **{f"sampled M={m}": {"sample": m, "sample_temperature": T} for m in (2, 4, 16, 64)},
         "full fp16 + features `pool` (gap, 128)": {"features": ("pool",)},
         "full fp16 + features `features.7:4x4` (64×4×4)": {"features": ("features.7:4x4",)}}


def tv_to_full(full: str, other: str) -> float:
    """Mean TV distance between the full teacher distribution at T and what the loss sees of `other`."""
    with open_cache(full) as cf, open_cache(other) as co:
        idx, tv = np.arange(cf.n), []
        for v in range(cf.n_views):
            p = torch.softmax(cf.read(idx, v).values.float() / T, dim=1)
            q = teacher_probs(to_target(co.read(idx, v), co.num_classes, torch.device("cpu")), T)
            tv.append(0.5 * (p - q).abs().sum(1))
    return float(torch.cat(tv).mean())


def soft_bytes(path: str, n: int) -> tuple[float, float]:
    """(on-disk, stored-uncompressed) bytes per sample of the soft-label arrays (all views)."""
    disk = sum(b for a, b in _array_bytes(path).items() if a in SOFT)
    g = zarr.open_group(path, mode="r")
    raw = sum(g[a].nbytes for a in g.array_keys() if a in SOFT)
    return disk / n, raw / n


def main() -> None:
    e = setup("soft_labels", __doc__.splitlines()[0], default_seeds=5)
    conds = [c for c, _, _ in CONDS]
    res: dict[str, list[dict]] = {"labels only": [], **{c: [] for c in conds}}
    load0 = os.getloadavg()[0]  # the machine is shared: record how busy it was
    e.train("teacher", seed=0, **TEACHER)
    tm, size = e.load("teacher")
    tz, y = test_logits(tm, size)
    teacher = scores(tz, y)
    kw = dict(image_size=16, views=VIEWS, augment=AUG, seed=0)
    paths, info = {}, {}
    for i, (c, extra, _) in enumerate(CONDS):
        extra = extra | ({"sample_temperature": T} if "sample" in extra else {})
        paths[c] = e.dump(f"c{i}", "teacher", "cnn_s", **kw, **extra)
    for c, p in paths.items():
        f = cache_facts(p)
        disk, raw = soft_bytes(p, f["n"])
        info[c] = f | {"soft_disk": disk, "soft_raw": raw,
                       "tv": 0.0 if c == "full fp16" else tv_to_full(paths["full fp16"], p)}
    e.log("caches: " + ", ".join(f"{c} {info[c]['soft_disk'] / VIEWS:.1f} B/view" for c in conds))
    for s in e.seeds:
        def student(run: str, **kw) -> dict:
            out = e.train(run, seed=s, **STUDENT, **kw)
            model, sz = e.load(run)
            z, yy = test_logits(model, sz)
            return scores(z, yy) | {"kl_teacher": kl_to(tz, z), "train_seconds": out["wall_seconds"]}

        res["labels only"].append(student(f"labels-{s}", augment=AUG, objective=LossConfig("ce", 1.0, T)))
        for i, c in enumerate(conds):
            res[c].append(student(f"c{i}-{s}", caches=(paths[c],), objective=KD))
        e.log(f"seed {s}: " + ", ".join(f"{c} {100 * res[c][-1]['top1']:.1f}" for c in res))
    store = _storage(e, kw | {"views": 1, "augment": "none"})
    e.data.update({"students": res, "caches": info, "teacher": teacher, "storage": store,
                   "config": {"augment": AUG, "views": VIEWS, "T": T, "alpha": ALPHA, "teacher": TEACHER,
                              "student": STUDENT, "conditions": CONDS}})

    rows = [["teacher `cnn_s` (seed 0)", "—", f"{100 * teacher['top1']:.1f}", f"{teacher['ece']:.3f}",
             f"{teacher['nll']:.3f}", "0", "—", "—", "—"]]
    r = res["labels only"]
    rows.append(["labels only (no cache)", "—", pm(x["top1"] for x in r), pm((x["ece"] for x in r), 1, 3),
                 pm((x["nll"] for x in r), 1, 3), pm((x["kl_teacher"] for x in r), 1, 3), "—", "—", "—"])
    for c, _, budget in CONDS:
        r, i = res[c], info[c]
        rows.append([c, budget, pm(x["top1"] for x in r), pm((x["ece"] for x in r), 1, 3),
                     pm((x["nll"] for x in r), 1, 3), pm((x["kl_teacher"] for x in r), 1, 3), f"{i['tv']:.3f}",
                     f"{i['soft_raw'] / VIEWS:.0f}", f"{i['soft_disk'] / VIEWS:.1f}"])
    n = len(e.seeds)
    e.table(f"MLP from {VIEWS}-view caches of `{AUG}` on `digits` (KD T={T:g}, α={ALPHA:g}; one teacher, student "
            f"seeds 0–{n - 1}; test split, 360 images). KL = KL(teacher ‖ student) at T=1 on the test split; "
            "TV = mean "
            f"total-variation distance between the teacher's full T={T:g} distribution on the cached views and what "
            "the loss sees; soft-label bytes per sample per view, stored (uncompressed) and on disk (blosc-zstd)",
            md_table(["soft targets", "matched on", "top-1 %", "ECE", "NLL", "KL to teacher", "TV to full",
                      "B/view stored", "B/view on disk"], rows))

    def diff(a: str, b: str) -> list[str]:
        out = [f"{a} − {b}"]
        for key, scale, digits in (("top1", 100, 1), ("ece", 1, 3), ("nll", 1, 3), ("kl_teacher", 1, 3)):
            m, lo, hi, wins = paired_t([x[key] for x in res[a]], [x[key] for x in res[b]])
            out.append(f"{scale * m:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}] ({wins}/{n})")
        return out

    pairs = [("sampled M=16", "top-1 + tail"), ("sampled M=32", "top-2 + tail"), ("sampled M=4", "top-2 + tail"),
             ("sampled M=64", "top-4 + tail"), ("sampled M=64", "full fp16"), ("top-4 + tail", "full fp16"),
             ("top-2 + tail", "full fp16"), ("full fp16", "labels only")]
    e.table("Paired differences by student seed: mean [90 % t-interval] (seeds where the first is higher; lower ECE, "
            "NLL and KL are better)",
            md_table(["comparison", "Δ top-1 points", "Δ ECE", "Δ NLL", "Δ KL to teacher"],
                     [diff(a, b) for a, b in pairs]))
    e.table("Bytes per sample by mode: single-view caches of the same teacher (`cnn_s`, 16 px) on the `digits` "
            "train split (1437 samples, 10 classes), blosc-zstd; `kdcache info` total and the soft-label / feature "
            "arrays alone",
            md_table(["mode", "total on disk B/sample (`kdcache info`)", "soft labels on disk", "soft labels stored",
                      "features on disk", "features stored", "decoded B/sample"], store))
    e.table("Machine load", "load average (1 min) at start / end of the script: "
            f"{load0:.1f} / {os.getloadavg()[0]:.1f} "
            f"(2 cores, shared)")
    e.finish()


def _storage(e, kw: dict) -> list[list[str]]:
    rows = []
    for mode, extra in STORE.items():
        p = e.dump(f"store-{len(rows)}", "teacher", "cnn_s", **kw, **extra)
        f = cache_facts(p)
        n = f["n"]
        arrays = _array_bytes(p)
        g = zarr.open_group(p, mode="r")
        stored = {a: g[a].nbytes for a in g.array_keys()}
        feat = [a for a in arrays if a.startswith("feat_")]
        soft_disk, soft_raw = soft_bytes(p, n)
        rows.append([mode, f"{f['bytes_per_sample']:.1f}", f"{soft_disk:.1f}", f"{soft_raw:.0f}",
                     f"{sum(arrays[a] for a in feat) / n:.1f}" if feat else "—",
                     f"{sum(stored[a] for a in feat) / n:.0f}" if feat else "—",
                     f"{f['decoded_bytes'] / n:.0f}"])
        e.log(f"storage {mode}: {rows[-1][1:]}")
    return rows


if __name__ == "__main__":
    main()
