"""A fully connected classifier on flattened pixels (Hinton et al.'s 2x1200 student)."""

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden layer -> Linear logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (1200, 1200),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            # Dropout is always present (p=0 is a no-op) so state_dict keys do not depend on it.
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: Sequence[int] = (1200, 1200),
        dropout: float = 0.0) -> MLP:
    """MLP over the flattened input (any shape: images, signals, feature vectors) with ReLU hidden layers."""
    return MLP(math.prod(input_shape), num_classes, tuple(hidden), dropout)
