"""Range dumps and `kdcache join`: what the join costs beside the dumps, and whether it equals one dump.

Teacher cnn_s (random weights) at 16 px on bench.synthdata:synthetic (KDBENCH_N samples, default 262,144),
full fp16 logits (10 classes; 16,384-row chunks), Zarr blosc-zstd, all in this process through
`kdcache.ops.dump.run_dump` and `kdcache.ops.join.join`:

  whole   one dump of all N samples
  ranges  P dumps of --rows cut at chunk multiples (P = --parts, default 4), as P machines would
  join    `kdcache join` of the P range caches into one cache

Reported: seconds, samples/s and the other processes' CPU share for each; the join's MB/s (bytes of the
joined cache on disk over its time) and its time as a share of the whole dump; and whether every array of
the joined cache is byte-identical to the whole dump's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from bench.common import (  # noqa: E402
    Contention,
    Timer,
    disk_bytes,
    quiet_gate,
    setup_torch,
    table,
    workdir,
    write_results,
)
from bench.synthdata import random_teacher  # noqa: E402

ARRAYS = ("values", "labels", "views", "done", "checksum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=262_144, help="samples (KDBENCH_N)")
    ap.add_argument("--parts", type=int, default=4, help="range caches to join")
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: the dump's, 16,384 here)")
    args = ap.parse_args()
    os.environ["KDBENCH_N"] = str(args.n)
    setup_torch()
    from kdcache.config import DumpConfig
    from kdcache.format.spec import Layout
    from kdcache.ops.dump import run_dump
    from kdcache.ops.join import join

    work = workdir("join")
    name, weights = random_teacher("cnn_s", 16, work)
    base = DumpConfig(teacher=name, weights=weights, dataset="bench.synthdata:synthetic", image_size=16,
                      progress=False, overwrite=True, chunk_rows=args.chunk_rows)
    chunk = Layout.for_dataset(args.n, args.n, 1, 10, None, "float16", base.chunk_rows).chunk_rows  # as the dump (auto)
    step = -(-args.n // args.parts // chunk) * chunk  # cut at chunk multiples: the byte-identical case
    cuts = [(s, min(s + step, args.n)) for s in range(0, args.n, step)]

    rows = []

    def measure(what: str, fn, n: int) -> float:
        quiet_gate()
        with Contention() as c, Timer() as t:
            fn()
        rows.append({"step": what, "samples": n, "seconds": t.s, "samples/s": n / t.s, "other CPU %": 100 * c.other})
        return t.s

    whole = str(work / "whole.zarr")
    t_whole = measure("dump, whole", lambda: run_dump(dataclasses.replace(base, out=whole)), args.n)
    parts = []
    for i, (a, b) in enumerate(cuts):
        out = str(work / f"part{i}.zarr")
        parts.append(out)
        measure(f"dump --rows {a}:{b}", lambda: run_dump(dataclasses.replace(base, out=out, rows=f"{a}:{b}")), b - a)
    joined = str(work / "joined.zarr")
    shutil.rmtree(joined, ignore_errors=True)
    t_join = measure(f"join of {len(parts)}", lambda: join(parts[::-1], joined), args.n)

    g, w = zarr.open_group(joined, mode="r"), zarr.open_group(whole, mode="r")
    identical = all(np.asarray(g[n][...]).tobytes() == np.asarray(w[n][...]).tobytes() for n in ARRAYS)
    mb = disk_bytes(joined) / 1e6
    summary = {"N": args.n, "parts": len(parts), "joined MB on disk": mb, "join MB/s": mb / t_join,
               "join time / whole dump time": t_join / t_whole,
               "range dumps time / whole dump time": sum(r["seconds"] for r in rows[1:-1]) / t_whole,
               "byte-identical to the whole dump": identical}
    print(table(rows))
    print(table([summary]))
    write_results("join", {"steps": rows, "summary": summary})


if __name__ == "__main__":
    main()
