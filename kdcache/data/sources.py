"""Dataset types: base images (uint8, C×H×W, one fixed resolution), labels, and the raw bytes fingerprints use.

`ArrayDataset` serves in-memory arrays (digits, torchvision's CIFAR/MNIST), `ImageFolderDataset` decodes image
files, `WrappedDataset` adapts any map-style torch dataset a `package.module:factory` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import KDCacheError


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is; stored with caches and checked when they are reopened."""

    spec: str  # as the user gave it: "digits", "cifar10", "imagefolder:/p", "pkg.mod:fn"
    split: str  # "train" | "test"
    num_classes: int
    class_names: tuple[str, ...]
    base_shape: tuple[int, int, int]  # C, H, W of the base images


class SourceDataset(torch.utils.data.Dataset):
    """A map-style dataset of fixed-size base images.

    ``ds[i]`` is ``(image, label, i)``: ``image`` a ``uint8`` ``(C, H, W)``
    tensor with ``(C, H, W) == info.base_shape``, ``label`` an ``int``
    (-1 = unlabelled) equal to ``labels[i]``.  Subclasses implement
    ``_image(i)`` and ``raw_bytes(i)``; they must be picklable (DataLoader
    workers) and deterministic.
    """

    info: DatasetInfo
    labels: np.ndarray  # int64 (N,), -1 = unlabelled

    def __len__(self) -> int:
        return int(len(self.labels))

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        return i

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        i = self._index(i)
        return self._image(i), int(self.labels[i]), i

    def _image(self, i: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw_bytes(self, i: int) -> bytes:  # pragma: no cover - abstract
        """The sample's raw input bytes (before any resizing), for fingerprinting."""
        raise NotImplementedError

    def __repr__(self) -> str:
        c, h, w = self.info.base_shape
        return (
            f"{type(self).__name__}({self.info.spec!r}, split={self.info.split!r}, "
            f"n={len(self)}, classes={self.info.num_classes}, base={c}x{h}x{w})"
        )


class ArrayDataset(SourceDataset):
    """Base images held in one in-memory uint8 array.

    ``images`` is ``(N, H, W)``, ``(N, H, W, C)`` ("NHWC") or ``(N, C, H, W)``
    ("NCHW") as given by ``layout``; a numpy array or a torch tensor.  Items
    are converted to ``(C, H, W)`` on access; ``raw_bytes`` is the sample's
    bytes in the stored layout.
    """

    def __init__(self, info: DatasetInfo, images: Any, labels: np.ndarray, layout: str):
        if layout not in ("NHW", "NHWC", "NCHW"):
            raise ValueError(f"unknown layout {layout!r}")
        if isinstance(images, Tensor):
            images = images.numpy()
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"base images must be uint8, got {images.dtype}")
        if images.ndim != len(layout):
            raise ValueError(f"images have shape {images.shape}, expected layout {layout}")
        self.info = info
        self.images = images
        self.layout = layout
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")

    def _image(self, i: int) -> Tensor:
        a = self.images[i]
        if self.layout == "NHW":
            a = a[None]
        elif self.layout == "NHWC":
            a = a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a))

    def raw_bytes(self, i: int) -> bytes:
        return np.ascontiguousarray(self.images[self._index(i)]).tobytes()


