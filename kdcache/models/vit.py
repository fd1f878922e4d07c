"""DeiT-style ViT (pre-norm, learned positions, class token) with optional distillation tokens."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import MultiHeadClassifier
from .patches import PatchEmbed, fit_patch_size
from .shapes import square_image


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(MultiHeadClassifier):
    """ViT whose class token and ``distill_tokens`` distillation tokens each feed their own head."""

    def __init__(self, num_classes: int, image_size: int, in_chans: int = 3, dim: int = 192,
                 depth: int = 12, heads: int = 3, patch_size: int | None = None,
                 distill_tokens: int = 0, head_mode: str = "cls") -> None:
        super().__init__(dim, num_classes, distill_tokens, head_mode)
        self.patch_embed = PatchEmbed(image_size, fit_patch_size(image_size, patch_size), in_chans, dim)
        n_tokens = 1 + distill_tokens
        self.tokens = nn.Parameter(torch.zeros(1, n_tokens, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + self.patch_embed.num_patches, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.tokens, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_heads(self, x: Tensor) -> Tensor:
        """Logits (B, 1 + D, num_classes): class token first, then distillation token i."""
        x = self.patch_embed(x)
        x = torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.apply_heads(x[:, : 1 + self.distill_tokens])


def vit_ti(num_classes: int, input_shape: tuple[int, ...], patch_size: int | None = None, distill_tokens: int = 0,
           head_mode: str = "cls") -> VisionTransformer:
    """DeiT-Ti: dim 192, depth 12, 3 heads."""
    in_chans, size = square_image(input_shape, "vit_ti")
    return VisionTransformer(num_classes, size, in_chans, 192, 12, 3, patch_size, distill_tokens, head_mode)


def vit_s(num_classes: int, input_shape: tuple[int, ...], patch_size: int | None = None, distill_tokens: int = 0,
          head_mode: str = "cls") -> VisionTransformer:
    """DeiT-S: dim 384, depth 12, 6 heads."""
    in_chans, size = square_image(input_shape, "vit_s")
    return VisionTransformer(num_classes, size, in_chans, 384, 12, 6, patch_size, distill_tokens, head_mode)


def vit_nano(num_classes: int, input_shape: tuple[int, ...], patch_size: int | None = None, distill_tokens: int = 0,
             head_mode: str = "cls") -> VisionTransformer:
    """Demo-sized ViT: dim 96, depth 4, 3 heads."""
    in_chans, size = square_image(input_shape, "vit_nano")
    return VisionTransformer(num_classes, size, in_chans, 96, 4, 3, patch_size, distill_tokens, head_mode)
