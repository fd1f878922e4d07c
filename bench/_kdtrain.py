"""`kdtrain` (kdcache.cli.kdtrain_main, the console script's entry point) with two measurement hooks:

- KDBENCH_HWM_FILE: on the way out of kdtrain_main (before interpreter shutdown), write this process's
  VmHWM (peak RSS so far) and VmRSS (bytes) there. The kernel's ru_maxrss also counts a ~130 MB RSS spike that
  `import torch` alone causes at interpreter exit (measured: a script that only imports torch peaks
  ~130 MB above its steady RSS while exiting), which would hide the training-phase peak.
- KDBENCH_LRU_MB: cap the streaming reader's LRU at this many MiB instead of kdcache's 64 MiB default
  (patches only open_cache's default argument in this process; kdcache's files are untouched) -- used to
  measure a proposed fix.
"""

import os
import sys

from bench import common
from kdcache.io import reader
from kdcache.cli import kdtrain_main




if __name__ == "__main__":
    if os.environ.get("KDBENCH_LRU_MB"):
        reader.open_cache.__defaults__ = (True, int(float(os.environ["KDBENCH_LRU_MB"]) * 2**20))
    sys.argv[0] = "kdtrain"
    try:
        kdtrain_main()
    finally:
        if os.environ.get("KDBENCH_HWM_FILE"):
            with open(os.environ["KDBENCH_HWM_FILE"], "w") as f:
                f.write(f"{common.proc_status_bytes('VmHWM')} {common.proc_status_bytes('VmRSS')}")
