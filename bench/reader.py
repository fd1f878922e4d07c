"""Cache read throughput: random batches of 128 from caches larger than the reader's LRU.

Caches (synthetic class-prototype logits written through kdcache's output path, see bench/synthcache.py):
  topk   top-10 of 1000 classes, fp16, N = 2,000,000 (decodes to 128 MB)
  full   full 100-class logits, fp16, N = 500,000 (decodes to 110 MB)
each as Zarr (blosc-zstd, kdcache's default) and HDF5 (gzip, made by `kdcache convert`).

Every reader gets the same LRU budget, --lru-mb (default: kdcache's DEFAULT_LRU_BYTES, 16 MiB; the
published figures were measured with --lru-mb 64). All return values [+ indices, tail] and views:
  naive          plain zarr `arr.oindex[sorted unique idx]` / plain h5py `ds[sorted unique idx]` (default
                 1 MiB chunk cache), then unsort; uniformly random indices
  naive-h5-lru   plain h5py with a chunk cache of --lru-mb
  kdc-random     kdcache open_cache(lru_bytes).read() of uniformly random indices (LRU only)
  kdc-chunked    the reader under the chunk-aware sampler: ChunkAwareSampler batches (window 4) and
                 Cache.read, with Cache.prefetch of the next window and Cache.release of the windows left
                 behind (the schedule kdtrain's loader follows), no image loading
  kdc-chunked-cold  the same after evicting the cache files from the OS page cache (posix_fadvise)
  kdc-loader     kdtrain's own loader, kdcache.train.batches.PairedLoader, over a dataset of 1-byte tensor
                 samples: the reader plus DataLoader batching and SoftTarget conversion
  in-memory      Cache.load() (time reported separately) then Cache.read of random indices

Target: kdc-chunked >= 100k samples/s for top-10/1000 (streaming from disk).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench import common, synthcache

BATCH = 128
ARRAYS = ("values", "indices", "tail", "views")


def _timed_loop(step, seconds: float, max_batches: int, min_batches: int = 3) -> tuple[int, float]:
    """Run step() until `seconds` passed (at least min_batches); returns (samples, seconds)."""
    t0 = time.perf_counter()
    samples = batches = 0
    while batches < max_batches:
        samples += step()
        batches += 1
        if batches >= min_batches and time.perf_counter() - t0 >= seconds:
            break
    return samples, time.perf_counter() - t0


def naive_zarr(path: str, n: int, seconds: float, rng: np.random.Generator) -> dict:
    import zarr

    g = zarr.open_group(path, mode="r")
    arrs = {a: g[a] for a in ARRAYS if a in g}

    def step() -> int:
        idx = rng.integers(0, n, BATCH)
        uniq, inv = np.unique(idx, return_inverse=True)
        out = {a: np.asarray(arr.oindex[uniq, 0])[inv] for a, arr in arrs.items()}
        assert len(out["values"]) == BATCH
        return BATCH

    return dict(zip(("samples", "seconds"), _timed_loop(step, seconds, 10_000)))


def naive_h5(path: str, n: int, seconds: float, rng: np.random.Generator, rdcc: int | None = None) -> dict:
    import h5py

    f = h5py.File(path, "r") if rdcc is None else h5py.File(path, "r", rdcc_nbytes=rdcc)
    arrs = {a: f[a] for a in ARRAYS if a in f}

    def step() -> int:
        idx = rng.integers(0, n, BATCH)
        uniq, inv = np.unique(idx, return_inverse=True)  # h5py needs strictly increasing indices
        out = {a: ds[uniq, 0][inv] for a, ds in arrs.items()}
        assert len(out["values"]) == BATCH
        return BATCH

    try:
        return dict(zip(("samples", "seconds"), _timed_loop(step, seconds, 10_000)))
    finally:
        f.close()


def kdc_random(path: str, seconds: float, rng: np.random.Generator, lru: int) -> dict:
    from kdcache.io import open_cache

    with open_cache(path, lru_bytes=lru) as cache:
        n = cache.n

        def step() -> int:
            b = cache.read(rng.integers(0, n, BATCH))
            return len(b.values)

        s, t = _timed_loop(step, seconds, 10_000)
        return {"samples": s, "seconds": t, "chunks_decoded": cache.chunks_decoded}


def kdc_chunked(path: str, seconds: float, lru: int, seed: int = 0, cold: bool = False) -> dict:
    """Cache.read of chunk-aware batches, prefetching the next window and releasing the ones left behind."""
    from kdcache.io import open_cache
    from kdcache.io.sampler import ChunkAwareSampler

    if cold:
        common.drop_page_cache(path)
    t_open = time.perf_counter()
    with open_cache(path, lru_bytes=lru) as cache:
        open_s = time.perf_counter() - t_open
        r = cache.layout.chunk_rows
        sampler = ChunkAwareSampler(cache.n, r, BATCH, window=4, seed=seed)
        windows = sampler.windows()
        window_of = {int(c): w for w, chunks in enumerate(windows) for c in chunks}
        ahead, released, seen = -1, 0, 0
        t0 = time.perf_counter()
        for batch in sampler:
            w = window_of[batch[-1] // r]  # a batch's last sample is always from the window being read
            while ahead < min(w + 1, len(windows) - 1):  # this window and the next one
                ahead += 1
                cache.prefetch(windows[ahead])
            while released < w - 1:  # a window's leftovers may open the next one's first batch
                cache.release(windows[released])
                released += 1
            seen += len(cache.read(batch).values)
            if time.perf_counter() - t0 >= seconds:
                break
        dt = time.perf_counter() - t0
        return {"samples": seen, "seconds": dt, "chunks_decoded": cache.chunks_decoded, "open_s": open_s,
                "epoch_fraction": seen / cache.n}


def kdc_loader(path: str, seconds: float, lru: int) -> dict:
    """kdtrain's loader (PairedLoader: sampler, prefetch/release, DataLoader, SoftTargets) over 1-byte samples."""
    from kdcache.data.sources import TENSOR, ArrayDataset, DatasetInfo
    from kdcache.io import open_cache
    from kdcache.train.batches import PairedLoader

    with open_cache(path, lru_bytes=lru) as cache:
        info = DatasetInfo("bench:1-byte", "train", cache.num_classes, tuple(map(str, range(cache.num_classes))),
                           (1,), kind=TENSOR)
        ds = ArrayDataset(info, np.zeros((cache.n, 1), dtype=np.uint8), np.zeros(cache.n, dtype=np.int64), "N")
        seen = 0
        t0 = time.perf_counter()
        for batch in PairedLoader(ds, [cache], BATCH).epoch(0):
            seen += len(batch.labels)
            if time.perf_counter() - t0 >= seconds:
                break
        dt = time.perf_counter() - t0
        return {"samples": seen, "seconds": dt, "chunks_decoded": cache.chunks_decoded,
                "epoch_fraction": seen / cache.n}


