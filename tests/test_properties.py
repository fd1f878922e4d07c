"""Property: whatever layout, anything written through the real writer path reads back exactly.

Random N, C, k (None = full logits), chunk_rows, dtype, views, backend and compressor; random logits,
labels and view parameters are written with the code `kdcache dump` uses (io.output.Output creates the
staging store → io.writer.ChunkWriter, rows fed in random-sized pieces in random order → Output.finalize,
which also converts to HDF5), then read back with kdcache.io.open_cache. Every read(indices, view) must equal
what was written (after the float16 cast for float16 caches), bit for bit, streamed and loaded, and
verify() must find no problem.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from contextlib import ExitStack

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.data.datasets import labels_sha256
from kdcache.data.views import VIEW_FIELDS
from kdcache.format.attrs import cache_attrs
from kdcache.format.spec import REQUIRED_ATTRS, Layout
from kdcache.io.output import Output
from kdcache.io.reader import open_cache
from kdcache.io.writer import ChunkWriter, Rows
from kdcache.ops.verify import verify

MAX_CHUNKS = 40  # keeps one example well under a second: chunk_rows=1 still gets up to 40 samples


@st.composite
def layouts(draw):
    chunk_rows = draw(st.integers(1, 300))
    n = draw(st.integers(1, min(700, MAX_CHUNKS * chunk_rows)))
    c = draw(st.integers(2, 40))
    k = draw(st.one_of(st.none(), st.integers(1, c - 1)))
    backend = draw(st.sampled_from(["zarr", "h5"]))
    compressor = draw(st.sampled_from(["blosc-zstd", "blosc-lz4", "zstd", "gzip", "none"] if backend == "zarr"
                                      else ["gzip", "lzf", "none"]))
    return {"n": n, "num_classes": c, "k": k, "chunk_rows": chunk_rows, "n_views": draw(st.integers(1, 3)),
            "value_dtype": draw(st.sampled_from(["float16", "float32"])), "backend": backend,
            "compressor": compressor, "seed": draw(st.integers(0, 2**32 - 1))}


def _attrs(layout: Layout, labels: np.ndarray) -> dict:
    """A minimal valid attribute dict (every REQUIRED_ATTRS key), built as every command builds them."""
    a = cache_attrs(
        layout,
        teacher={"name": "random", "weights": {"source": "test"}, "params": 0, "arch_args": {},
                 "preprocess": {"image_size": 8}},
        dataset={"spec": "random", "split": "train", "n": layout.n, "num_classes": layout.num_classes,
                 "class_names": [str(i) for i in range(layout.num_classes)], "base_shape": [1, 8, 8],
                 "fingerprint": "sha256:0", "labelled": int((labels >= 0).sum()), "labels_sha256": labels_sha256(labels)},
        views={"fields": list(VIEW_FIELDS), "augment": "none", "seed": 0}, dump={}, command="test_properties")
    assert set(REQUIRED_ATTRS) <= set(a)
    return a


def _teacher_outputs(rng: np.random.Generator, lay: Layout) -> dict[str, np.ndarray]:
    """What a dump would store for random teacher logits: full values, or sorted top-k + indices + tail."""
    logits = (rng.standard_normal((lay.n, lay.n_views, lay.num_classes)) * rng.uniform(0.1, 30)).astype(np.float32)
    if rng.random() < 0.2:  # ties: the writer must keep whatever order it is given
        logits = np.round(logits)
    out = {"labels": rng.integers(-1, lay.num_classes, lay.n).astype(np.int64),
           "views": rng.random((lay.n, lay.n_views, len(VIEW_FIELDS))).astype(np.float32)}
    if lay.k is None:
        out["values"] = logits.astype(lay.value_dtype)
        return out
    order = np.argsort(-logits, axis=-1, kind="stable")
    top, rest = order[..., :lay.k], order[..., lay.k:]
    out["values"] = np.take_along_axis(logits, top, -1).astype(lay.value_dtype)
    out["indices"] = top.astype(np.int32)
    r = np.take_along_axis(logits, rest, -1).astype(np.float64)
    m = r.max(-1, keepdims=True)
    out["tail"] = (m[..., 0] + np.log(np.exp(r - m).sum(-1))).astype(np.float32)
    return out


def _pieces(rng: np.random.Generator, lay: Layout) -> list[tuple[int, int]]:
    """Every chunk cut into random-sized row ranges (never crossing a chunk), all shuffled."""
    out = []
    for c in range(lay.n_chunks):
        sl = lay.chunk_slice(c)
        cuts = sorted(set(rng.integers(sl.start + 1, sl.stop, rng.integers(0, 4)).tolist())) if sl.stop - sl.start > 1 \
            else []
        edges = [sl.start, *cuts, sl.stop]
        out += list(itertools.pairwise(edges))
    rng.shuffle(out)
    return out


def _write(path: str, lay: Layout, data: dict[str, np.ndarray], compressor: str, rng) -> None:
    output = Output(path, "dump", compressor=compressor)
    with ExitStack() as stack:
        output.prepare(lay, _attrs(lay, data["labels"]), stack)
        store = output.open()
        writer = ChunkWriter(store, lay, max_pending=int(rng.integers(1, 9)))
        try:
            for lo, hi in _pieces(rng, lay):
                writer.put(Rows(start=lo, arrays={name: a[lo:hi] for name, a in data.items()}))
        finally:
            writer.close()
        assert writer.chunks_written == lay.n_chunks
        output.finalize(store)
        store.close()
    output.cleanup()


def _check(cache, data: dict[str, np.ndarray], lay: Layout, rng) -> None:
    for v in range(lay.n_views):
        picks = [np.arange(lay.n), rng.integers(0, lay.n, int(rng.integers(1, 50))), np.array([lay.n - 1, 0, 0]),
                 np.zeros(0, dtype=np.int64)]
        for idx in picks:
            b = cache.read(idx, v)
            np.testing.assert_array_equal(b.values.numpy(), data["values"][idx, v], strict=True)
            assert b.values.numpy().tobytes() == data["values"][idx, v].tobytes()
            np.testing.assert_array_equal(b.labels.numpy(), data["labels"][idx], strict=True)
            np.testing.assert_array_equal(b.views.numpy(), data["views"][idx, v], strict=True)
            if lay.k is None:
                assert b.indices is None and b.tail is None
            else:
                np.testing.assert_array_equal(b.indices.numpy(), data["indices"][idx, v].astype(np.int64), strict=True)
                np.testing.assert_array_equal(b.tail.numpy(), data["tail"][idx, v], strict=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_anything_written_reads_back_exactly(p):
    rng = np.random.default_rng(p["seed"])
    lay = Layout(n=p["n"], n_views=p["n_views"], num_classes=p["num_classes"], k=p["k"],
                 value_dtype=p["value_dtype"], chunk_rows=min(p["chunk_rows"], p["n"]))
    data = _teacher_outputs(rng, lay)
    with tempfile.TemporaryDirectory(prefix="kdprop-") as d:
        path = os.path.join(d, "c.zarr" if p["backend"] == "zarr" else "c.h5")
        _write(path, lay, data, p["compressor"], rng)
        assert not os.path.exists(path + ".partial.zarr") and not os.path.exists(path + ".tmp")

        with open_cache(path) as cache:
            assert cache.complete and cache.n == lay.n and cache.n_views == lay.n_views and cache.k == lay.k
            assert cache.attrs["compressor"] == p["compressor"]
            _check(cache, data, lay, rng)          # streamed, chunk by chunk
            cache.load()
            _check(cache, data, lay, rng)          # decoded whole into memory
        with open_cache(path, lru_bytes=0) as cache:  # an LRU that keeps one chunk: every read decodes again
            _check(cache, data, lay, rng)

        problems, checked = verify(path)
        assert problems == []
        assert checked == {"chunks": lay.n_chunks, "views": lay.n_views, "n": lay.n}


@pytest.mark.parametrize("chunk_rows, n", [(1, 1), (1, 17), (300, 1), (300, 700), (7, 140)])
def test_edge_layouts(tmp_path, chunk_rows, n):
    """The corners the strategy may not draw in 25 examples."""
    rng = np.random.default_rng(n * 1000 + chunk_rows)
    for k, suffix in ((None, ".zarr"), (1, ".h5")):
        lay = Layout(n=n, n_views=2, num_classes=2, k=k, value_dtype="float16", chunk_rows=min(chunk_rows, n))
        data = _teacher_outputs(rng, lay)
        path = str(tmp_path / f"{k}-{chunk_rows}-{n}{suffix}")
        _write(path, lay, data, "none", rng)
        with open_cache(path) as cache:
            _check(cache, data, lay, rng)
        assert verify(path)[0] == []
