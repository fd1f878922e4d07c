"""The reader (open_cache / Cache.read / load) and the chunk-aware sampler."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
import zarr
from clitools import copy_cache

from kdcache.errors import KDCacheError
from kdcache.format.spec import READER_MAJOR
from kdcache.io import open_cache
from kdcache.io.sampler import ChunkAwareSampler

N, ROWS = 1437, 100
N_CHUNKS = -(-N // ROWS)


@pytest.fixture(scope="module", params=[".zarr", ".h5"])
def topk_cache(request, dump_cache):
    return dump_cache(request.param, "--topk", 3, "--chunk-rows", ROWS)


@pytest.fixture(scope="module")
def multiview_cache(dump_cache):
    return dump_cache(".zarr", "--views", 2, "--augment", "translate(0.1)+flip", "--chunk-rows", ROWS)


def _chunk_bytes(cache) -> int:
    """Decoded bytes of one full chunk of one view (values, indices, tail, views, and the chunk's labels)."""
    r = cache.layout.chunk_rows
    return sum(r * int(np.prod(shape[2:], dtype=np.int64)) * np.dtype(dtype).itemsize
               for name, (shape, dtype, _) in cache.layout.arrays().items()
               if name in ("values", "indices", "tail", "views", "labels"))


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_read_matches_plain_indexing(dump_cache, read_plain, topk_cache, kind):
    path = topk_cache if kind == "topk" else dump_cache(".zarr", "--chunk-rows", ROWS)
    arrays, _ = read_plain(path)
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.integers(0, N, 200), [N - 1, 0, 0, 517, N - 1, 517]])  # unsorted, repeated
    with open_cache(path) as cache:
        assert cache.n == N and cache.layout.n_chunks == N_CHUNKS and cache.complete
        for batch in (cache.read(idx), cache.read(torch.from_numpy(idx)), cache.read(idx.tolist())):
            np.testing.assert_array_equal(batch.values.numpy(), arrays["values"][idx, 0])
            np.testing.assert_array_equal(batch.labels.numpy(), arrays["labels"][idx])
            np.testing.assert_array_equal(batch.views.numpy(), arrays["views"][idx, 0])
            if kind == "topk":
                assert batch.indices.dtype == torch.int64
                np.testing.assert_array_equal(batch.indices.numpy(), arrays["indices"][idx, 0])
                np.testing.assert_array_equal(batch.tail.numpy(), arrays["tail"][idx, 0])
            else:
                assert batch.indices is None and batch.tail is None
        with pytest.raises(IndexError):
            cache.read([N])
        with pytest.raises(IndexError):
            cache.read([0], view=1)


def test_read_empty_batch(topk_cache):
    with open_cache(topk_cache) as cache:
        b = cache.read(np.zeros(0, dtype=np.int64))
        assert b.values.shape == (0, 3) and b.indices.shape == (0, 3) and b.tail.shape == (0,)


def test_read_each_view(multiview_cache, read_plain):
    arrays, _ = read_plain(multiview_cache)
    idx = np.array([5, 1400, 3, 5, 999])
    with open_cache(multiview_cache) as cache:
        assert cache.n_views == 2
        for v in range(2):
            b = cache.read(idx, view=v)
            np.testing.assert_array_equal(b.values.numpy(), arrays["values"][idx, v])
            np.testing.assert_array_equal(b.views.numpy(), arrays["views"][idx, v])


def test_lru_stays_bounded(topk_cache):
    with open_cache(topk_cache, lru_bytes=1) as probe:
        chunk = _chunk_bytes(probe)
    bound = int(2.5 * chunk)
    with open_cache(topk_cache, lru_bytes=bound) as cache:
        for rep in range(2):
            for c in range(N_CHUNKS):
                cache.read([c * ROWS, min(c * ROWS + 7, N - 1)])
                assert cache._lru_used <= bound + chunk
                assert len(cache._lru) <= 3
        assert cache.chunks_decoded == 2 * N_CHUNKS  # nothing held long enough to be reused


def test_chunk_aware_order_decodes_each_chunk_once(topk_cache):
    with open_cache(topk_cache, lru_bytes=1) as probe:
        chunk = _chunk_bytes(probe)
    lru = 9 * chunk  # two windows of 4 chunks (plus slack); far fewer than the 15 chunks
    sampler = ChunkAwareSampler(N, ROWS, batch_size=32, window=4, seed=0)
    with open_cache(topk_cache, lru_bytes=lru) as cache:
        seen = []
        for batch in sampler:
            np.testing.assert_array_equal(cache.read(batch).labels.numpy(), cache.labels[batch])
            seen += batch
        assert sorted(seen) == list(range(N))
        assert cache.chunks_decoded == N_CHUNKS
    # A uniform random order with the same LRU: each batch of 32 touches most chunks, so the LRU thrashes.
    order = np.random.default_rng(0).permutation(N)
    with open_cache(topk_cache, lru_bytes=lru) as cache:
        for s in range(0, 8 * 32, 32):  # a quarter of an epoch is enough to show it
            cache.read(order[s:s + 32])
        assert cache.chunks_decoded > 3 * N_CHUNKS


