"""Read a cache: whole chunks decoded once, checksummed, kept in a small LRU and prefetched ahead."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.errors import KDCacheError
from kdcache.format.topk import q8_decode
from kdcache.format.spec import (
    FEATURE_PREFIX,
    STATUS_COMPLETE,
    Layout,
    check_version,
    is_structural,
    schema_problems,
    view_checksum,
)
from kdcache.storage.backends import Store, open_store
from kdcache.storage.paths import path_exists, staging_path

DEFAULT_LRU_BYTES = 16 << 20


@dataclass(frozen=True)
class CacheBatch:
    """Soft targets of a batch of samples for one view (torch tensors on CPU)."""

    values: torch.Tensor | None     # (B, C) full logits or (B, k) top-k logits; token caches (B, L, C or k); None
                                    # in a cache of sampled soft labels only
    indices: torch.Tensor | None    # (B, k) int64 class ids (top-k only); token caches (B, L, k)
    tail: torch.Tensor | None       # (B,) log-sum-exp of the logits not in the top-k (top-k only); (B, L)
    labels: torch.Tensor            # (B,) int64, -1 = unlabelled; token caches (B, L) next-token ids, -1 = padding
    views: torch.Tensor             # (B, 5) the view's crop/flip parameters
    sample_ids: torch.Tensor | None = None     # (B, M) int64 ids drawn from the teacher (count 0: unused slot)
    sample_counts: torch.Tensor | None = None  # (B, M) how often each id was drawn (sums to M)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher layer name -> (B, *shape) float32


class Cache:
    """An opened cache. `read(indices, view)` returns a CacheBatch; memory is bounded by the LRU."""

    def __init__(self, store: Store, lru_bytes: int = DEFAULT_LRU_BYTES, prefetch_workers: int = 2) -> None:
        self.store, self.path = store, store.path
        self.attrs = store.attrs
        check_version(self.attrs, self.path)
        damaged = [p for p in schema_problems(self.attrs) if is_structural(p)]
        if damaged:
            store.close()
            raise KDCacheError(f"{self.path} has damaged {damaged[0]}: run 'kdcache verify {self.path}', and dump or "
                               "fetch it again")
        self.layout = Layout.from_attrs(self.attrs)
        self._labels: np.ndarray | None = None
        try:
            self._checksums = np.asarray(store["checksum"][...], dtype=np.uint32)
        except Exception as e:  # damaged bookkeeping array
            store.close()
            raise KDCacheError(f"the checksum array of {self.path} cannot be read ({type(e).__name__}): run "
                               f"'kdcache verify {self.path}', and dump or fetch it again") from None
        self._lru: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._lru_bytes, self._lru_used = lru_bytes, 0
        self._inflight: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="kdcache-read")
        self._memory: dict[str, np.ndarray] | None = None
        self.chunks_decoded = 0

    # --- metadata -------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.layout.n

    def __len__(self) -> int:
        return self.layout.n

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def kind(self) -> str:
        return self.layout.kind

    @property
    def k(self) -> int | None:
        return self.layout.k

    @property
    def n_views(self) -> int:
        return self.layout.n_views

    @property
    def labels(self) -> np.ndarray:
        """All N labels, read on first use (reading batches does not need them: chunks carry their own)."""
        if self._labels is None:
            self._labels = np.asarray(self.store["labels"][...], dtype=np.int64)
        return self._labels

    @property
    def complete(self) -> bool:
        return self.attrs.get("status") == STATUS_COMPLETE

    def labels_sha256(self) -> str:
        """sha256 of the stored labels as int64 LE (compare with the attributes'), read chunk by chunk."""
        h = hashlib.sha256()
        for c in range(self.layout.n_chunks):
            sl = self.layout.chunk_slice(c)
            part = self._labels[sl] if self._labels is not None else self.store["labels"][sl]
            h.update(memoryview(np.ascontiguousarray(part, dtype="<i8")))
        return h.hexdigest()

    def check_labels(self) -> None:
        """Refuse a cache whose stored labels are not the ones its attributes hash (rows.labels_sha256 for a range
        cache, else dataset.labels_sha256)."""
        span = self.attrs.get("rows") if isinstance(self.attrs.get("rows"), dict) else self.attrs["dataset"]
        if self.labels_sha256() != span.get("labels_sha256"):
            raise KDCacheError(f"the labels stored in {self.path} differ from the labels_sha256 it records: it is "
                               f"damaged; run 'kdcache verify {self.path}', and dump or fetch it again")

    @property
    def sample_temperature(self) -> float:
        """The temperature its sampled soft labels were drawn at (1.0 when it has none)."""
        return float((self.attrs.get("sampling") or {}).get("temperature", 1.0))

    def done_map(self) -> np.ndarray:
        return np.asarray(self.store["done"][...], dtype=bool)

    def decoded_bytes(self) -> int:
        """Bytes the cache takes once decoded into memory (all views)."""
        return self.layout.decoded_bytes()

    def reserve(self, rows: int) -> None:
        """Raise the LRU bound to hold `rows` decoded rows of one view plus a chunk on each side: a loader that keeps
        windows of chunks in flight must not have them evicted before use (each eviction is a second decode)."""
        lay = self.layout
        per_row = lay.decoded_bytes() // max(lay.n * lay.n_views, 1)
        self._lru_bytes = max(self._lru_bytes, (rows + 2 * lay.chunk_rows) * per_row)

    # --- reading --------------------------------------------------------------------------------
    def read_chunk(self, c: int, view: int = 0) -> dict[str, np.ndarray]:
        """One chunk of one view (and its labels) as stored, checked against its stored CRC-32 (join copies these
        arrays as they are; readers want `decoded_chunk`)."""
        sl = self.layout.chunk_slice(c)
        where = f"chunk {c} (rows {sl.start}-{sl.stop - 1}, view {view}) of {self.path}"
        fix = f"the cache is corrupt; run 'kdcache verify {self.path}' and dump or fetch it again"
        try:
            rows = {n: np.asarray(self.store[n][sl, view]) for n in self.layout.per_view()}
            labels = np.asarray(self.store["labels"][sl], dtype=np.int64)
        except Exception as e:  # a truncated or damaged chunk fails to decode in library-specific ways
            raise KDCacheError(f"{where} cannot be read ({type(e).__name__}): {fix}") from None
        if view_checksum(rows) != int(self._checksums[c, view]):
            raise KDCacheError(f"{where} fails its checksum: {fix}")
        rows["labels"] = labels
        with self._lock:
            self.chunks_decoded += 1
        return rows

    def decoded_chunk(self, c: int, view: int = 0) -> dict[str, np.ndarray]:
        """`read_chunk` with q8 values decoded to float32 `values`."""
        rows = self.read_chunk(c, view)
        if "codes" in rows:
            rows["values"] = q8_decode(rows.pop("top"), rows.pop("codes"))
        return rows

    def load(self) -> None:
        """Decode the whole cache into memory (every chunk verified): the fastest reader when it fits."""
        lay = self.layout
        shapes = lay.decoded()
        out = {n: np.empty(s, dtype=d) for n, (s, d) in shapes.items() if n != "labels"}
        labels = np.empty(shapes["labels"][0], dtype=np.int64)
        for c in range(lay.n_chunks):
            for v in range(lay.n_views):
                rows = self.decoded_chunk(c, v)
                labels[lay.chunk_slice(c)] = rows.pop("labels")
                for n, a in rows.items():
                    out[n][lay.chunk_slice(c), v] = a
        self._memory, self._labels = out, labels

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def prefetch(self, chunks: Iterable[int], view: int = 0) -> None:
        """Start decoding these chunks in the background (no-op for chunks held or in flight)."""
        if self._memory is not None:
            return
        with self._lock:
            for c in chunks:
                key = (int(c), view)
                if key not in self._lru and key not in self._inflight:
                    self._inflight[key] = self._pool.submit(self.decoded_chunk, key[0], view)

    def release(self, chunks: Iterable[int], view: int = 0) -> None:
        """Drop these chunks of one view from the LRU: the caller is done with them (e.g. for this epoch)."""
        with self._lock:
            for c in chunks:
                rows = self._lru.pop((int(c), view), None)
                if rows is not None:
                    self._lru_used -= sum(a.nbytes for a in rows.values())

    def _chunk(self, c: int, view: int) -> dict[str, np.ndarray]:
        key = (c, view)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return hit
            fut = self._inflight.pop(key, None)
        rows = fut.result() if fut is not None else self.decoded_chunk(c, view)
        size = sum(a.nbytes for a in rows.values())
        with self._lock:
            old = self._lru.pop(key, None)  # another thread decoded it too: count it once
            if old is not None:
                self._lru_used -= sum(a.nbytes for a in old.values())
            self._lru[key] = rows
            self._lru_used += size
            while self._lru_used > self._lru_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_used -= sum(a.nbytes for a in old.values())
        return rows

    def read(self, indices: np.ndarray | torch.Tensor | list[int], view: int = 0) -> CacheBatch:
        """Soft targets for these sample indices (any order, repeats allowed) and one view.

        Streaming reads decode whole chunks (each checked against its CRC-32): batches drawn from a few
        chunks at a time (ChunkAwareSampler) are fast; uniformly random indices over a cache larger than
        the LRU decode a chunk per sample, so for such access call load() first.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"sample index out of range for a cache of {self.n} samples")
        if not 0 <= view < self.n_views:
            raise IndexError(f"view {view} out of range for a cache of {self.n_views} views")
        if self._memory is not None:
            picked = {n: a[idx, view] for n, a in self._memory.items()} | {"labels": self.labels[idx]}
        else:
            picked = self._gather(idx, view)
        t = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in picked.items()}
        layers = [f["layer"] for f in self.attrs.get("features") or ()]
        return CacheBatch(
            values=t.get("values"),
            indices=t["indices"].long() if "indices" in t else None,
            tail=t.get("tail"),
            labels=t["labels"],
            views=t["views"],
            sample_ids=t["sample_ids"].long() if "sample_ids" in t else None,
            sample_counts=t["sample_counts"].long() if "sample_counts" in t else None,
            features={layer: t[f"{FEATURE_PREFIX}{i}"].float() for i, layer in enumerate(layers)},
        )

    def _gather(self, idx: np.ndarray, view: int) -> dict[str, np.ndarray]:
        rows = self.layout.chunk_rows
        chunk_ids = idx // rows
        lay = self.layout
        out = {n: np.empty((len(idx), *lay.row_shape(n)), dtype=d) for n, (_, d) in lay.decoded().items()}
        for c in np.unique(chunk_ids):
            sel = np.nonzero(chunk_ids == c)[0]
            arrays = self._chunk(int(c), view)
            for n, a in arrays.items():
                out[n][sel] = a[idx[sel] - c * rows]
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_written(path: str) -> None:
    """An HDF5 cache appears only when complete: name its partial staging store instead of saying 'no cache'."""
    stage = staging_path(path)
    if stage != path and not path_exists(path) and path_exists(stage):
        raise KDCacheError(f"{path} is not written yet: a partial dump is at {stage}; finish it with "
                           "'kdcache dump ... --resume' (same command)")


def open_cache(path: str, require_complete: bool = True, lru_bytes: int = DEFAULT_LRU_BYTES) -> Cache:
    """Open a cache for reading; by default refuse one that is not `complete`."""
    check_written(path)
    cache = Cache(open_store(path, "r"), lru_bytes=lru_bytes)
    if require_complete and not cache.complete:
        done = int(cache.done_map().sum())
        cache.close()
        raise KDCacheError(
            f"{path} is a partial cache ({done} of {cache.layout.n_chunks} chunks written): finish it with "
            "'kdcache dump ... --resume' (same command) before using it"
        )
    return cache
