"""Where the memory goes: in-process RSS probes behind the memory findings of bench/README.md.

Part 1 -- streaming kdtrain's setup, phase by phase, for N = 10,000 and 1,000,000 (the bench/rss.py caches
and dataset): open_cache (streaming, LRU 64 MiB and 8 MiB) -> open_dataset -> check_alignment -> one epoch of
PairedLoader batches (no model). Each phase: VmHWM growth over the RSS at its start (the peak is reset
with /proc/self/clear_refs) and the RSS it leaves behind.
Part 2 -- run_dump of cnn_s (random weights, 16 px) on bench.synthdata:synthetic for N = 8,192 and
524,288: RSS when the dump's inference loop starts and ends (marked through the public Output lifecycle:
common.DumpPhases), the loop's peak, what iterating ops.dump.ChunkBatches (the dump's batch_sampler) holds
at its peak (tracemalloc), and the RSS given back by malloc_trim(0) afterwards.
Each N runs in a fresh subprocess of this script.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def train_phases(n: int, lru_mb: float) -> list[dict]:
    os.environ["KDBENCH_N"] = str(n)
    common.setup_torch()
    from bench.rss import prepare
    from kdcache.data.datasets import open_dataset
    from kdcache.io import open_cache
    from kdcache.train.align import check_alignment
    from kdcache.train.batches import PairedLoader

    path = prepare(n, common.workdir("rss"))
    out = []

    def phase(name, fn):
        _reset_peak()
        r0 = common.proc_status_bytes("VmRSS")
        x = fn()
        out.append({"N": n, "lru_mb": lru_mb, "phase": name, "peak +MB": (common.proc_status_bytes("VmHWM") - r0) / 1e6,
                    "kept +MB": (common.proc_status_bytes("VmRSS") - r0) / 1e6})
        return x

    cache = phase("open_cache", lambda: open_cache(path, lru_bytes=int(lru_mb * 2**20)))
    ds = phase("open_dataset", lambda: open_dataset("bench.synthdata:synthetic", "train"))
    phase("check_alignment", lambda: check_alignment([cache], ds))
    loader = PairedLoader(ds, [cache], 1024)
    phase("one epoch (loader only)", lambda: [None for _ in loader.epoch(0)])
    return out


def dump_phases(n: int) -> dict:
    import tracemalloc

    os.environ["KDBENCH_N"] = str(n)
    common.setup_torch()
    from bench.synthdata import random_teacher
    from kdcache.config import DumpConfig
    from kdcache.format.spec import Layout
    from kdcache.ops.dump import ChunkBatches, run_dump

    wd = common.workdir("mem_probe")
    name, w = random_teacher("cnn_s", 16, wd)
    marks = {}

    def loop_starts() -> None:
        marks["rss_before_loop"] = common.proc_status_bytes("VmRSS")
        _reset_peak()

    def loop_ends() -> None:
        marks["peak_in_loop"], marks["rss_after_loop"] = (common.proc_status_bytes("VmHWM"),
                                                          common.proc_status_bytes("VmRSS"))

    cfg = DumpConfig(teacher=name, weights=w, dataset="bench.synthdata:synthetic", image_size=16,
                     out=str(wd / f"d{n}.zarr"), overwrite=True, progress=False)
    with common.DumpPhases(opened=loop_starts, finalizing=loop_ends):
        run_dump(cfg)
    before = common.proc_status_bytes("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = before - common.proc_status_bytes("VmRSS")
    lay = Layout.for_dataset(n, n, 1, 10, None, "float16")
    tracemalloc.start()
    for _ in ChunkBatches(lay, list(range(lay.n_chunks)), cfg.batch_size):
        pass
    list_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mb = lambda b: b / 1e6
    return {"N": n, "RSS before loop MB": mb(marks["rss_before_loop"]),
            "peak in loop MB": mb(marks["peak_in_loop"]),
            "loop peak +MB": mb(marks["peak_in_loop"] - marks["rss_before_loop"]),
            "RSS after loop MB": mb(marks["rss_after_loop"]), "malloc_trim gave back MB": mb(trimmed),
            "ChunkBatches peak MB": mb(list_bytes), "batches B/sample": list_bytes / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sizes", default="10000,1000000", help="comma-separated N of part 1")
    ap.add_argument("--lru-mb", default="64,8", help="comma-separated LRU caps (MiB) of part 1")
    ap.add_argument("--dump-sizes", default="8192,524288", help="comma-separated N of part 2")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "LRU_MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, n, lru = args.child
        res = train_phases(int(n), float(lru)) if kind == "train" else dump_phases(int(n))
        print("RESULT " + json.dumps(res))
        return
    common.setup_torch()
    env = {**os.environ, "PYTHONPATH": str(common.REPO)}

    def child(*a: str):
        p = subprocess.run([sys.executable, __file__, "--child", *a], env=env, capture_output=True, text=True,
                           cwd=common.REPO)
        if p.returncode:
            sys.exit(f"mem_probe --child {' '.join(a)} failed:\n{p.stderr[-2000:]}")
        return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])

    train = [row for n in args.train_sizes.split(",") for lru in args.lru_mb.split(",")
             for row in child("train", n, lru)]
    print(common.table(train))
    dumps = [child("dump", n, "0") for n in args.dump_sizes.split(",")]
    print()
    print(common.table(dumps))
    common.write_results("mem_probe", {"train_phases": train, "dump_phases": dumps})


if __name__ == "__main__":
    main()