class ImageFolderDataset(SourceDataset):
    """Image files decoded with PIL into ``3 x S x S`` uint8 base images.

    Decoding: RGB; the shorter side is resized to ``S`` (antialiased bilinear;
    large JPEGs are first DCT-downscaled with ``draft`` to no less than S),
    then the centre ``S x S`` is cropped.  ``raw_bytes`` is the file's bytes.
    """

    def __init__(self, info: DatasetInfo, samples: list[tuple[str, int]], size: int):
        self.info = info
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([y for _, y in samples], dtype=np.int64)
        self.size = int(size)

    def _image(self, i: int) -> Tensor:
        from PIL import Image

        s = self.size
        try:
            with Image.open(self.paths[i]) as img:
                img.draft("RGB", (s, s))
                img = img.convert("RGB")
        except OSError as e:
            raise KDCacheError(
                f"cannot decode image {self.paths[i]} ({e}): remove or replace the file"
            ) from None
        w, h = img.size
        if w <= h:
            nw, nh = s, max(s, int(round(h * s / w)))
        else:
            nw, nh = max(s, int(round(w * s / h))), s
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        left = int(round((nw - s) / 2.0))
        top = int(round((nh - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        a = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a))

    def raw_bytes(self, i: int) -> bytes:
        with open(self.paths[self._index(i)], "rb") as f:
            return f.read()


def _to_chw_uint8(img: Any, where: str) -> tuple[Tensor, Any]:
    """Convert a user image to a uint8 CHW tensor; also return its raw form.

    torch tensors are taken as ``(C, H, W)`` (or ``(H, W)``); numpy arrays and
    PIL images as ``(H, W, C)`` (or ``(H, W)``) -- except a 3-d numpy array
    whose last dim is not 1 or 3 but whose first is, which is taken as CHW.
    uint8 is used as is; floats must lie in [0, 1] and become ``round(x*255)``.
    """
    raw = img
    if isinstance(img, Tensor):
        a = img.detach().cpu().numpy()
        chw = True
    else:
        if not isinstance(img, np.ndarray) and type(img).__module__.startswith("PIL."):
            img = np.asarray(img)  # PIL image -> HWC / HW array
            raw = img
        a = np.asarray(img)
        chw = a.ndim == 3 and a.shape[-1] not in (1, 3) and a.shape[0] in (1, 3)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3:
        if not chw:
            a = a.transpose(2, 0, 1)
    else:
        raise KDCacheError(
            f"{where}: image has shape {tuple(a.shape)}; make the dataset yield "
            "CHW tensors or HWC numpy arrays"
        )
    if a.shape[0] not in (1, 3):
        raise KDCacheError(
            f"{where}: image has {a.shape[0]} channels (shape {tuple(a.shape)}); "
            "make the dataset yield 1- or 3-channel images"
        )
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == np.bool_ or np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if a.size and (np.nanmin(a) < -1e-6 or np.nanmax(a) > 1 + 1e-6 or np.isnan(a).any()):
            raise KDCacheError(
                f"{where}: float image values span [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]; "
                "make the dataset yield floats in [0, 1] or uint8 in [0, 255]"
            )
        out = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    else:
        raise KDCacheError(
            f"{where}: image dtype {a.dtype} is not supported; "
            "make the dataset yield uint8 or float images in [0, 1]"
        )
    return torch.from_numpy(np.ascontiguousarray(out)), raw


def _raw_to_bytes(raw: Any) -> bytes:
    if isinstance(raw, Tensor):
        return raw.detach().cpu().contiguous().numpy().tobytes()
    return np.ascontiguousarray(np.asarray(raw)).tobytes()


def _label_of(y: Any, where: str) -> int:
    if y is None:
        return -1
    if isinstance(y, Tensor):
        if y.numel() != 1:
            raise KDCacheError(f"{where}: label has shape {tuple(y.shape)}; yield one int per image")
        y = y.item()
    try:
        v = int(y)
    except (TypeError, ValueError):
        raise KDCacheError(f"{where}: label {y!r} is not an int; yield int labels (-1 = none)") from None
    if float(y) != v:
        raise KDCacheError(f"{where}: label {y!r} is not an int; yield int labels (-1 = none)")
    return v if v >= 0 else -1


class WrappedDataset(SourceDataset):
    """A user's map-style dataset yielding ``(image, label, ...)`` made a SourceDataset.

    Images are converted on access with :func:`_to_chw_uint8` (uint8 kept;
    float in [0, 1] -> ``round(x*255)``; tensors CHW, numpy/PIL HWC) and must
    all share the first item's shape.  Labels are gathered once at wrap time:
    from ``.targets`` (or ``.labels``) when the dataset has one of matching
    length, else by iterating over every item.  Class names come from
    ``.classes`` when present, else ``str(i)`` for ``i < max(label) + 1``.
    ``raw_bytes`` is the bytes of the image exactly as the dataset yields it.
    """

    def __init__(self, spec: str, split: str, inner: Any):
        self.inner = inner
        self._where = f"dataset {spec!r}"
        try:
            n = len(inner)
        except TypeError:
            raise KDCacheError(
                f"{self._where}: the factory returned {type(inner).__name__}, which has no len(); "
                "return a map-style torch Dataset"
            ) from None
        if n == 0:
            raise KDCacheError(f"{self._where} ({split}) is empty: make the factory return samples")
        first, _ = _to_chw_uint8(self._item(0)[0], self._where)
        self._shape = tuple(int(s) for s in first.shape)

        labels = None
        for attr in ("targets", "labels"):
            t = getattr(inner, attr, None)
            if t is not None:
                try:
                    arr = np.asarray(t.cpu() if isinstance(t, Tensor) else t)
                except Exception:  # noqa: BLE001 - odd attribute: fall back to iterating
                    continue
                if arr.ndim == 1 and len(arr) == n and np.issubdtype(arr.dtype, np.integer):
                    labels = np.where(arr < 0, -1, arr).astype(np.int64)
                    break
        if labels is None:
            labels = np.asarray(
                [_label_of(self._item(k)[1], self._where) for k in range(n)], dtype=np.int64
            )
        self.labels = labels

        classes = getattr(inner, "classes", None)
        if classes is not None and len(classes) > 0:
            class_names = tuple(str(c) for c in classes)
        else:
            k = int(labels.max()) + 1 if len(labels) else 0
            class_names = tuple(str(i) for i in range(max(k, 0)))
        if len(labels) and labels.max() >= len(class_names):
            raise KDCacheError(
                f"{self._where}: label {int(labels.max())} but only {len(class_names)} classes; "
                "fix the labels or the dataset's .classes"
            )
        self.info = DatasetInfo(
            spec=spec,
            split=split,
            num_classes=len(class_names),
            class_names=class_names,
            base_shape=self._shape,  # type: ignore[arg-type]
        )

    def _item(self, i: int) -> Any:
        item = self.inner[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise KDCacheError(
                f"{self._where}: items must be (image, label) pairs, got {type(item).__name__}; "
                "make __getitem__ return (image, label)"
            )
        return item

    def _image(self, i: int) -> Tensor:
        img, _ = _to_chw_uint8(self._item(i)[0], self._where)
        if tuple(img.shape) != self._shape:
            raise KDCacheError(
                f"{self._where}: sample {i} has shape {tuple(img.shape)} but sample 0 has "
                f"{self._shape}; make the dataset yield same-size images"
            )
        return img

    def raw_bytes(self, i: int) -> bytes:
        return _raw_to_bytes(self._item(self._index(i))[0])
