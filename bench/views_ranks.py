"""Multi-view caches and sharded dumps: bytes per sample and dump throughput for V ∈ {1, 8, 32} views,
and dump throughput with 1 vs 2 torchrun processes.

Part 1 -- views. Teacher cnn_s (random weights) at 32 px on digits train (1,437 images), full fp16
logits, Zarr blosc-zstd, `--augment 'rrc(0.35,1)+flip'`, V = 1, 8, 32, via
`kdcache.ops.dump.run_dump` in this process. Reported: bytes per sample on disk, samples/s and
teacher forward passes (views) /s.

Part 2 -- ranks. The same command as a subprocess, `python -m kdcache dump …` (1 process, 2 threads)
vs `torchrun --nproc-per-node 2 -m kdcache dump …` (2 processes × 1 thread), on
bench.synthdata:digits_tiled with KDBENCH_N=16384, teacher cnn_s, 32 px. Wall time includes process
start and imports (the same for both up to the second process); results must be byte-identical.
On a 2-core CPU this measures sharding overhead, not GPU scaling: each rank has one core.

Each measurement starts in a quiet window (bench/common.py quiet_gate) and records the share of the
machine other processes used meanwhile ("other CPU %").
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from bench.common import (  # noqa: E402
    REPO,
    Contention,
    Timer,
    disk_bytes,
    loadavg,
    quiet_gate,
    setup_torch,
    table,
    workdir,
    write_results,
)
from bench.synthdata import random_teacher  # noqa: E402

ARRAYS = ("values", "labels", "views", "done", "checksum")


def views_part(work: Path, w: str, views: list[int]) -> list[dict]:
    from kdcache.config import DumpConfig
    from kdcache.io import open_cache
    from kdcache.ops.dump import run_dump

    rows = []
    for v in views:
        out = work / f"v{v}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        quiet_gate()
        with Contention() as c, Timer() as t:
            run_dump(DumpConfig(teacher="cnn_s", weights=w, out=str(out), views=v, augment="rrc(0.35,1)+flip",
                                image_size=32, progress=False, overwrite=True))
        with open_cache(str(out)) as cache:
            n = cache.n
        rows.append({"views V": v, "bytes/sample": disk_bytes(out) / n, "bytes/view": disk_bytes(out) / n / v,
                     "samples/s": n / t.s, "views/s": n * v / t.s, "seconds": t.s, "other CPU %": 100 * c.other})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_part(work: Path, w: str, n: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KDBENCH_N": str(n), "OMP_NUM_THREADS": "1"}
    args = ["dump", "--teacher", "cnn_s", "--weights", w, "--dataset", "bench.synthdata:digits_tiled",
            "--image-size", "32", "--quiet", "--overwrite"]
    rows, outs = [], {}
    for procs in (1, 2):
        out = str(work / f"r{procs}.zarr")
        outs[procs] = out
        if procs == 1:
            cmd = [sys.executable, "-m", "kdcache", *args, "--out", out]
            env1 = env | {"OMP_NUM_THREADS": "2"}
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), "-m", "kdcache", *args, "--out", out]
            env1 = env
        quiet_gate()
        with Contention() as c, Timer() as t:
            p = subprocess.run(cmd, env=env1, cwd=work, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
        rows.append({"processes": procs, "threads each": 2 if procs == 1 else 1, "seconds": t.s,
                     "samples/s": n / t.s, "other CPU %": 100 * c.other})
    a, b = zarr.open_group(outs[1], mode="r"), zarr.open_group(outs[2], mode="r")
    identical = all(np.array_equal(a[name][...], b[name][...]) for name in ARRAYS)
    for r in rows:
        r["scaling vs 1"] = rows[0]["seconds"] / r["seconds"]
        r["byte-identical"] = identical
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="1,8,32", help="comma-separated V of part 1")
    ap.add_argument("--ranks-n", type=int, default=16384, help="samples of part 2 (KDBENCH_N)")
    args = ap.parse_args()
    setup_torch()
    work = workdir("views_ranks")
    _, w = random_teacher("cnn_s", 32, work)
    views = views_part(work, w, [int(v) for v in args.views.split(",")])
    print(table(views))
    ranks = ranks_part(work, w, args.ranks_n)
    print(table(ranks))
    write_results("views_ranks", {"views": views, "ranks": ranks, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
