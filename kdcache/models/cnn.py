"""A small plain CNN: a fast teacher for demos on 8-32 px images."""

from torch import Tensor, nn

from .shapes import image_shape


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks of width*(1, 2, 4) channels, GAP, linear head."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers, in_ch = [], in_chans
        for out_ch in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def cnn_s(num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> SmallCNN:
    """Plain CNN with 32-64-128 channels (scaled by ``width``)."""
    return SmallCNN(num_classes, image_shape(input_shape, "cnn_s")[0], width)
