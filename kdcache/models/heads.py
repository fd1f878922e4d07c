"""Class head plus distillation heads (DeiT / CivT), shared by ViT and Mixer; and the all-heads view training uses."""

import torch
from torch import Tensor, nn

from ..errors import KDCacheError

HEAD_MODES = ("cls", "mean")


class MultiHeadClassifier(nn.Module):
    """Base for models with 1 + distill_tokens heads.

    Subclasses implement ``forward_heads(x) -> (B, 1 + D, num_classes)``: head 0 is trained on the
    labels, head i on teacher i. ``forward`` returns head 0 ("cls") or the mean of all heads ("mean").
    """

    def __init__(self, dim: int, num_classes: int, distill_tokens: int, head_mode: str) -> None:
        super().__init__()
        if distill_tokens < 0:
            raise KDCacheError(
                f"distill_tokens must be >= 0, got {distill_tokens}: pass 0 or one per teacher"
            )
        if head_mode not in HEAD_MODES:
            raise KDCacheError(f"unknown head_mode {head_mode!r}: use one of {', '.join(HEAD_MODES)}")
        self.num_classes = num_classes
        self.distill_tokens = distill_tokens
        self.head_mode = head_mode
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(1 + distill_tokens))

    def apply_heads(self, feats: Tensor) -> Tensor:
        """Feature per head (B, 1 + D, dim), or one shared (B, dim), -> logits (B, 1 + D, classes)."""
        if feats.dim() == 2:
            return torch.stack([head(feats) for head in self.heads], dim=1)
        return torch.stack([head(feats[:, i]) for i, head in enumerate(self.heads)], dim=1)

    def forward_heads(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        logits = self.forward_heads(x)
        return logits[:, 0] if self.head_mode == "cls" else logits.mean(dim=1)


def has_distill_heads(model: nn.Module) -> bool:
    """True for a ViT or Mixer built with ``distill_tokens > 0``."""
    return getattr(model, "distill_tokens", 0) > 0


class HeadsView(nn.Module):
    """Any classifier as (B, H, C) logits of all its heads (H = 1 for a plain model), so training and DDP see one
    call whatever the student."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if has_distill_heads(self.model):
            return self.model.forward_heads(x)
        return self.model(x)[:, None]
