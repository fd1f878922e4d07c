"""Model inputs from samples: images are rendered (one batched crop + resize + flip — a single grid_sample — and
normalisation, on any device); tensors pass through untouched.

The same base image and view give the same tensor whatever the batch composition, so the pixels a student
sees for a stored view are the pixels the teacher saw for it, at any resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.data.sources import DatasetInfo
from kdcache.errors import KDCacheError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_SIZE = 4096  # a model input of 4096² px is already 200 MB per batch of 1 in float32


def default_image_size(base_hw: int) -> int:
    """Small datasets (≤ 32 px) run at 32 px; larger images at ImageNet's 224."""
    return 32 if base_hw <= 32 else 224


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # grid_sample modes a model's input may be resampled with


@dataclass(frozen=True)
class Preprocess:
    """How a model sees a view of an image: ``image_size`` square pixels resampled with ``interpolation``
    ("bilinear" default, "bicubic", "nearest"), then (x - mean) / std.

    ``crop_pct`` is the fraction of the base image the identity view covers: 1.0 (default) the whole image,
    c < 1 the central c x c box (timm's evaluation transform: resize to size / c, centre-crop size). A stored
    view's box is taken inside that central box, so every view of a c < 1 model is zoomed by 1 / c about the
    image centre. Models from timm take all of these from their pretrained configuration
    (``kdcache.models.timm_models``); ``to_json`` writes these two only when they differ from bilinear and 1.0,
    so the preprocessing of every other model is recorded as readers of cache version 1.1 expect.
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        try:
            s = int(self.image_size)
        except (TypeError, ValueError, OverflowError):
            s = -1
        if not 1 <= s <= MAX_IMAGE_SIZE or s != self.image_size:
            raise KDCacheError(f"bad image size {self.image_size!r}: pass an int from 1 to {MAX_IMAGE_SIZE}, "
                               "e.g. --image-size 32")
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise KDCacheError(f"mean and std need 3 values each, got {mean} and {std}: give one per RGB channel")
        if min(std) <= 0:
            raise KDCacheError(f"std values must be > 0, got {std}: fix the normalisation std")
        if self.interpolation not in INTERPOLATIONS:
            raise KDCacheError(f"bad interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        try:
            crop = float(self.crop_pct)
        except (TypeError, ValueError):
            crop = float("nan")
        if not 0.0 < crop <= 1.0:
            raise KDCacheError(f"bad crop_pct {self.crop_pct!r}: the central fraction of the image a model sees "
                               "is in (0, 1], e.g. 0.875")
        object.__setattr__(self, "image_size", s)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", crop)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def __call__(self, samples: Tensor, views: Tensor) -> Tensor:
        return render(samples, views, self)

    def to_json(self) -> dict:
        out = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}
        if self.interpolation != "bilinear":
            out["interpolation"] = self.interpolation
        if self.crop_pct != 1.0:
            out["crop_pct"] = self.crop_pct
        return out

    @classmethod
    def from_json(cls, d) -> "Preprocess":
        try:
            return cls(
                image_size=int(d["image_size"]),
                mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
                interpolation=str(d.get("interpolation", "bilinear")),
                crop_pct=float(d.get("crop_pct", 1.0)),
            )
        except (KeyError, AttributeError, TypeError, ValueError, KDCacheError) as e:
            raise KDCacheError(f"bad stored preprocessing {d!r} ({e}): the cache metadata is damaged") from None


def view_grid(views: Tensor, size: int) -> Tensor:
    """The ``grid_sample`` grid ``(B, S, S, 2)`` of views ``(B, 5)`` at ``S x S``.

    Equal to ``F.affine_grid(theta, (B, C, S, S), align_corners=False)`` with
    ``theta = [[sx, 0, tx], [0, sy, ty]]``, ``sx = ±w`` (negative = flip),
    ``sy = h``, ``tx = 2*x0 + w - 1``, ``ty = 2*y0 + h - 1``, but computed
    with elementwise ops instead of a matmul: bitwise independent of the
    batch composition and unaffected by TF32 matmul settings on GPUs.
    """
    v = views.to(torch.float32)
    y0, x0, h, w, flip = v.unbind(-1)
    sx = torch.where(flip > 0.5, -w, w)
    tx = 2.0 * x0 + w - 1.0
    ty = 2.0 * y0 + h - 1.0
    # pixel centres of the output in [-1, 1] (align_corners=False)
    base = (torch.arange(size, device=v.device, dtype=torch.float64) * 2 + 1) / size - 1
    base = base.to(torch.float32)
    gx = sx[:, None, None] * base[None, None, :] + tx[:, None, None]  # (B, 1, S)
    gy = h[:, None, None] * base[None, :, None] + ty[:, None, None]  # (B, S, 1)
    b = v.shape[0]
    return torch.stack((gx.expand(b, size, size), gy.expand(b, size, size)), dim=-1)


def central_box(views: Tensor, crop_pct: float) -> Tensor:
    """Views ``(B, 5)`` taken inside the central ``crop_pct`` box of the image (the identity view becomes that
    box): ``y0 -> (1 - c) / 2 + c * y0``, ``h -> c * h`` (x0, w alike), flip unchanged."""
    v = views.to(torch.float32)
    c = float(crop_pct)
    y0, x0, h, w, flip = v.unbind(-1)
    off = (1.0 - c) / 2.0
    return torch.stack((off + c * y0, off + c * x0, c * h, c * w, flip), dim=-1)


def render(images: Tensor, views: Tensor, pre: Preprocess) -> Tensor:
    """Render views of base images: float32 ``(B, 3, S, S)``, normalised.

    ``images``: ``(B, C, H, W)`` uint8 (0..255) or float (0..1), C in {1, 3},
    on any device; ``views``: ``(B, 5)`` (or one ``(5,)`` view for all),
    moved to the images' device.  Steps: to float in [0, 1]; the views taken
    inside the central ``pre.crop_pct`` box (:func:`central_box`; skipped at
    1.0); crop + resize + flip in one ``F.grid_sample`` of mode
    ``pre.interpolation`` (``padding_mode="zeros"``, ``align_corners=False``,
    grid from :func:`view_grid`; bicubic output clamped to [0, 1]); 1 channel
    repeated to 3; ``(x - mean) / std``.  Runs under ``torch.no_grad`` semantics (no
    autograd use intended).

    Exactness: each output row depends only on its own image and view, so on
    a given device the result is the same whatever else is in the batch.
    With the identity view and ``S == H == W`` it returns the normalised
    image itself (up to float rounding).

    Aliasing: bilinear sampling reads only the 4 nearest base pixels, so
    downscaling by a large factor (e.g. a 256 px base to 32 px) aliases.
    That is accepted: teacher and student still see the same pixels.  An
    antialiased path would prefilter (e.g. ``F.interpolate(...,
    antialias=True)`` of each box, or an area/box blur of the base image by the
    scale factor before sampling) -- not implemented, since it is not
    expressible as one batched grid sample with per-row boxes.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c = images.shape[:2]
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    views = torch.as_tensor(views, device=images.device)
    if views.ndim == 1:
        views = views[None].expand(b, 5)
    if views.shape != (b, 5):
        raise ValueError(f"views must be ({b}, 5), got {tuple(views.shape)}")
    with torch.no_grad():
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div_(255.0)  # in place: one float copy of the batch, not two
        elif images.is_floating_point():
            x = images.to(torch.float32)
        else:
            raise ValueError(f"images must be uint8 or float, got {images.dtype}")
        if pre.crop_pct != 1.0:
            views = central_box(views, pre.crop_pct)
        grid = view_grid(views, pre.image_size)
        out = F.grid_sample(x, grid, mode=pre.interpolation, padding_mode="zeros", align_corners=False)
        if pre.interpolation == "bicubic":
            out = out.clamp_(0.0, 1.0)  # cubic weights overshoot; a resized image stays in [0, 1] (as PIL's does)
        if c == 1:
            out = out.expand(b, 3, pre.image_size, pre.image_size)
        mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return ((out - mean) / std).contiguous()