def in_memory(path: str, seconds: float, rng: np.random.Generator, lru: int) -> dict:
    from kdcache.io import open_cache

    with open_cache(path, lru_bytes=lru) as cache:
        t0 = time.perf_counter()
        cache.load()
        load_s = time.perf_counter() - t0
        n = cache.n

        def step() -> int:
            return len(cache.read(rng.integers(0, n, BATCH)).values)

        s, t = _timed_loop(step, seconds, 1_000_000, min_batches=50)
        return {"samples": s, "seconds": t, "load_s": load_s, "decoded_mb": cache.decoded_bytes() / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-topk", type=int, default=2_000_000, help="samples in the top-10/1000 cache")
    ap.add_argument("--n-full", type=int, default=500_000, help="samples in the full 100-class cache")
    ap.add_argument("--seconds", type=float, default=4.0, help="time budget per naive/random measurement")
    ap.add_argument("--stream-seconds", type=float, default=8.0, help="time budget per chunk-aware measurement")
    ap.add_argument("--no-cold", action="store_true", help="skip the page-cache-evicted chunk-aware run")
    ap.add_argument("--lru-mb", type=float, default=None,
                    help="LRU of every reader, MiB (default: kdcache's DEFAULT_LRU_BYTES; the published run used 64)")
    args = ap.parse_args()
    common.setup_torch()
    from kdcache.io.reader import DEFAULT_LRU_BYTES

    lru = DEFAULT_LRU_BYTES if args.lru_mb is None else int(args.lru_mb * 2**20)
    wd = common.workdir("reader")
    rng = np.random.default_rng(0)

    specs = [("top-10/1000", args.n_topk, 1000, 10), ("full/100", args.n_full, 100, None)]
    rows, made = [], []
    for name, n, C, k in specs:
        labels = np.random.default_rng(1).integers(0, C, n)
        tag = f"{'top10' if k else 'full'}_c{C}_n{n}"
        z = synthcache.make_cache(wd / f"{tag}.zarr", labels=labels, num_classes=C, k=k)
        h = synthcache.convert_to_hdf5(z["path"], wd / f"{tag}.h5", "gzip")
        made += [{"cache": name, "backend": "zarr", **z}, {"cache": name, "backend": "hdf5", **h}]
        for backend, path in (("zarr", z["path"]), ("hdf5", h["path"])):
            print(f"[{name} {backend}] n={n:,}", flush=True)
            res = {}
            common.quiet_gate()
            with common.Contention() as cont:
                if backend == "zarr":
                    res["naive"] = naive_zarr(path, n, args.seconds, rng)
                else:
                    res["naive"] = naive_h5(path, n, args.seconds, rng)
                    res["naive-h5-lru"] = naive_h5(path, n, args.seconds, rng, rdcc=lru)
                res["kdc-random"] = kdc_random(path, args.seconds, rng, lru)
                res["kdc-chunked"] = kdc_chunked(path, args.stream_seconds, lru)
                if not args.no_cold:
                    res["kdc-chunked-cold"] = kdc_chunked(path, args.stream_seconds, lru, seed=1, cold=True)
                res["kdc-loader"] = kdc_loader(path, args.stream_seconds, lru)
                res["in-memory"] = in_memory(path, min(args.seconds, 2.0), rng, lru)
            base = res["naive"]["samples"] / res["naive"]["seconds"]
            chunked = res["kdc-chunked"]["samples"] / res["kdc-chunked"]["seconds"]
            for method, r in res.items():
                sps = r["samples"] / r["seconds"]
                rows.append({"cache": name, "N": n, "backend": backend, "reader": method,
                             "samples/s": sps, "x naive": sps / base, "x chunked": sps / chunked,
                             "note": _note(r), "other CPU %": 100 * cont.other, **{k2: v for k2, v in r.items() if k2 not in ("samples", "seconds")},
                             "samples": r["samples"], "seconds": r["seconds"]})
                print(f"  {method:17s} {sps:>12,.0f} samples/s  ({r['samples']:,} in {r['seconds']:.2f} s) {_note(r)}",
                      flush=True)

    cols = ["cache", "N", "backend", "reader", "samples/s", "x naive", "x chunked", "note", "other CPU %"]
    print()
    print(common.table(rows, cols))
    top = [r for r in rows if r["cache"] == "top-10/1000" and r["reader"] == "kdc-chunked"]
    verdict = {r["backend"]: {"samples_per_s": r["samples/s"], "target": 100_000,
                              "met": r["samples/s"] >= 100_000} for r in top}
    print("\ntarget (kdc-chunked, top-10/1000 >= 100k samples/s):",
          ", ".join(f"{b}: {v['samples_per_s']:,.0f} ({'met' if v['met'] else 'MISSED'})" for b, v in verdict.items()))
    common.write_results("reader", {"batch": BATCH, "lru_bytes": lru, "rows": rows, "caches": made,
                                    "target": verdict, "logits": synthcache.PrototypeTeacher(1000).describe()})


def _note(r: dict) -> str:
    parts = []
    if "load_s" in r:
        parts.append(f"load {r['load_s']:.2f} s ({r['decoded_mb']:.0f} MB)")
    if "chunks_decoded" in r:
        parts.append(f"{r['chunks_decoded']} chunks decoded")
    if "epoch_fraction" in r:
        parts.append(f"{100 * r['epoch_fraction']:.0f}% of an epoch")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
