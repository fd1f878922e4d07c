"""ResNet with a small-image stem (3x3 conv, stride 1, no max-pool) and BasicBlocks."""

from collections.abc import Sequence

from torch import Tensor, nn

from .shapes import image_shape


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a strided 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Four stages of widths width*(1, 2, 4, 8) at strides (1, 2, 2, 2), then GAP and a linear head."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_chans: int = 3,
                 width: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages, in_ch = [], width
        for i, n in enumerate(blocks):
            out_ch = width * 2**i
            stages += [BasicBlock(in_ch if j == 0 else out_ch, out_ch, 2 if i and j == 0 else 1)
                       for j in range(n)]
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def cifar_resnet18(num_classes: int, input_shape: tuple[int, ...], width: int = 64) -> CifarResNet:
    """ResNet-18 (stages 2-2-2-2) for small images; ``width`` is the first stage's channels."""
    return CifarResNet((2, 2, 2, 2), num_classes, image_shape(input_shape, "cifar_resnet18")[0], width)


def cifar_resnet10(num_classes: int, input_shape: tuple[int, ...], width: int = 64) -> CifarResNet:
    """ResNet-10 (stages 1-1-1-1) for small images; ``width`` is the first stage's channels."""
    return CifarResNet((1, 1, 1, 1), num_classes, image_shape(input_shape, "cifar_resnet10")[0], width)
