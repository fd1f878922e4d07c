"""Datasets and teacher factories for the benchmarks, usable as `--dataset bench.synthdata:NAME`
and `--teacher bench.synthdata:NAME` (run with the repository root on PYTHONPATH).

`synthetic`: N tiny 1x8x8 uint8 images generated on the fly from the index (no image array held:
memory does not grow with N beyond the int64 labels array), labels i % 10.
    KDBENCH_N       train-split size (default 10,000)
    KDBENCH_TEST_N  test-split size (default 2,000; kept fixed so runs of different N evaluate alike)
`digits_tiled`: the digits train images (1,437 real 8x8 images) repeated to KDBENCH_N samples, in order
(the test split is the real digits test split) -- a larger loader over real images for dump throughput.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from kdcache.data.datasets import ArrayDataset, DatasetInfo, SourceDataset, open_dataset

CLASSES = tuple(str(i) for i in range(10))


class SyntheticDataset(SourceDataset):
    """Image i: 64 bytes of BLAKE2b(split, i), halved, with row (label) set to 255 (learnable signal)."""

    def __init__(self, spec: str, split: str, n: int) -> None:
        self.info = DatasetInfo(spec, split, 10, CLASSES, (1, 8, 8))
        self.labels = np.arange(n, dtype=np.int64)
        self.labels %= 10  # in place: no second N-sized temporary
        self._salt = split.encode() + b"\0"

    def _array(self, i: int) -> np.ndarray:
        raw = hashlib.blake2b(self._salt + int(i).to_bytes(8, "little"), digest_size=64).digest()
        a = (np.frombuffer(raw, dtype=np.uint8) >> 1).reshape(1, 8, 8).copy()
        a[0, int(self.labels[i]) % 8] = 255
        if self.labels[i] >= 8:
            a[0, :, int(self.labels[i]) % 8] = 255
        return a

    def _image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._array(i))

    def raw_bytes(self, i: int) -> bytes:
        return self._array(self._index(i)).tobytes()


def synthetic(split: str, root: str | None = None) -> SyntheticDataset:
    n = int(os.environ.get("KDBENCH_N" if split == "train" else "KDBENCH_TEST_N",
                           "10000" if split == "train" else "2000"))
    return SyntheticDataset("bench.synthdata:synthetic", split, n)


def digits_tiled(split: str, root: str | None = None) -> SourceDataset:
    base = open_dataset("digits", split)
    if split != "train":
        return ArrayDataset(DatasetInfo("bench.synthdata:digits_tiled", split, 10, CLASSES, (1, 8, 8)),
                            base.images, base.labels, "NHW")
    n = int(os.environ.get("KDBENCH_N", "16384"))
    reps = -(-n // len(base))
    images = np.tile(base.images, (reps, 1, 1))[:n]
    labels = np.tile(base.labels, reps)[:n]
    return ArrayDataset(DatasetInfo("bench.synthdata:digits_tiled", split, 10, CLASSES, (1, 8, 8)),
                        images, labels, "NHW")


def cifar_resnet10_w16(num_classes: int, image_size: int, in_chans: int = 3) -> torch.nn.Module:
    """kdcache's cifar_resnet10 at width 16 (16-32-64-128 channels), as a teacher factory."""
    from kdcache.models.resnet import cifar_resnet10

    return cifar_resnet10(num_classes, image_size, in_chans, width=16)
