"""Write whole chunks from a background thread, so inference never waits on compression or disk."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.format.spec import BOOKKEEPING, Layout, view_checksum
from kdcache.storage.backends import Store


@dataclass
class Rows:
    """Consecutive rows [start, start + len) of one chunk; `ready` blocks until device copies land."""

    start: int
    arrays: dict[str, object]
    ready: Callable[[], None] | None = None


@dataclass
class _ChunkBuffer:
    arrays: dict[str, np.ndarray]
    filled: int = 0


class ChunkWriter:
    """Buffers rows into whole chunks and writes each chunk, its checksums and its done flag, in that order.

    A chunk is marked done only after all of its arrays are written, so a crash at any point
    leaves `done` true only for chunks that are whole.
    """

    def __init__(self, store: Store, layout: Layout, max_pending: int = 8) -> None:
        self.store, self.layout = store, layout
        self._q: queue.Queue[Rows | None] = queue.Queue(maxsize=max_pending)
        self._buffers: dict[int, _ChunkBuffer] = {}
        self._error: BaseException | None = None
        self.chunks_written = 0
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def put(self, rows: Rows) -> None:
        """Queue rows for writing; re-raises a writer failure in the caller's thread."""
        self._raise_if_failed()
        while True:
            try:
                self._q.put(rows, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Flush everything queued, stop the thread, and raise if any write failed."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else (e.strerror or str(e))
            raise KDCacheError(
                f"writing the cache at {self.store.path} failed ({reason}); the chunks already written are kept "
                "and the cache stays partial: fix the cause (e.g. free disk space) and rerun with --resume"
            )

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain so the producer never blocks
            try:
                self._add(item)
            except BaseException as e:  # surfaced to the producer by _raise_if_failed
                self._error = e

    def _add(self, rows: Rows) -> None:
        if rows.ready is not None:
            rows.ready()
        lay = self.layout
        c = rows.start // lay.chunk_rows
        sl = lay.chunk_slice(c)
        buf = self._buffers.get(c)
        if buf is None:
            buf = self._buffers[c] = self._new_buffer(sl.stop - sl.start)
        arrays = {k: np.asarray(v) for k, v in rows.arrays.items()}
        b = len(arrays["labels"])
        lo = rows.start - sl.start
        for name, a in arrays.items():
            buf.arrays[name][lo:lo + b] = a
        buf.filled += b
        if buf.filled == sl.stop - sl.start:
            self._write_chunk(c, sl, buf)
            del self._buffers[c]

    def _new_buffer(self, rows: int) -> _ChunkBuffer:
        shapes = self.layout.arrays()
        return _ChunkBuffer({name: np.zeros((rows, *shape[1:]), dtype=dtype)
                             for name, (shape, dtype, _) in shapes.items() if name not in BOOKKEEPING})

    def _write_chunk(self, c: int, sl: slice, buf: _ChunkBuffer) -> None:
        for name, a in buf.arrays.items():
            self.store[name][sl] = a
        crcs = [view_checksum({k: buf.arrays[k][:, v] for k in self.layout.per_view()})
                for v in range(self.layout.n_views)]
        self.store["checksum"][c:c + 1] = np.asarray([crcs], dtype=np.uint32)
        self.store["done"][c:c + 1] = np.ones(1, dtype=np.uint8)
        self.chunks_written += 1
