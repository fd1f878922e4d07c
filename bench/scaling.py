"""Dump and train time and peak memory at 1x, 4x, 16x data (bench.synthdata:synthetic, N = 8,192 x s).

Each step is the real CLI in a subprocess (peak RSS = that child's ru_maxrss, from os.wait4):
  kdcache dump --teacher cnn_s --weights W --dataset bench.synthdata:synthetic --image-size 16 \
               --out WORK/synth_sN.zarr --overwrite --quiet                       (full fp16 logits, Zarr)
  kdtrain --cache WORK/synth_sN.zarr --dataset bench.synthdata:synthetic --student mlp --student-arg hidden=(64,) --epochs 1 --batch-size 512 \
          --cache-ram R --quiet --no-plots --out WORK/run_sN --overwrite
with R = 0 (streaming) and R = 1GiB (kdtrain's default: the cache is loaded whole when it fits).
cnn_s has random weights (speed only). Each run starts in a quiet window (bench/common.py quiet_gate) and
records the share of the machine other processes used meanwhile ("other CPU %"). KDBENCH_N sets N. The marginal rate (16x - 1x samples over the
time difference) removes fixed start-up costs (imports, teacher load, evaluation on the fixed 2,000-sample
test split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.synthdata import random_teacher  # noqa: E402

BASE = 8192


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=BASE)
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--image-size", type=int, default=16)
    args = ap.parse_args()
    common.setup_torch()
    wd = common.workdir("scaling")
    _, weights = random_teacher("cnn_s", args.image_size, wd)
    env0 = {"PYTHONPATH": str(common.REPO)}
    rows = []
    for s in (int(x) for x in args.scales.split(",")):
        n = args.base * s
        env = {**env0, "KDBENCH_N": str(n)}
        cache = wd / f"synth_s{s}.zarr"
        cmd = [common.venv_bin("kdcache"), "dump", "--teacher", "cnn_s", "--weights", weights,
               "--dataset", "bench.synthdata:synthetic", "--image-size", str(args.image_size),
               "--out", str(cache), "--overwrite", "--quiet"]
        load = common.loadavg()
        common.quiet_gate()
        with common.Contention() as cont:
            r = common.run_measured(cmd, env=env, log=wd / f"dump_s{s}.txt")
        if r["rc"]:
            sys.exit((wd / f"dump_s{s}.txt").read_text()[-2000:])
        rows.append({"stage": "dump", "scale": s, "N": n, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                     "samples/s": n / r["wall_s"],
                     "peak_rss_mb": r["peak_rss_bytes"] / 1e6, "cache_mb": common.disk_bytes(cache) / 1e6,
                     "other CPU %": 100 * cont.other, "loadavg": load, "command": r["cmd"]})
        print(f"  dump  x{s:<3d} N={n:>7,}  {r['wall_s']:6.1f} s  peak {r['peak_rss_bytes'] / 1e6:6.0f} MB", flush=True)
        for tag, ram in (("train stream", "0"), ("train in-memory", "1GiB")):
            out = wd / f"run_s{s}_{ram}"
            cmd = [common.venv_bin("kdtrain"), "--cache", str(cache), "--dataset", "bench.synthdata:synthetic", "--student", "mlp", "--student-arg",
                   "hidden=(64,)", "--epochs", "1", "--batch-size", "512", "--cache-ram", ram, "--quiet",
                   "--no-plots", "--out", str(out), "--overwrite"]
            load = common.loadavg()
            common.quiet_gate()
            with common.Contention() as cont:
                r = common.run_measured(cmd, env=env, log=wd / f"train_s{s}_{ram}.txt")
            if r["rc"]:
                sys.exit((wd / f"train_s{s}_{ram}.txt").read_text()[-2000:])
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"stage": tag, "scale": s, "N": n, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                         "samples/s": n / r["wall_s"],
                         "epoch samples/s": m["final"]["samples_per_s"], "peak_rss_mb": r["peak_rss_bytes"] / 1e6,
                         "other CPU %": 100 * cont.other, "loadavg": load, "command": r["cmd"]})
            print(f"  {tag:16s} x{s:<3d} {r['wall_s']:6.1f} s  peak {r['peak_rss_bytes'] / 1e6:6.0f} MB  "
                  f"epoch {m['final']['samples_per_s']:,.0f}/s", flush=True)
    for stage in ("dump", "train stream", "train in-memory"):
        st = [r for r in rows if r["stage"] == stage]
        lo, hi = st[0], st[-1]
        for r in st:
            r["x time vs 1x"] = r["wall_s"] / lo["wall_s"]
            r["peak +MB vs 1x"] = r["peak_rss_mb"] - lo["peak_rss_mb"]
        dt = hi["wall_s"] - lo["wall_s"]
        hi["marginal samples/s"] = (hi["N"] - lo["N"]) / dt if dt > 0.5 else None  # too small a difference to mean much
        dc = hi["cpu_s"] - lo["cpu_s"]
        hi["marginal samples/CPU-s"] = (hi["N"] - lo["N"]) / dc if dc > 0.5 else None
    cols = ["stage", "scale", "N", "wall_s", "cpu_s", "x time vs 1x", "samples/s", "marginal samples/s",
            "marginal samples/CPU-s", "epoch samples/s",
            "peak_rss_mb", "peak +MB vs 1x", "cache_mb", "other CPU %"]
    print()
    print(common.table(rows, cols))
    common.write_results("scaling", {"rows": rows, "base": args.base, "image_size": args.image_size})


if __name__ == "__main__":
    main()
