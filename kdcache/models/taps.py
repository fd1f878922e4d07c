"""Feature taps: the output of a named module, pooled one agreed way, for FitNets hints.

A teacher's features are cached by `kdcache dump --features LAYER[:POOL]`; a student's are tapped the same way
during training, so both sides of a hint loss are pooled by this one rule:

- `gap` (the default): the mean over every axis but the batch and the last feature axis — spatial positions of a
  (B, C, H, W) map (giving (C,)) or the tokens of a ViT block's (B, N, D) (giving (D,)); a (B, D) output as is.
- `HxW` (e.g. `4x4`): a (B, C, H, W) map average-pooled to (C, 4, 4).
- `none`: the output as it is (one fixed shape per sample).

Token caches keep one feature per position: the module's output must be (B, L, D) and is stored as (L, D).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDCacheError

POOLS = ("gap", "none", "HxW")


@dataclass(frozen=True)
class FeatureSpec:
    """`LAYER[:POOL]` as given to --features / --hint."""

    layer: str
    pool: str = "gap"

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        layer, _, pool = text.partition(":")
        pool = pool or "gap"
        if not layer or not (pool in ("gap", "none") or re.fullmatch(r"\d+x\d+", pool)):
            raise KDCacheError(f"--features takes LAYER[:POOL] with POOL gap, none or HxW (e.g. layer3:gap, "
                               f"layer3:4x4), got {text!r}")
        return cls(layer, pool)

    def __str__(self) -> str:
        return f"{self.layer}:{self.pool}"


def module(model: nn.Module, name: str, role: str) -> nn.Module:
    """The submodule `name` (dotted, as in named_modules()), or a one-line error listing a few that exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise KDCacheError(f"the {role} has no module {name!r}: name one of its modules, e.g. "
                           f"{', '.join(names)}{', …' if len(names) == 12 else ''}") from None


def pool(x: Tensor, how: str, per_token: bool = False) -> Tensor:
    """A module output (B, …) pooled as `how` says (see the module docstring); float32."""
    x = x.float()
    if per_token:
        if x.dim() != 3:
            raise KDCacheError(f"a token cache stores one feature per position: the layer's output must be "
                               f"(batch, length, dim), not {tuple(x.shape)}")
        return x
    if how == "none" or x.dim() == 2:
        return x
    if how == "gap":
        return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() == 4 else x.mean(dim=tuple(range(1, x.dim() - 1)))
    h, w = (int(v) for v in how.split("x"))
    if x.dim() != 4:
        raise KDCacheError(f"pooling {how} needs a (batch, channels, height, width) map, not {tuple(x.shape)}: "
                           "use gap or none")
    return F.adaptive_avg_pool2d(x, (h, w))


def last_linear(model: nn.Module) -> str:
    """The name of the model's last nn.Linear: its input is the penultimate feature, the default hint layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise KDCacheError("the student has no nn.Linear head whose input could serve as its hint layer: name one "
                           "with --hint-student LAYER")
    return names[-1]


@contextmanager
def tap(model: nn.Module, names: list[str], role: str, inputs: bool = False) -> Iterator[dict[str, Tensor]]:
    """Capture the outputs (or, with `inputs`, the first inputs) of the named modules on every forward pass, into
    the yielded dict; the hooks are removed on exit."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, out: object, name: str = name) -> None:
            value = args[0] if inputs else (out[0] if isinstance(out, (tuple, list)) else out)
            seen[name] = value
        handles.append(module(model, name, role).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
