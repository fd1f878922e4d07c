"""Synthetic caches for the benchmarks, written through kdcache's own output path, with realistic logits.

`make_cache` writes a complete cache from `PrototypeTeacher` logits the way `kdcache dump` writes one:
format.attrs.cache_attrs -> io.output.Output (prepare -> open) -> io.writer.ChunkWriter -> Output.finalize ->
Output.cleanup, the logits turned into stored arrays by format.topk.to_topk. `convert_to_hdf5` copies one with
`kdcache convert` (ops.convert.convert). Both reuse what an earlier run made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import command_line, disk_bytes


# --------------------------------------------------------------------------- synthetic teacher logits
class PrototypeTeacher:
    """Realistic-looking teacher logits without a teacher: class prototypes plus noise.

    Each class c gets a random unit embedding e_c in R^dim; the prototype logit vector of class c is
    the cosine similarity to every class (e_c . e_j), so some classes are "similar" (dark knowledge).
    A sample of label y is "seen as" class y with probability `acc`, else as a random class; its logits
    are  s * proto[seen] + noise * N(0, 1)  with a per-sample confidence scale s ~ LogNormal(log(scale),
    spread).  With the defaults a 1000-class softmax is peaked (mean top-1 prob ~0.7, not one-hot, not
    uniform) -- compressibility depends on this, so uniform noise would be the wrong stand-in.
    Deterministic per (seed, chunk id).
    """

    def __init__(self, num_classes: int, seed: int = 0, dim: int | None = None, scale: float = 10.0,
                 spread: float = 0.35, noise: float = 1.0, acc: float = 0.85) -> None:
        import torch

        self.C, self.seed, self.scale, self.spread, self.noise, self.acc = num_classes, seed, scale, spread, noise, acc
        dim = dim or min(32, max(4, num_classes // 2))
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(num_classes, dim, generator=g)
        e = e / e.norm(dim=1, keepdim=True)
        self.protos = e @ e.T  # (C, C), diagonal 1

    def __call__(self, labels: np.ndarray, key: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(key) + 1)
        n = len(labels)
        lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)).clamp(min=0)
        wrong = torch.rand(n, generator=g) > self.acc
        seen = torch.where(wrong, torch.randint(0, self.C, (n,), generator=g), lab)
        s = torch.exp(math.log(self.scale) + self.spread * torch.randn(n, generator=g))
        return s[:, None] * self.protos[seen] + self.noise * torch.randn(n, self.C, generator=g)

    def describe(self) -> str:
        return (f"class-prototype logits: C={self.C}, s~LogNormal(log {self.scale}, {self.spread}), "
                f"noise sd {self.noise}, teacher 'accuracy' {self.acc}")


# --------------------------------------------------------------------------- synthetic caches
def _attrs(layout, *, dataset: dict, image_size: int, teacher: str) -> dict:
    """The cache's attributes, built by kdcache's own builder with the sections a dump records."""
    from kdcache.data.render import Preprocess
    from kdcache.data.views import VIEW_FIELDS, AugmentSpec
    from kdcache.format.attrs import cache_attrs

    pre, aug = Preprocess(image_size), AugmentSpec()
    return cache_attrs(
        layout,
        teacher={"name": teacher, "weights": {"source": "synthetic", "sha256": None, "params": 0}, "params": 0,
                 "arch_args": {}, "preprocess": pre.to_json()},
        dataset=dataset,
        views={"fields": list(VIEW_FIELDS), "augment": str(aug), "augment_spec": aug.to_json(), "seed": 0},
        dump={"teacher": teacher, "weights_sha256": None, "dataset": dataset["spec"], "split": dataset["split"],
              "fingerprint": dataset["fingerprint"], "topk": layout.k, "dtype": layout.value_dtype,
              "image_size": image_size, "batch_size": layout.chunk_rows, "chunk_rows": layout.chunk_rows,
              "views": 1, "augment": str(aug), "seed": 0, "rows": None},
        command=command_line())


def synthetic_dataset_attrs(labels: np.ndarray, num_classes: int, spec: str = "synthetic",
                            split: str = "train") -> dict:
    """Dataset identity for a cache that no dataset will be aligned against (reader benchmarks)."""
    from kdcache.data.datasets import labels_sha256

    lab = np.ascontiguousarray(labels, dtype="<i8")
    h = hashlib.sha256(b"bench-synthetic\0" + np.int64(len(lab)).tobytes() + lab.tobytes()).hexdigest()
    return {"spec": spec, "split": split, "n": len(lab), "num_classes": num_classes,
            "class_names": [str(i) for i in range(num_classes)],
            "input": {"kind": "image", "shape": [1, 8, 8], "dtype": "uint8"}, "base_shape": [1, 8, 8],
            "fingerprint": "sha256:" + h, "labels_sha256": labels_sha256(lab), "labelled": int((lab >= 0).sum())}


def dataset_attrs(ds) -> dict:
    """Dataset section for a real SourceDataset (kdcache.data.datasets.identity), so kdtrain's alignment passes."""
    from kdcache.data.datasets import identity

    return {"spec": ds.info.spec, "split": ds.info.split, **identity(ds), "input": ds.info.input_json(),
            "base_shape": list(ds.info.sample_shape), "labelled": int((ds.labels >= 0).sum())}


