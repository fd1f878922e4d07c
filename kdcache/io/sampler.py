"""Chunk-aware sampling: shuffle chunk order, then samples within a window of chunks.

Each chunk is decoded once per epoch while the order stays well mixed; the sampler is
seeded per epoch (so a resumed run sees the same order) and can be split across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ChunkAwareSampler:
    """Yields batches (lists of sample indices); `windows()` tells the reader what to prefetch."""

    def __init__(self, n: int, chunk_rows: int, batch_size: int, window: int = 4, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.chunk_rows, self.batch_size = n, chunk_rows, batch_size
        self.window, self.seed, self.shuffle = max(1, window), seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_rows)

    def chunk_order(self) -> np.ndarray:
        """This rank's chunks, in this epoch's order."""
        order = np.arange(self.n_chunks)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return order[self.rank::self.world_size]

    def windows(self) -> list[np.ndarray]:
        order = self.chunk_order()
        return [order[i:i + self.window] for i in range(0, len(order), self.window)]

    def _window_samples(self, chunks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        idx = np.concatenate([np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n))
                              for c in chunks])
        return rng.permutation(idx) if self.shuffle else idx

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        carry = np.empty(0, dtype=np.int64)
        for chunks in self.windows():
            pool = np.concatenate([carry, self._window_samples(chunks, rng)])
            full = len(pool) // self.batch_size * self.batch_size
            for s in range(0, full, self.batch_size):
                yield pool[s:s + self.batch_size].tolist()
            carry = pool[full:]
        if len(carry):
            yield carry.tolist()

    def __len__(self) -> int:
        rows = sum(min((c + 1) * self.chunk_rows, self.n) - c * self.chunk_rows for c in self.chunk_order())
        return -(-rows // self.batch_size)
