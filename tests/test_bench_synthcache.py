"""bench/synthcache.py writes its synthetic caches through kdcache's own output path: they must stay readable
caches whose top-k rows are the to_topk of the generated logits (the reader, RSS and dump benches stand on them)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, where bench/ lives

from bench.synthcache import PrototypeTeacher, make_cache  # noqa: E402

from kdcache.format.topk import to_topk  # noqa: E402
from kdcache.io import open_cache  # noqa: E402


@pytest.mark.parametrize("k", [3, None])
def test_synthetic_cache_holds_the_teachers_top_k(tmp_path, k):
    labels = np.arange(300) % 10
    made = make_cache(tmp_path / "c.zarr", labels=labels, num_classes=10, k=k, chunk_rows=128, verbose=False,
                      reuse=False)
    assert made["bytes"] > 0 and not made["reused"]
    want = to_topk(PrototypeTeacher(10, 0)(labels[128:256], 1)[:, None], k, "float16")
    with open_cache(made["path"]) as cache:
        assert (cache.layout.k, cache.layout.n_chunks) == (k, 3)
        got = cache.read(np.arange(128, 256))
        assert torch.equal(got.labels, torch.from_numpy(labels[128:256]))
        assert torch.equal(got.values, want["values"][:, 0])
        if k is not None:
            assert torch.equal(got.indices, want["indices"][:, 0].long())
            assert torch.equal(got.tail, want["tail"][:, 0])