def test_load_equals_streaming(topk_cache):
    idx = np.random.default_rng(1).integers(0, N, 300)
    with open_cache(topk_cache, lru_bytes=1) as stream, open_cache(topk_cache) as mem:
        mem.load()
        assert mem.in_memory and not stream.in_memory
        a, b = stream.read(idx), mem.read(idx)
        for field in ("values", "indices", "tail", "labels", "views"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0)
        assert mem.decoded_bytes() == N * sum(
            int(np.prod(s[2:], dtype=np.int64)) * np.dtype(d).itemsize
            for n, (s, d, _) in mem.layout.arrays().items() if n in ("values", "indices", "tail", "views"))


def test_corrupt_chunk_is_detected(topk_cache, tmp_path):
    """Chunk 3's values replaced by chunk 4's (valid, decodable data) without updating the checksum."""
    path = copy_cache(topk_cache, tmp_path)
    if path.endswith(".zarr"):
        g = zarr.open_group(path, mode="r+")
        g["values"][300:400] = g["values"][400:500]
    else:
        with h5py.File(path, "r+") as f:
            f["values"][300:400] = f["values"][400:500]
    with open_cache(path) as cache:
        cache.read([0, 299, 400, N - 1])  # other chunks still read
        with pytest.raises(KDCacheError, match=r"chunk 3\b.*checksum"):
            cache.read([350])
    with open_cache(path) as cache, pytest.raises(KDCacheError, match=r"chunk 3\b"):
        cache.load()


def test_partial_cache_is_refused(dump_cache, tmp_path):
    path = copy_cache(dump_cache(".zarr", "--topk", 3, "--chunk-rows", ROWS), tmp_path)
    g = zarr.open_group(path, mode="r+")
    attrs = dict(g.attrs["kdcache"])
    attrs["status"] = "partial"
    g.attrs["kdcache"] = attrs
    g["done"][5] = 0
    with pytest.raises(KDCacheError, match="--resume"):
        open_cache(path)
    with open_cache(path, require_complete=False) as cache:  # still inspectable, e.g. by `kdcache info`
        assert not cache.complete and int(cache.done_map().sum()) == N_CHUNKS - 1
    # an HDF5 cache whose dump never finished exists only as its staging Zarr
    shutil.copytree(path, tmp_path / "x.h5.partial.zarr")
    with pytest.raises(KDCacheError, match="--resume"):
        open_cache(str(tmp_path / "x.h5"))


