"""RedNet (involution ResNet, Li et al. 2021) with a small-image stem: the CivT involution teacher."""

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import KDCacheError
from .involution import Involution
from .shapes import image_shape

GROUP_CHANNELS = 16


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, 1, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class InvBottleneck(nn.Module):
    """1x1 conv -> KxK involution (carries the stride) -> 1x1 conv x4 expansion, plus residual."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv_bn_relu(in_ch, width, 1)
        self.inv = nn.Sequential(
            Involution(width, kernel_size, stride, GROUP_CHANNELS),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.conv3 = nn.Sequential(nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        nn.init.zeros_(self.conv3[1].weight)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv3(self.inv(self.conv1(x))) + self.shortcut(x))


class RedNet(nn.Module):
    """Stem conv3x3 -> involution 3x3 -> conv3x3 at stride 1, four bottleneck stages, GAP, linear."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_chans: int = 3,
                 width: int = 64, kernel_size: int = 7) -> None:
        super().__init__()
        _check_width(width)
        self.num_classes = num_classes
        half = width // 2
        self.stem = nn.Sequential(
            _conv_bn_relu(in_chans, half, 3),
            Involution(half, 3, 1, GROUP_CHANNELS),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            _conv_bn_relu(half, width, 3),
        )
        stages, in_ch = [], width
        for i, n in enumerate(blocks):
            mid = width * 2**i
            for j in range(n):
                stages.append(InvBottleneck(in_ch, mid, 2 if i and j == 0 else 1, kernel_size))
                in_ch = mid * InvBottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def _check_width(width: int) -> None:
    for ch in (width // 2, width, 2 * width, 4 * width, 8 * width):
        if ch < 1 or ch % min(GROUP_CHANNELS, ch):
            raise KDCacheError(
                f"RedNet width {width} gives {ch} involution channels, which do not split into "
                f"groups of {GROUP_CHANNELS}: use a width that is a multiple of 32 (or 2, 4, 8, 16)"
            )


def rednet26_s(num_classes: int, input_shape: tuple[int, ...], width: int = 64, kernel_size: int = 7) -> RedNet:
    """RedNet-26 (stages 1-2-4-1, ~9M params at width 64) for small images."""
    return RedNet((1, 2, 4, 1), num_classes, image_shape(input_shape, "rednet26_s")[0], width, kernel_size)


def rednet_s(num_classes: int, input_shape: tuple[int, ...], width: int = 16, kernel_size: int = 7) -> RedNet:
    """Tiny RedNet (stages 1-1-1-1, width 16) for demos and tests."""
    return RedNet((1, 1, 1, 1), num_classes, image_shape(input_shape, "rednet_s")[0], width, kernel_size)
