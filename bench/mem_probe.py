"""Where the memory goes: in-process RSS probes behind the findings of docs/BENCHMARKS.md §2 and §5.

Part 1 -- streaming kdtrain's setup, phase by phase, for N = 10,000 and 1,000,000 (the bench/rss.py caches
and dataset): open_cache (streaming, LRU 64 MiB and 8 MiB) -> open_dataset -> check_alignment -> one epoch of
PairedLoader batches (no model). Each phase: VmHWM growth over the RSS at its start (the peak is reset
with /proc/self/clear_refs) and the RSS it leaves behind.
Part 2 -- run_dump of cnn_s (random weights, 16 px) on bench.synthdata:synthetic for N = 8,192 and
524,288: RSS before and after dump._run_chunks, the dump's peak, what iterating dump.ChunkBatches (the
dump's batch_sampler) holds at its peak (tracemalloc), and the RSS given back by malloc_trim(0) afterwards.
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

from bench import common




def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def train_phases(n: int, lru_mb: float) -> list[dict]:
    os.environ["KDBENCH_N"] = str(n)
    common.setup_torch()
    from bench.rss import prepare
    from kdcache.io import open_cache
    from kdcache.data.datasets import open_dataset
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
    import torch

    from kdcache.ops import dump
    from kdcache.format.spec import Layout
    from kdcache.models import build_model

    wd = common.workdir("mem_probe")
    w = wd / "cnn_s_random16.pt"
    torch.manual_seed(0)
    torch.save(build_model("cnn_s", num_classes=10, input_shape=(3, 16, 16)).state_dict(), w)
    marks = {}
    orig = dump._run_chunks

    def run_chunks(*a, **k):
        marks["rss_before_loop"] = common.proc_status_bytes("VmRSS")
        _reset_peak()
        r = orig(*a, **k)
        marks["peak_in_loop"], marks["rss_after_loop"] = common.proc_status_bytes("VmHWM"), common.proc_status_bytes("VmRSS")
        return r

    dump._run_chunks = run_chunks
    dump.run_dump(dump.DumpConfig(teacher="cnn_s", weights=str(w), dataset="bench.synthdata:synthetic",
                                  image_size=16, out=str(wd / f"d{n}.zarr"), overwrite=True, progress=False))
    before = common.proc_status_bytes("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = before - common.proc_status_bytes("VmRSS")
    lay = Layout(n=n, n_views=1, num_classes=10, k=None, value_dtype="float16", chunk_rows=min(16384, n))
    tracemalloc.start()
    for _ in dump.ChunkBatches(lay, list(range(lay.n_chunks)), 256):
        pass
    list_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mb = lambda b: b / 1e6
    return {"N": n, "RSS before loop MB": mb(marks["rss_before_loop"]),
            "peak in loop MB": mb(marks["peak_in_loop"]), "loop peak +MB": mb(marks["peak_in_loop"] - marks["rss_before_loop"]),
            "RSS after loop MB": mb(marks["rss_after_loop"]), "malloc_trim gave back MB": mb(trimmed),
            "ChunkBatches peak MB": mb(list_bytes), "batches B/sample": list_bytes / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "LRU_MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, n, lru = args.child
        res = train_phases(int(n), float(lru)) if kind == "train" else dump_phases(int(n))
        print("RESULT " + json.dumps(res))
        return
    env = {**os.environ, "PYTHONPATH": str(common.REPO)}

    def child(*a: str):
        out = subprocess.run([sys.executable, __file__, "--child", *a], env=env, capture_output=True, text=True,
                             check=True, cwd=common.REPO).stdout
        return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])

    train = [row for n in (10_000, 1_000_000) for lru in (64, 8) for row in child("train", str(n), str(lru))]
    print(common.table(train))
    dumps = [child("dump", str(n), "0") for n in (8192, 524_288)]
    print()
    print(common.table(dumps))
    common.write_results("mem_probe", {"train_phases": train, "dump_phases": dumps})


if __name__ == "__main__":
    main()