def write_chunks(output, layout, attrs: dict, labels: np.ndarray, chunk: Callable[[int], dict]) -> None:
    """Write a complete cache through kdcache's own lifecycle (Output: prepare, stage, finalize; ChunkWriter):
    `chunk(c)` gives chunk c's stored arrays, labels and identity views are added here."""
    from contextlib import ExitStack

    from kdcache.data.views import identity_views
    from kdcache.io.writer import ChunkWriter, Rows

    with ExitStack() as stack:
        output.prepare(layout, attrs, stack, overwrite=True)
        store = output.open()
        writer = ChunkWriter(store, layout)
        try:
            for c in range(layout.n_chunks):
                sl = layout.chunk_slice(c)
                arrays = dict(chunk(c), labels=np.asarray(labels[sl], dtype=np.int64),
                              views=identity_views(sl.stop - sl.start, 1))
                writer.put(Rows(start=sl.start, arrays=arrays))
        finally:
            writer.close()
        output.finalize(store)
        store.close()
    output.cleanup()


def make_cache(path: str | Path, *, labels: np.ndarray, num_classes: int, k: int | None = None,
               value_dtype: str = "float16", compressor: str | None = None, chunk_rows: int | None = None,
               dataset: dict | None = None, image_size: int = 32, seed: int = 0,
               logits_fn: Callable | None = None, reuse: bool = True, verbose: bool = True) -> dict:
    """Write a complete cache at `path` as `kdcache dump` writes one: Output.prepare (lock, staging store) ->
    ChunkWriter (whole chunks, checksums) -> Output.finalize (stats, status complete, HDF5 conversion) ->
    Output.cleanup.

    Logits come from `logits_fn(labels_chunk, chunk_id)` (default PrototypeTeacher) and go through the dump's
    top-k / tail / fp16 rule (kdcache.format.topk.to_topk). Chunks are sized as a dump sizes them (~1 MiB of
    values) unless `chunk_rows` is given. Reuses an existing cache made with the same parameters (a
    `<path>.bench.json` marker). Returns {"path", "seconds", "reused", "bytes"}.
    """
    from kdcache.format.spec import Layout
    from kdcache.format.topk import to_topk
    from kdcache.io.output import Output

    path = str(path)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    n = len(labels)
    layout = Layout.for_dataset(n, n, 1, num_classes, k, value_dtype, chunk_rows)
    output = Output(path, "write", compressor=compressor)
    dataset = dataset or synthetic_dataset_attrs(labels, num_classes)
    key = {"n": n, "C": num_classes, "k": k, "dtype": value_dtype, "compressor": output.compressor,
           "rows": layout.chunk_rows, "seed": seed, "fp": dataset["fingerprint"], "image_size": image_size,
           "gen": "default" if logits_fn is None else getattr(logits_fn, "__qualname__", "custom"),
           "labels": hashlib.sha256(labels.tobytes()).hexdigest()[:16]}
    marker = Path(path + ".bench.json")
    if reuse and marker.exists() and os.path.exists(path) and json.loads(marker.read_text()) == key:
        return {"path": path, "seconds": 0.0, "reused": True, "bytes": disk_bytes(path)}
    marker.unlink(missing_ok=True)
    gen = logits_fn or PrototypeTeacher(num_classes, seed)
    attrs = _attrs(layout, dataset=dataset, image_size=image_size, teacher="bench:prototype-teacher")
    t0 = time.perf_counter()

    def chunk(c: int) -> dict[str, np.ndarray]:
        lab = labels[layout.chunk_slice(c)]
        return {name: t.numpy() for name, t in to_topk(gen(lab, c)[:, None], k, value_dtype).items()}

    write_chunks(output, layout, attrs, labels, chunk)
    secs = time.perf_counter() - t0
    marker.write_text(json.dumps(key))
    if verbose:
        print(f"  made {path} ({n:,} x {k or num_classes}, {output.compressor}) in {secs:.1f} s", flush=True)
    return {"path": path, "seconds": secs, "reused": False, "bytes": disk_bytes(path)}


def convert_to_hdf5(zarr_path: str | Path, h5_path: str | Path, compressor: str = "gzip",
                    reuse: bool = True) -> dict:
    """Copy a complete Zarr cache into an HDF5 cache with `kdcache convert` (lossless, checked array by array)."""
    from kdcache.ops.convert import convert

    zarr_path, h5_path = str(zarr_path), str(h5_path)
    marker = Path(h5_path + ".bench.json")
    src_marker = Path(zarr_path + ".bench.json")
    key = {"src": zarr_path, "src_key": src_marker.read_text() if src_marker.exists() else None,
           "compressor": compressor}
    if reuse and marker.exists() and os.path.exists(h5_path) and json.loads(marker.read_text()) == key:
        return {"path": h5_path, "seconds": 0.0, "reused": True, "bytes": disk_bytes(h5_path)}
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    convert(zarr_path, h5_path, compressor, overwrite=True)
    marker.write_text(json.dumps(key))
    secs = time.perf_counter() - t0
    print(f"  made {h5_path} ({compressor}) in {secs:.1f} s", flush=True)
    return {"path": h5_path, "seconds": secs, "reused": False, "bytes": disk_bytes(h5_path)}
