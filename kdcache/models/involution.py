"""Involution (Li et al. 2021): a spatial-specific, channel-agnostic kernel made per pixel."""

import torch.nn.functional as F
from torch import Tensor, nn


def involution(x: Tensor, kernel: Tensor, kernel_size: int, stride: int = 1) -> Tensor:
    """Apply per-pixel kernels (B, G, K*K, Ho, Wo) to x (B, C, H, W); channels split in G groups."""
    b, c = x.shape[:2]
    groups, ho, wo = kernel.shape[1], kernel.shape[3], kernel.shape[4]
    cols = F.unfold(x, kernel_size, padding=(kernel_size - 1) // 2, stride=stride)
    cols = cols.view(b, groups, c // groups, kernel_size * kernel_size, ho, wo)
    return (cols * kernel.unsqueeze(2)).sum(dim=3).view(b, c, ho, wo)


class Involution(nn.Module):
    """RedNet involution layer: kernels generated from (avg-pooled) input by a 1x1 bottleneck."""

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1,
                 group_channels: int = 16, reduction: int = 4) -> None:
        super().__init__()
        group_channels = min(group_channels, channels)
        if channels % group_channels:
            raise ValueError(f"{channels} channels do not split into groups of {group_channels}")
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = channels // group_channels
        hidden = max(1, channels // reduction)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.span = nn.Conv2d(hidden, kernel_size * kernel_size * self.groups, 1)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.span(self.reduce(self.pool(x)))
        b, _, h, w = kernel.shape
        kernel = kernel.view(b, self.groups, self.kernel_size * self.kernel_size, h, w)
        return involution(x, kernel, self.kernel_size, self.stride)
