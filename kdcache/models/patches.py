"""Patch embedding for ViT and Mixer, with the patch size fitted to the image size."""

from torch import Tensor, nn

from ..errors import KDCacheError


def fit_patch_size(image_size: int, patch_size: int | None = None) -> int:
    """Patch 16 from 128 px up, else image_size // 8 (an 8x8 grid); must divide image_size."""
    patch = patch_size or (16 if image_size >= 128 else max(1, image_size // 8))
    if patch < 1 or image_size % patch:
        raise KDCacheError(
            f"image size {image_size} is not divisible by patch size {patch}: "
            f"use an image size that is a multiple of {patch} or pass a patch_size that divides {image_size}"
        )
    return patch


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear projection; returns tokens (B, N, dim)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
