"""Training batches: dataset samples beside the soft targets of one or more caches, one view per epoch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache.data.sources import SourceDataset
from kdcache.data.views import AugmentSpec, identity_views, sample_views
from kdcache.io.reader import Cache, CacheBatch
from kdcache.io.sampler import ChunkAwareSampler
from kdcache.train.losses import SoftTarget


MIX_BATCHES = 8  # a sampler window holds at least this many batches of samples ...
WINDOW_BYTES = 64 << 20  # ... as long as one window of a streamed cache decodes to at most this many bytes


def mixing_window(caches: list[Cache], batch_size: int, window: int = 4) -> int:
    """Chunks per sampler window for training: at least `window`, and enough for MIX_BATCHES batches, so that a batch
    mixes samples from many chunks even where a chunk holds few rows (full-logit token caches: 32 sequences is
    8 KB of contiguous text) — within WINDOW_BYTES of decoded chunks for a streamed cache (one held in memory
    costs nothing to window)."""
    if not caches:
        return window
    chunk_rows = max(c.layout.chunk_rows for c in caches)
    want = -(-MIX_BATCHES * batch_size // chunk_rows)
    streamed = [c.layout.decoded_bytes() // max(c.layout.n_chunks * c.layout.n_views, 1)
                for c in caches if not c.in_memory]
    cap = WINDOW_BYTES // max(max(streamed), 1) if streamed else want
    return max(window, min(want, cap))


@dataclass
class Batch:
    """Samples (base images or tensors, on device), labels, dataset indices, the views to render (images), and
    one SoftTarget per cache."""

    samples: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray
    views: torch.Tensor
    targets: list[SoftTarget]


def to_target(b: CacheBatch, num_classes: int, device: torch.device, samples: bool = False,
              sample_temperature: float = 1.0) -> SoftTarget:
    """A cache batch as loss input on the training device: its logits (float32), or with `samples` (or when the
    cache holds nothing else) its sampled soft labels; cached features ride along."""
    nb = device.type == "cuda"

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=nb)

    features = {k: dev(v) for k, v in b.features.items()}
    if samples or b.values is None:
        return SoftTarget(sample_ids=dev(b.sample_ids), sample_counts=dev(b.sample_counts), num_classes=num_classes,
                          sample_temperature=sample_temperature, features=features)
    if b.indices is None:
        return SoftTarget(logits=dev(b.values).float(), num_classes=num_classes, features=features)
    return SoftTarget(values=dev(b.values).float(), indices=dev(b.indices), tail=dev(b.tail).float(),
                      num_classes=num_classes, features=features)


def view_for_epoch(epoch: int, n_views: int, seed: int) -> int:
    """The stored view every sample uses this epoch: a seeded cycle through all V before any repeats.

    Views of different samples are drawn independently, so one view index per epoch is as random
    per sample as a per-sample choice, and it lets the reader decode just that view's chunks.
    """
    cycle, pos = divmod(epoch, n_views)
    return int(np.random.default_rng([seed, cycle, 2]).permutation(n_views)[pos])


class PairedLoader:
    """Iterates one epoch of Batches; cache chunks are prefetched a window ahead of use."""

    def __init__(self, ds: SourceDataset, caches: list[Cache], batch_size: int, seed: int = 0,
                 num_workers: int = 0, device: torch.device = torch.device("cpu"), shuffle: bool = True,
                 augment: AugmentSpec | None = None, window: int = 4, rank: int = 0, world_size: int = 1,
                 soft_labels: str = "auto") -> None:
        """`soft_labels` "samples" takes each cache's sampled soft labels rather than its logits (a cache of samples
        alone gives those whatever it says)."""
        self.ds, self.caches, self.device, self.seed = ds, caches, device, seed
        self.augment, self.samples = augment, soft_labels == "samples"
        chunk_rows = max([c.layout.chunk_rows for c in caches], default=max(len(ds), 1))
        self.sampler = ChunkAwareSampler(len(ds), chunk_rows, batch_size, window, seed, shuffle, rank, world_size)
        self.num_workers = num_workers
        for cache in caches:  # epoch() keeps the current window and the next one in flight
            cache.reserve(2 * window * chunk_rows)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        n_views = self.caches[0].n_views if self.caches else 1
        view = view_for_epoch(epoch, n_views, self.seed)
        windows = self.sampler.windows()
        loader = DataLoader(self.ds, batch_sampler=self.sampler, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        nb = self.device.type == "cuda"
        ends = np.cumsum([self._rows(w) for w in windows])
        last = [self._last_window(cache, windows) for cache in self.caches]
        seen_rows, fetched, released = 0, 0, 0
        for samples, labels, idx in loader:
            idx_np = idx.numpy()
            current = int(np.searchsorted(ends, seen_rows, side="right"))
            while fetched < min(current + 2, len(windows)):  # the current window and the next one
                for cache in self.caches:
                    cache.prefetch(self._cache_chunks(cache, windows[fetched]), view)
                fetched += 1
            if released < current:  # every sample of the windows before this one has been read
                for cache, cache_last in zip(self.caches, last):
                    cache.release([c for c, w in cache_last.items() if released <= w < current], view)
                released = current
            seen_rows += len(idx_np)
            cb = [cache.read(idx_np, view) for cache in self.caches]
            if cb:
                views = cb[0].views
            elif self.augment is not None:
                views = torch.from_numpy(sample_views(self.augment, idx_np, 1, self.seed + 7919 * (epoch + 1))[:, 0])
            else:
                views = torch.from_numpy(identity_views(len(idx_np))[:, 0])
            yield Batch(samples=samples.to(self.device, non_blocking=nb),
                        labels=labels.to(self.device, non_blocking=nb), indices=idx_np,
                        views=views.to(self.device, non_blocking=nb),
                        targets=[to_target(b, c.num_classes, self.device, self.samples, c.sample_temperature)
                                 for b, c in zip(cb, self.caches)])
        for cache, cache_last in zip(self.caches, last):  # the epoch is done: hold nothing until the next one
            cache.release([c for c, w in cache_last.items() if w >= released], view)

    def _rows(self, sampler_chunks: np.ndarray) -> int:
        r = self.sampler.chunk_rows
        return sum(min((c + 1) * r, len(self.ds)) - c * r for c in sampler_chunks)

    def _last_window(self, cache: Cache, windows: list[np.ndarray]) -> dict[int, int]:
        """cache chunk -> the last window of this epoch that reads from it (caches may chunk differently)."""
        return {c: w for w, chunks in enumerate(windows) for c in self._cache_chunks(cache, chunks)}

    def _cache_chunks(self, cache: Cache, sampler_chunks: np.ndarray) -> list[int]:
        """The cache's own chunk ids covering the sampler's chunks (caches may chunk differently)."""
        r = cache.layout.chunk_rows
        out: set[int] = set()
        for c in sampler_chunks:
            lo, hi = c * self.sampler.chunk_rows, min((c + 1) * self.sampler.chunk_rows, len(self.ds))
            out.update(range(lo // r, (hi - 1) // r + 1))
        return sorted(out)
