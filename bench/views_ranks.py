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
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import torch
import zarr

from bench.common import REPO, Timer, disk_bytes, loadavg, setup_torch, table, workdir, write_results
from kdcache.config import DumpConfig
from kdcache.ops.dump import run_dump
from kdcache.models import build_model

ARRAYS = ("values", "labels", "views", "done", "checksum")


def _weights(work) -> str:
    torch.manual_seed(0)
    path = str(work / "cnn_s.pt")
    torch.save({"model": build_model("cnn_s", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, path)
    return path


def views_part(work, w: str) -> list[dict]:
    rows = []
    for v in (1, 8, 32):
        out = work / f"v{v}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        with Timer() as t:
            run_dump(DumpConfig(teacher="cnn_s", weights=w, out=str(out), views=v, augment="rrc(0.35,1)+flip",
                                image_size=32, progress=False, overwrite=True))
        n = 1437
        rows.append({"views V": v, "bytes/sample": disk_bytes(out) / n, "bytes/view": disk_bytes(out) / n / v,
                     "samples/s": n / t.s, "views/s": n * v / t.s, "seconds": t.s})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_part(work, w: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KDBENCH_N": "16384", "OMP_NUM_THREADS": "1"}
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
        with Timer() as t:
            subprocess.run(cmd, env=env1, cwd=work, check=True, capture_output=True)
        rows.append({"processes": procs, "threads each": 2 if procs == 1 else 1, "seconds": t.s,
                     "samples/s": 16384 / t.s})
    a, b = zarr.open_group(outs[1], mode="r"), zarr.open_group(outs[2], mode="r")
    identical = all(np.array_equal(a[n][...], b[n][...]) for n in ARRAYS)
    for r in rows:
        r["scaling vs 1"] = rows[0]["seconds"] / r["seconds"]
        r["byte-identical"] = identical
    return rows


def main() -> None:
    setup_torch()
    work = workdir("views_ranks")
    w = _weights(work)
    views = views_part(work, w)
    print(table(views))
    ranks = ranks_part(work, w)
    print(table(ranks))
    write_results("views_ranks", {"views": views, "ranks": ranks, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