@dataclass(frozen=True)
class Passthrough:
    """How a model sees a tensor sample: exactly as the dataset yields it (no resizing, normalisation or views)."""

    input_shape: tuple[int, ...]

    def __call__(self, samples: Tensor, views: Tensor) -> Tensor:
        return samples

    def to_json(self) -> dict:
        return {"kind": "tensor"}


ModelInput = Preprocess | Passthrough


def image_only(flag: str, info: DatasetInfo) -> KDCacheError:
    """The error for an image option given with tensor samples (it would be silently meaningless otherwise)."""
    return KDCacheError(f"{flag} applies to images, but the dataset yields {info.describe()}, which reach the "
                        f"models exactly as given: drop {flag}")


def model_input(info: DatasetInfo, image_size: int | None, fields: dict | None = None) -> ModelInput:
    """The input of a model trained or run on this dataset: images at `image_size` (default by their size) with
    the model's own `fields` (``kdcache.models.model_preprocess``: a timm model's mean, std, ...) over the defaults;
    tensors as they are (an image size is then an error, not ignored)."""
    if not info.is_image:
        if image_size:
            raise image_only("--image-size", info)
        return Passthrough(tuple(info.sample_shape))
    return Preprocess(**{"image_size": image_size or default_image_size(max(info.sample_shape[1:])),
                         **(fields or {})})


def input_from_json(d: dict, info: DatasetInfo) -> ModelInput:
    """The input a cache's `teacher.preprocess` records (images: size, mean, std; tensors: {"kind": "tensor"})."""
    if isinstance(d, dict) and d.get("kind") == "tensor":
        return Passthrough(tuple(info.sample_shape))
    return Preprocess.from_json(d)
