"""MLP-Mixer (Tolstikhin et al. 2021), the CivT paper's Mixer-Ti student."""

from torch import Tensor, nn

from .heads import MultiHeadClassifier
from .patches import PatchEmbed, fit_patch_size
from .shapes import square_image


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MixerBlock(nn.Module):
    """Token-mixing MLP across patches, then channel-mixing MLP, each pre-norm with a residual."""

    def __init__(self, num_patches: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = _mlp(num_patches, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = _mlp(dim, channel_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MlpMixer(MultiHeadClassifier):
    """Mixer with 1 + ``distill_tokens`` heads.

    A Mixer has no tokens to prepend (its token-mixing MLP is fixed to the patch count), so
    distillation here means extra linear heads, one per teacher, all reading the mean-pooled
    patch features; unlike a DeiT ViT, the heads share that one feature vector.
    """

    def __init__(self, num_classes: int, image_size: int, in_chans: int = 3, dim: int = 192,
                 depth: int = 8, token_hidden: int = 96, channel_hidden: int = 768,
                 patch_size: int | None = None, distill_tokens: int = 0, head_mode: str = "cls") -> None:
        super().__init__(dim, num_classes, distill_tokens, head_mode)
        self.patch_embed = PatchEmbed(image_size, fit_patch_size(image_size, patch_size), in_chans, dim)
        n = self.patch_embed.num_patches
        self.blocks = nn.Sequential(*(MixerBlock(n, dim, token_hidden, channel_hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward_heads(self, x: Tensor) -> Tensor:
        """Logits (B, 1 + D, num_classes): the class head first, then distillation head i."""
        return self.apply_heads(self.norm(self.blocks(self.patch_embed(x))).mean(dim=1))


def mixer_ti(num_classes: int, input_shape: tuple[int, ...], patch_size: int | None = None, distill_tokens: int = 0,
             head_mode: str = "cls") -> MlpMixer:
    """Mixer-Ti: dim 192, depth 8, token-mixing hidden 96, channel-mixing hidden 768."""
    in_chans, size = square_image(input_shape, "mixer_ti")
    return MlpMixer(num_classes, size, in_chans, 192, 8, 96, 768, patch_size, distill_tokens, head_mode)
