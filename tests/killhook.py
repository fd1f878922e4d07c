"""Kill points for tests/test_crash_resume.py: make a `kdcache dump` hang at a chosen moment so it can be SIGKILLed.

Inert unless KILLHOOK_POINT is set in the environment: importing this module without it patches nothing.
With KILLHOOK_POINT (and KILLHOOK_MARKER, a file path) set, importing it patches one kdcache function so that
at that point the dump writes its pid to the marker file and sleeps until it is killed:

  a          before the first chunk is written
  b          mid-chunk: the values of chunk 5 written, its checksum and done flag not
  c, g,      just after chunk 7 is marked done (g: a token cache)
  lock, train
  d          finalisation: every chunk done, the status not flipped to complete yet
  e          HDF5 conversion half way: a partial <out>.h5.tmp on disk

Point f (hanging in the dataset, not in kdcache) is tests/killds.py, which calls `hang` from here.
"""

from __future__ import annotations

import os
import time

import numpy as np


def hang() -> None:
    """Write this process's pid to $KILLHOOK_MARKER (atomically), then sleep until killed."""
    marker = os.environ["KILLHOOK_MARKER"]
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    time.sleep(600)
    os._exit(97)  # never reached in a passing test: the test SIGKILLs us first


def install(point: str) -> None:
    """Patch kdcache so that a dump hangs at `point`; a point this module does not know patches nothing."""
    if point in ("a", "b", "c", "g", "lock", "train"):
        from kdcache.io import writer

        orig_write_chunk = writer.ChunkWriter._write_chunk

        def _write_chunk(self, c, sl, buf):
            if point == "a":
                hang()
            if point == "b" and c == 5:
                self.store["values"][sl] = buf.arrays["values"]
                hang()
            orig_write_chunk(self, c, sl, buf)
            if point in ("c", "g", "lock", "train") and c == 7:
                hang()

        writer.ChunkWriter._write_chunk = _write_chunk

    elif point == "d":
        from kdcache.io import output

        def _cache_stats(store, layout):
            hang()

        output.cache_stats = _cache_stats

    elif point == "e":
        import h5py

        from kdcache.io import output

        def _write_hdf5(src, dest, compressor, attrs):
            f = h5py.File(dest, "w")
            f.create_dataset("values", data=np.asarray(src["values"][:300]))
            f.flush()
            hang()

        output.write_hdf5 = _write_hdf5  # Output.finalize looks it up in kdcache.io.output: patched there


if os.environ.get("KILLHOOK_POINT"):
    install(os.environ["KILLHOOK_POINT"])