def test_missing_or_foreign_cache(tmp_path):
    with pytest.raises(KDCacheError, match="no cache"):
        open_cache(str(tmp_path / "nope.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["something"] = 1
    with pytest.raises(KDCacheError, match="not a kdcache cache"):
        open_cache(str(tmp_path / "other.zarr"))


def test_newer_major_version_is_refused(dump_cache, tmp_path):
    path = copy_cache(dump_cache(".zarr", "--topk", 3, "--chunk-rows", ROWS), tmp_path)
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {"version": f"{READER_MAJOR + 1}.0"}
    with pytest.raises(KDCacheError, match=f"version {READER_MAJOR + 1}.0"):
        open_cache(path)
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {"version": "1.7"}  # newer minor: readable
    with open_cache(path) as cache:
        assert cache.n == N


# --- ChunkAwareSampler -------------------------------------------------------------------------

def _epoch(sampler: ChunkAwareSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len(b) == sampler.batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= sampler.batch_size
    return [i for b in batches for i in b]


def test_sampler_covers_every_index_once_per_epoch():
    s = ChunkAwareSampler(N, ROWS, batch_size=64, window=3, seed=7)
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    assert sorted(e0) == list(range(N)) and sorted(e1) == list(range(N))
    assert e0 != e1
    assert e0 == _epoch(ChunkAwareSampler(N, ROWS, batch_size=64, window=3, seed=7), 0)
    assert e0 != _epoch(ChunkAwareSampler(N, ROWS, batch_size=64, window=3, seed=8), 0)
    assert e0 != list(range(N))


def test_sampler_windows_are_local():
    """Every batch draws from at most the current window of chunks plus the previous window's leftovers."""
    s = ChunkAwareSampler(N, ROWS, batch_size=32, window=2, seed=0)
    for batch in s:
        assert len({i // ROWS for i in batch}) <= 4


def test_sampler_unshuffled_is_sequential():
    s = ChunkAwareSampler(N, ROWS, batch_size=50, shuffle=False)
    assert _epoch(s, 0) == list(range(N)) == _epoch(s, 3)


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_ranks_split_disjoint_and_covering(world):
    parts = [_epoch(ChunkAwareSampler(N, ROWS, batch_size=32, seed=3, rank=r, world_size=world), 2)
             for r in range(world)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(N))  # disjoint and covering
    assert all(len(p) > 0 for p in parts)
    chunk_sets = [{i // ROWS for i in p} for p in parts]
    assert all(not (a & b) for j, a in enumerate(chunk_sets) for b in chunk_sets[j + 1:])  # whole chunks per rank


def test_loader_releases_each_window_once_read(topk_cache):
    """With an LRU big enough for the whole cache, PairedLoader still holds only the current and next window."""
    from kdcache.data.datasets import open_dataset
    from kdcache.train.batches import PairedLoader

    ds = open_dataset("digits", "train")
    with open_cache(topk_cache, lru_bytes=1 << 30) as cache:
        loader = PairedLoader(ds, [cache], batch_size=64, seed=1, window=2)
        windows_held, seen = [], []
        for batch in loader.epoch(0):
            seen.append(len(batch.labels))
            windows_held.append(len(cache._lru))
        assert sum(seen) == N and cache.chunks_decoded == N_CHUNKS  # every chunk decoded once
        assert max(windows_held) <= 2 * 2  # the current and the next window of two chunks each
        assert not cache._lru and cache._lru_used == 0  # and nothing is held between epochs
    with open_cache(topk_cache, lru_bytes=1 << 30) as cache:  # without the loader nothing is dropped
        for c in range(N_CHUNKS):
            cache.read([c * ROWS])
        assert len(cache._lru) == N_CHUNKS
        cache.release(range(N_CHUNKS - 3))
        assert sorted(k[0] for k in cache._lru) == list(range(N_CHUNKS - 3, N_CHUNKS))
        assert cache._lru_used == (N - (N_CHUNKS - 3) * ROWS) * (_chunk_bytes(cache) // ROWS)  # rows left


def test_loader_raises_a_small_lru_to_two_windows(topk_cache):
    """An LRU smaller than the chunks the loader keeps in flight would evict them before use and decode each
    chunk again: the loader raises it to two windows, so every chunk is decoded once."""
    from kdcache.data.datasets import open_dataset
    from kdcache.train.batches import PairedLoader

    ds = open_dataset("digits", "train")
    with open_cache(topk_cache, lru_bytes=1) as cache:
        loader = PairedLoader(ds, [cache], batch_size=64, seed=1, window=2)
        assert sum(len(batch.labels) for batch in loader.epoch(0)) == N
        assert cache.chunks_decoded == N_CHUNKS
        assert cache._lru_bytes == (2 * 2 + 2) * ROWS * cache.decoded_bytes() // N < cache.decoded_bytes()


def test_loader_with_differently_chunked_caches_decodes_each_chunk_once(dump_cache):
    """A cache chunk that spans two sampler windows is kept until the later one is done."""
    from kdcache.data.datasets import open_dataset
    from kdcache.train.batches import PairedLoader

    ds = open_dataset("digits", "train")
    small, big = dump_cache(".zarr", "--chunk-rows", 64), dump_cache(".zarr", "--chunk-rows", 100)
    with open_cache(small, lru_bytes=1 << 30) as a, open_cache(big, lru_bytes=1 << 30) as b:
        loader = PairedLoader(ds, [a, b], batch_size=50, seed=2, window=1)
        for epoch in range(3):  # later epochs may reuse chunks the last one left in the LRU: never more
            a.chunks_decoded = b.chunks_decoded = 0
            assert sum(len(batch.labels) for batch in loader.epoch(epoch)) == N
            assert a.chunks_decoded <= a.layout.n_chunks and b.chunks_decoded <= b.layout.n_chunks
            if epoch == 0:
                assert (a.chunks_decoded, b.chunks_decoded) == (a.layout.n_chunks, b.layout.n_chunks)


def test_lru_counts_a_chunk_decoded_by_two_threads_once(topk_cache, monkeypatch):
    import threading
    import time

    with open_cache(topk_cache, lru_bytes=1 << 30) as cache:
        slow = cache.read_chunk

        def read_chunk(c, view=0):
            time.sleep(0.05)  # every thread misses the LRU and decodes the chunk itself
            return slow(c, view)

        monkeypatch.setattr(cache, "read_chunk", read_chunk)
        threads = [threading.Thread(target=cache.read, args=([5],)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = sum(a.nbytes for rows in cache._lru.values() for a in rows.values())
        assert cache.chunks_decoded >= 2 and cache._lru_used == held == _chunk_bytes(cache)
        cache.release([0])
        assert cache._lru_used == 0 and not cache._lru


def test_training_window_holds_several_batches_within_a_byte_cap(topk_cache):
    """kdtrain's sampler window spans at least MIX_BATCHES batches where chunks hold few rows (a full-logit token
    cache), but never more decoded bytes than WINDOW_BYTES for a streamed cache; a cache in memory is not capped."""
    from kdcache.train import batches
    from kdcache.train.batches import mixing_window

    with open_cache(topk_cache) as cache:
        per_chunk = cache.decoded_bytes() // N_CHUNKS
        assert mixing_window([], 64) == 4
        assert mixing_window([cache], 10) == 4  # 8 batches of 10 fit in 4 chunks of ROWS
        assert mixing_window([cache], 64) == -(-8 * 64 // ROWS)
        old = batches.WINDOW_BYTES
        try:
            batches.WINDOW_BYTES = 5 * per_chunk
            assert mixing_window([cache], 256) == 5  # capped by bytes
            cache.load()
            assert mixing_window([cache], 256) == -(-8 * 256 // ROWS)  # held in memory: no cap
        finally:
            batches.WINDOW_BYTES = old
