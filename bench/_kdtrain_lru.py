"""`kdtrain` with the streaming reader's LRU capped at $KDBENCH_LRU_MB MiB instead of kdcache's 64 MiB default.

Used by bench/rss.py to measure the proposed fix (an LRU sized to the sampler's prefetch windows rather than
a fixed 64 MiB). Patches only open_cache's default argument in this process; kdcache's files are untouched.
"""

import os
import sys

import kdcache.cache.reader as reader
from kdcache.cli import kdtrain_main

reader.open_cache.__defaults__ = (True, int(float(os.environ.get("KDBENCH_LRU_MB", "8")) * 2**20))

if __name__ == "__main__":
    sys.argv[0] = "kdtrain"
    kdtrain_main()
