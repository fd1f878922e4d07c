"""A plug-in dataset and model that know nothing of kdcache: standardised 1-D signals and a 1-D CNN.

Used as `--dataset signalplug:signals` and `--teacher/--student signalplug:cnn1d` (tests/ is on sys.path).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

LENGTH, CLASSES = 40, 4


class Signals(torch.utils.data.Dataset):
    """Noisy sine bursts whose frequency is the class, standardised per sample: floats in about [-2, 2]."""

    def __init__(self, split: str, n: int = 300) -> None:
        rng = np.random.default_rng(0 if split == "train" else 1)
        self.labels = rng.integers(0, CLASSES, n)
        t = np.linspace(0, 1, LENGTH)
        phase = rng.uniform(0, 0.5, (n, 1))
        x = np.sin(2 * np.pi * (self.labels[:, None] + 1) * t + phase) + 0.6 * rng.standard_normal((n, LENGTH))
        x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
        self.x = torch.from_numpy(x.astype(np.float32))[:, None]  # (n, 1, 40)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.labels[i])


def signals(split: str, root: str | None = None) -> Signals:
    return Signals(split)


def cnn1d(num_classes: int, input_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """Two conv blocks over (channels, length), global average pool, linear head."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv1d(c, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, 2 * width, 5, padding=2), nn.BatchNorm1d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
