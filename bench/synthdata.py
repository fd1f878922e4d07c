"""Datasets and teachers for the benchmarks. The datasets are usable as `--dataset bench.synthdata:NAME`
(run with the repository root on PYTHONPATH).

`synthetic`: N tiny 1x8x8 uint8 images generated on the fly from the index (no image array held:
memory does not grow with N beyond the int64 labels array), labels i % 10.
    KDBENCH_N       train-split size (default 10,000)
    KDBENCH_TEST_N  test-split size (default 2,000; kept fixed so runs of different N evaluate alike)
`digits_tiled`: the digits train images (1,437 real 8x8 images) repeated to KDBENCH_N samples, in order
(the test split is the real digits test split) -- a larger loader over real images for dump throughput.

`TEACHERS`: the two teachers the speed benchmarks use, with random weights (`random_teacher`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from kdcache.data.datasets import open_dataset
from kdcache.data.sources import ArrayDataset, DatasetInfo, SourceDataset

CLASSES = tuple(str(i) for i in range(10))
# short name -> (kdcache model, builder options): cnn_s and cifar_resnet10 at width 16 (16-32-64-128 channels)
TEACHERS = {"cnn_s": ("cnn_s", {}), "cifar_resnet10_w16": ("cifar_resnet10", {"width": 16})}


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

    def _sample(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._array(i))

    def raw_bytes(self, i: int) -> bytes:
        return self._array(int(i)).tobytes()


def synthetic(split: str, root: str | None = None) -> SyntheticDataset:
    n = int(os.environ.get("KDBENCH_N" if split == "train" else "KDBENCH_TEST_N",
                           "10000" if split == "train" else "2000"))
    return SyntheticDataset("bench.synthdata:synthetic", split, n)


def digits_tiled(split: str, root: str | None = None) -> SourceDataset:
    base = open_dataset("digits", split)
    info = dataclasses.replace(base.info, spec="bench.synthdata:digits_tiled")
    if split != "train":
        return ArrayDataset(info, base.data, base.labels, base.layout)
    n = int(os.environ.get("KDBENCH_N", "16384"))
    reps = -(-n // len(base))
    images = np.tile(base.data, (reps, 1, 1))[:n]
    labels = np.tile(base.labels, reps)[:n]
    return ArrayDataset(info, images, labels, base.layout)


def random_teacher(short: str, image_size: int, folder: Path, num_classes: int = 10) -> tuple[str, str]:
    """Random weights (seed 0; speed only) for one of TEACHERS on `image_size` px images, saved as kdtrain saves
    a checkpoint ({"model", "arch_args"}) so that `kdcache dump --weights` rebuilds the same net; returns the
    model name and the checkpoint path."""
    from kdcache.models import build_model

    name, args = TEACHERS[short]
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, input_shape=(3, image_size, image_size), **args)
    path = Path(folder) / f"{short}_random{image_size}.pt"
    torch.save({"model": model.state_dict(), "arch_args": args}, path)
    return name, str(path)


def load_teacher(short: str, path: str, image_size: int, num_classes: int = 10) -> torch.nn.Module:
    """A `random_teacher` checkpoint as an eval-mode module (for online KD)."""
    from kdcache.models import build_model, checkpoint_arch_args, load_weights

    name, _ = TEACHERS[short]
    model = build_model(name, num_classes=num_classes, input_shape=(3, image_size, image_size),
                        **checkpoint_arch_args(path))
    load_weights(model, path, name)
    return model.eval()
