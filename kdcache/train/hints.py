"""FitNets hints from a cache: a learned regressor maps a student layer's output, pooled as the teacher's cached
feature was (models.taps), onto that feature; the hint loss is their mean squared error."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import KDCacheError
from kdcache.models.taps import last_linear, pool
from kdcache.train.losses import SoftTarget


class HintLoss(nn.Module):
    """`weight` · MSE(regressor(pooled student feature), cached teacher feature).

    The student's feature is read from `seen` (filled by a models.taps.tap on the student during its forward pass).
    Vectors are regressed by a linear map, (C, H, W) maps by a 1×1 convolution after pooling the student's map to
    the teacher's H×W, token features (L, D) per position."""

    def __init__(self, student_layer: str, teacher: dict, student_shape: tuple[int, ...], per_token: bool,
                 weight: float, seen: dict[str, Tensor]) -> None:
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher["layer"]
        self.pool, self.shape = teacher["pool"], tuple(teacher["shape"])
        self.per_token, self.weight, self.seen = per_token, weight, seen
        if len(self.shape) == 3:
            if len(student_shape) != 3:
                raise KDCacheError(f"the teacher's {self.teacher_layer} is a {self.shape} map but the student's "
                                   f"{student_layer} gives {student_shape}: hint a student layer with a map")
            self.regressor: nn.Module = nn.Conv2d(student_shape[0], self.shape[0], 1)
        else:
            self.regressor = nn.Linear(student_shape[-1], self.shape[-1])

    def student_feature(self) -> Tensor:
        x = self.seen[self.student_layer]
        if len(self.shape) == 3:
            return F.adaptive_avg_pool2d(x.float(), self.shape[1:])
        return pool(x, "gap", self.per_token)

    def forward(self, labels: Tensor, target: SoftTarget) -> Tensor:
        want = target.features.get(self.teacher_layer)
        if want is None:
            raise KDCacheError(f"these soft targets carry no {self.teacher_layer} feature: dump the teacher with "
                               f"--features {self.teacher_layer}")
        got = self.regressor(self.student_feature())
        if self.per_token:
            keep = labels >= 0
            got, want = got[keep], want[keep]
        return self.weight * F.mse_loss(got.float(), want.float())


def student_layer(model: nn.Module, name: str | None) -> tuple[str, bool]:
    """The student module to tap and whether its input (not output) is the feature: by default the input of its
    last nn.Linear — the penultimate representation FitNets hints."""
    return (name, False) if name else (last_linear(model), True)


@torch.no_grad()
def probe_shape(model: nn.Module, seen: dict[str, Tensor], layer: str, sample: Tensor, teacher: dict,
                per_token: bool) -> tuple[int, ...]:
    """The shape (per row) the student's tapped layer gives, from one forward pass on `sample`."""
    was = model.training
    model.eval()
    model(sample)
    model.train(was)
    x = seen[layer]
    if len(teacher["shape"]) == 3:
        return tuple(x.shape[1:])
    return tuple(pool(x, "gap", per_token).shape[2 if per_token else 1:])
