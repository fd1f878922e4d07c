"""Peak RSS of a short streaming `kdtrain` run vs the number of samples N in the cache and dataset.

For each N: a synthetic dataset `bench.synthdata:synthetic` (1x8x8 uint8 images generated from the index,
labels i % 10; only the labels array grows with N) and a matching full 10-class fp16 cache written through
kdcache's writer with the dataset's identity (so kdtrain's alignment check passes). Then, as a subprocess:

  python -m bench._kdtrain --cache C --dataset bench.synthdata:synthetic --student mlp \
      --student-arg hidden=(64,) --epochs 1 --batch-size 1024 --cache-ram 0 --quiet --no-plots \
      --out RUN --overwrite

(= kdtrain: one full epoch, streaming -- `--cache-ram 0` never loads the cache whole), 3 repetitions,
interleaved; medians are compared. Also with the reader's LRU set to 64 MiB and 8 MiB instead of kdcache's
16 MiB default (bench/_kdtrain.py).
Peak RSS is the child's VmHWM read as kdtrain_main returns (bench/_kdtrain.py); the kernel's ru_maxrss
(os.wait4) is reported too, but it includes a ~130 MB spike that `import torch` alone causes at
interpreter exit. RSS at the end of training (VmRSS as kdtrain_main returns) is reported, and a /proc
VmRSS trace is kept in the JSON.

Target: peak RSS(N = 1,000,000) - peak RSS(N = 10,000) <= 64 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, synthcache  # noqa: E402

TARGET_MB = 64
SPEC = "bench.synthdata:synthetic"


def prepare(n: int, wd: Path) -> str:
    os.environ["KDBENCH_N"] = str(n)
    from bench.synthdata import synthetic

    ds = synthetic("train")
    return synthcache.make_cache(wd / f"synth_n{n}.zarr", labels=ds.labels, num_classes=10,
                                 dataset=synthcache.dataset_attrs(ds), image_size=8)["path"]


def run(n: int, cache: str, wd: Path, batch: int, cache_ram: str, tag: str, lru_mb: float | None = None) -> dict:
    out = wd / f"run_{tag}_n{n}"
    cmd = [sys.executable, "-m", "bench._kdtrain", "--cache", cache, "--dataset", SPEC, "--student", "mlp", "--student-arg", "hidden=(64,)",
           "--epochs", "1", "--batch-size", str(batch), "--cache-ram", cache_ram, "--quiet", "--no-plots",
           "--out", str(out), "--overwrite"]
    hwm = wd / f"hwm_{tag}_n{n}.txt"
    env = {"KDBENCH_N": str(n), "PYTHONPATH": str(common.REPO), "KDBENCH_HWM_FILE": str(hwm)}
    if lru_mb is not None:
        env["KDBENCH_LRU_MB"] = str(lru_mb)
    load = common.loadavg()
    common.quiet_gate(timeout_s=30)
    with common.Contention() as cont:
        r = common.run_measured(cmd, env=env, log=wd / f"log_{tag}_n{n}.txt")
    if r["rc"] != 0:
        sys.exit(f"kdtrain failed (rc {r['rc']}); see {wd / f'log_{tag}_n{n}.txt'}:\n"
                 + (wd / f"log_{tag}_n{n}.txt").read_text()[-2000:])
    m = json.loads((out / "metrics.json").read_text())
    step = max(1, len(r["trace"]) // 200)
    hwm_b, end_b = (int(x) for x in hwm.read_text().split())
    return {"N": n, "mode": tag, "peak_rss_mb": hwm_b / 1e6, "end_rss_mb": end_b / 1e6,
            "maxrss_incl_exit_mb": r["peak_rss_bytes"] / 1e6,
            "wall_s": r["wall_s"], "train_s": m["final"]["train_seconds"],
            "train_samples_per_s": m["final"]["samples_per_s"], "test_top1": m["final"]["test_top1"],
            "other CPU %": 100 * cont.other, "loadavg": load, "command": r["cmd"], "rss_trace_s_mb": [(round(t, 2), round(b / 1e6, 1))
                                                                   for t, b in r["trace"][::step]],
            "env": " ".join(f"{k}={v}" for k, v in env.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N")
    ap.add_argument("--reps", type=int, default=3, help="runs per (mode, N); medians are compared")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lru-mb", default="64,8",
                    help="comma-separated LRU sizes (MiB): also run the smallest and largest N with kdcache's reader "
                         "LRU set to each (bench/_kdtrain.py; '' = skip); kdcache's default is 16 MiB")
    ap.add_argument("--in-memory", action="store_true",
                    help="also run with kdtrain's default --cache-ram 1GiB (cache loaded whole), for contrast")
    args = ap.parse_args()
    common.setup_torch()
    wd = common.workdir("rss")
    sizes = [int(s) for s in args.sizes.split(",")]
    caches = {n: prepare(n, wd) for n in sizes}
    modes = [("stream", "0", None, sizes)]
    for mb in (float(x) for x in args.lru_mb.split(",") if x.strip()):
        modes.append((f"stream-lru{mb:g}M", "0", mb, [min(sizes), max(sizes)]))
    if args.in_memory:
        modes.append(("in-memory", "1GiB", None, sizes))
    runs = []
    for rep in range(args.reps):  # repetitions interleaved, so slow drifts hit every N alike
        for tag, ram, lru, ns in modes:
            for n in ns:
                r = run(n, caches[n], wd, args.batch_size, ram, tag, lru)
                r["rep"] = rep
                runs.append(r)
                print(f"  rep {rep} N={n:>9,} {tag:14s} peak RSS {r['peak_rss_mb']:.1f} MB "
                      f"(ru_maxrss {r['maxrss_incl_exit_mb']:.1f}), wall {r['wall_s']:.1f} s, "
                      f"{r['train_samples_per_s']:,.0f} samples/s", flush=True)
    rows = []
    for tag, _, _, ns in modes:
        for n in ns:
            rs = [r for r in runs if r["mode"] == tag and r["N"] == n]
            pk = [r["peak_rss_mb"] for r in rs]
            rows.append({"N": n, "mode": tag, "peak_rss_mb": common.median(pk), "peak min-max": f"{min(pk):.1f}-{max(pk):.1f}",
                         "maxrss_incl_exit_mb": common.median([r["maxrss_incl_exit_mb"] for r in rs]),
                         "end_rss_mb": common.median([r["end_rss_mb"] for r in rs]),
                         "train_s": common.median([r["train_s"] for r in rs]),
                         "train_samples_per_s": common.median([r["train_samples_per_s"] for r in rs]),
                         "runs": len(rs), "other CPU %": max(r["other CPU %"] for r in rs)})
    for tag, *_ in modes:
        base = next(r for r in rows if r["mode"] == tag and r["N"] == min(sizes))
        for r in rows:
            if r["mode"] == tag:
                r["delta_vs_smallest_mb"] = r["peak_rss_mb"] - base["peak_rss_mb"]
                r["maxrss_delta_mb"] = r["maxrss_incl_exit_mb"] - base["maxrss_incl_exit_mb"]
    cols = ["N", "mode", "peak_rss_mb", "peak min-max", "delta_vs_smallest_mb", "maxrss_incl_exit_mb",
            "maxrss_delta_mb", "end_rss_mb", "train_s", "train_samples_per_s", "runs", "other CPU %"]
    print()
    print(common.table(rows, cols))
    verdict = None
    for r in rows:
        if r["mode"].startswith("stream-lru") and r["N"] == max(sizes):
            print(f"\nwith the LRU set to {r['mode'][10:]}iB: median peak RSS({max(sizes):,}) - "
                  f"median peak RSS({min(sizes):,}) = {r['delta_vs_smallest_mb']:.1f} MB")
    if 10_000 in sizes and 1_000_000 in sizes:
        a = next(r for r in rows if r["mode"] == "stream" and r["N"] == 10_000)
        b = next(r for r in rows if r["mode"] == "stream" and r["N"] == 1_000_000)
        d = b["peak_rss_mb"] - a["peak_rss_mb"]
        verdict = {"delta_mb": d, "target_mb": TARGET_MB, "met": bool(d <= TARGET_MB),
                   "per_rep_delta_mb": [round(y["peak_rss_mb"] - x["peak_rss_mb"], 1) for x, y in zip(
                       [r for r in runs if r["mode"] == "stream" and r["N"] == 10_000],
                       [r for r in runs if r["mode"] == "stream" and r["N"] == 1_000_000])]}
        print(f"\ntarget: median peak RSS(1M) - median peak RSS(10k) = {d:.1f} MB (<= {TARGET_MB} MB: "
              f"{'met' if d <= TARGET_MB else 'MISSED'}); per repetition: {verdict['per_rep_delta_mb']}")
    common.write_results("rss", {"rows": rows, "runs": runs, "target": verdict, "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
