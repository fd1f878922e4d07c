"""Constants and helpers of the sharing tests (tests/test_share.py, tests/test_remote.py).

Their fixtures `share_dir`, `share_teacher` and `share_cache` (an 8 px mlp teacher and its caches of ROWS-row
chunks) are in tests/conftest.py; their `kdcache dump` arguments come from clitools.dump_args.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

N_TRAIN, N_TEST, C = 1437, 360, 10
ROWS = 128
N_CHUNKS = -(-N_TRAIN // ROWS)  # 12
IMAGE_SIZE = 8


def train_args(cache: str, out: Path, *extra) -> list[str]:
    return ["--cache", cache, "--student", "mlp", "--student-arg", "hidden=(16,)", "--epochs", "1",
            "--batch-size", "128", "--device", "cpu", "--quiet", "--no-plots", "--out", out, *extra]


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def make_partial(path: str, chunk: int = 5) -> None:
    """Mark one chunk not written (done = 0, its values zeroed) and the cache partial, as a crash leaves it."""
    g = zarr.open_group(path, mode="r+")
    g["done"][chunk] = 0
    sl = slice(chunk * ROWS, min((chunk + 1) * ROWS, N_TRAIN))
    g["values"][sl] = np.zeros(g["values"][sl].shape, dtype=g["values"].dtype)
    a = dict(g.attrs["kdcache"])
    a.pop("stats", None)
    g.attrs["kdcache"] = a | {"status": "partial"}

