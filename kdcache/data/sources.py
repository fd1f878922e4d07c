"""Dataset types. A sample is either an *image* — a base image (C×H×W, C ∈ {1, 3}, uint8 or float in [0, 1]) that is
rendered per model (resized, cropped/flipped by a view, normalised) — or a *tensor* of any fixed shape and dtype that
reaches teacher and student exactly as the dataset gives it (signals, feature vectors, token ids, spectrograms).

`ArrayDataset` serves in-memory arrays (digits, torchvision's CIFAR/MNIST, generated data), `ImageFolderDataset`
decodes image files, `WrappedDataset` adapts any map-style torch dataset a `package.module:factory` returns.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import KDCacheError

IMAGE, TENSOR = "image", "tensor"
INPUT_KINDS = (IMAGE, TENSOR)
DECLARE_ATTR = "kdcache_input"  # a dataset may set this to "image" or "tensor" to say what its samples are


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is; stored with caches and checked when they are reopened."""

    spec: str  # as the user gave it: "digits", "cifar10", "imagefolder:/p", "pkg.mod:fn"
    split: str  # "train" | "test"
    num_classes: int
    class_names: tuple[str, ...]
    sample_shape: tuple[int, ...]  # one sample as yielded: (C, H, W) for images
    kind: str = IMAGE
    dtype: str = "uint8"
    label_shape: tuple[int, ...] = ()  # () one label per sample; (L,) one per token position (next-token ids)
    vocab: dict | None = None  # token samples: {"name", "size", "sha256"} of the vocabulary their ids index

    @property
    def is_image(self) -> bool:
        return self.kind == IMAGE

    @property
    def per_token(self) -> bool:
        """One label (and one cached distribution) per token position rather than per sample."""
        return bool(self.label_shape)

    @property
    def model_inputs(self) -> dict:
        """What a model builder is told about these samples beyond their shape: the vocabulary size of token ids."""
        return {"vocab_size": self.vocab["size"]} if self.vocab else {}

    def input_json(self) -> dict:
        return {"kind": self.kind, "shape": list(self.sample_shape), "dtype": self.dtype}

    def describe(self) -> str:
        """e.g. 'tensors of shape (1, 40) float32' — for error messages."""
        what = "images" if self.is_image else "tensors"
        return f"{what} of shape {tuple(self.sample_shape)} {self.dtype}"


class SourceDataset(torch.utils.data.Dataset):
    """A map-style dataset of fixed-shape samples.

    ``ds[i]`` is ``(sample, label, i)``: ``sample`` a tensor of ``info.sample_shape`` and ``info.dtype``, ``label``
    an ``int`` (-1 = unlabelled) equal to ``labels[i]`` — or, for per-token datasets (``info.label_shape == (L,)``),
    an int64 tensor of the L next-token ids (-1 = padding).  Subclasses implement ``_sample(i)`` and ``raw_bytes(i)``;
    they must be picklable (DataLoader workers) and deterministic.
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

    def __getitem__(self, i: int) -> tuple[Tensor, int | Tensor, int]:
        i = self._index(i)
        label = self.labels[i]
        return self._sample(i), (int(label) if label.ndim == 0 else torch.from_numpy(np.asarray(label, np.int64))), i

    def _sample(self, i: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw_bytes(self, i: int) -> bytes:  # pragma: no cover - abstract
        """The sample's raw input bytes (before any resizing), for fingerprinting."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.spec!r}, split={self.info.split!r}, n={len(self)}, "
                f"classes={self.info.num_classes}, {self.info.describe()})")


class ArrayDataset(SourceDataset):
    """Samples held in one in-memory array (numpy or torch).

    Images: ``layout`` "NHW", "NHWC" or "NCHW", uint8 (or float in [0, 1]), converted to (C, H, W) on access.
    Tensors: ``layout`` "N", every sample ``data[i]`` as stored.  ``raw_bytes`` is the sample's stored bytes.
    """

    def __init__(self, info: DatasetInfo, data: Any, labels: np.ndarray, layout: str):
        if layout not in ("NHW", "NHWC", "NCHW", "N"):
            raise ValueError(f"unknown layout {layout!r}")
        if (layout == "N") != (info.kind == TENSOR):
            raise ValueError(f"layout {layout} does not fit {info.kind} samples")
        data = data.numpy() if isinstance(data, Tensor) else np.asarray(data)
        if layout != "N" and data.ndim != len(layout):
            raise ValueError(f"images have shape {data.shape}, expected layout {layout}")
        self.info, self.data, self.layout = info, data, layout
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(self.labels) != len(data):
            raise ValueError(f"{len(data)} samples but {len(self.labels)} labels")

    def _sample(self, i: int) -> Tensor:
        a = self.data[i]
        if self.layout == "NHW":
            a = a[None]
        elif self.layout == "NHWC":
            a = a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a))

    def raw_bytes(self, i: int) -> bytes:
        return np.ascontiguousarray(self.data[self._index(i)]).tobytes()


def decode_image(source: str | bytes, size: int, where: str) -> Tensor:
    """An image file (path) or its encoded bytes as a ``3 x size x size`` uint8 base image: RGB; the shorter side
    resized to ``size`` (antialiased bilinear; JPEGs first DCT-downscaled by ``draft`` to no less than ``size``,
    which makes large JPEGs several times cheaper to decode); the centre ``size x size`` cropped. Every image
    source (folders, tar shards, saved datasets) decodes with this, so the same file gives the same base image."""
    from PIL import Image

    s = int(size)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.draft("RGB", (s, s))
            img = img.convert("RGB")
    except OSError as e:
        raise KDCacheError(f"cannot decode image {where} ({e}): remove or replace the file") from None
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

    def _sample(self, i: int) -> Tensor:
        return decode_image(self.paths[i], self.size, self.paths[i])

    def raw_bytes(self, i: int) -> bytes:
        with open(self.paths[self._index(i)], "rb") as f:
            return f.read()


def _is_pil(x: Any) -> bool:
    return not isinstance(x, (np.ndarray, Tensor)) and type(x).__module__.startswith("PIL.")


def _as_array(x: Any, where: str) -> tuple[np.ndarray, bool]:
    """A sample as a numpy array, and whether its axes are (C, H, W) already (torch tensors are; numpy/PIL HWC)."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy(), True
    if _is_pil(x) or isinstance(x, np.ndarray):
        return np.asarray(x), False
    try:
        return np.asarray(x), True
    except Exception:  # noqa: BLE001 - anything numpy cannot take
        raise KDCacheError(f"{where}: a sample is a {type(x).__name__}; yield tensors, numpy arrays or PIL "
                           "images") from None


def _image_chw(a: np.ndarray, chw: bool) -> np.ndarray | None:
    """The array as a (C, H, W) image with C ∈ {1, 3}, or None when it has no image shape."""
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        return None
    if not chw and a.shape[-1] in (1, 3):
        return a.transpose(2, 0, 1)
    if a.shape[0] in (1, 3):
        return a
    return None


def sample_kind(x: Any, declared: str | None, where: str) -> str:
    """Image or tensor: as the dataset declares (its `kdcache_input`), else PIL images and uint8 arrays of image
    shape are images and everything else is a tensor, passed through exactly (never quantised)."""
    if declared is not None:
        if declared not in INPUT_KINDS:
            raise KDCacheError(f"{where}: {DECLARE_ATTR} = {declared!r}; set it to 'image' or 'tensor'")
        return declared
    if _is_pil(x):
        return IMAGE
    a, chw = _as_array(x, where)
    return IMAGE if a.dtype == np.uint8 and _image_chw(a, chw) is not None else TENSOR


def _to_image(x: Any, where: str) -> np.ndarray:
    """A user image as a (C, H, W) array: uint8 as is, floats (declared images) kept as float32 in [0, 1]."""
    a, chw = _as_array(x, where)
    img = _image_chw(a, chw)
    if img is None:
        raise KDCacheError(f"{where}: image has shape {tuple(a.shape)}; yield (C, H, W) tensors or (H, W, C) arrays "
                           f"with 1 or 3 channels, or set {DECLARE_ATTR} = 'tensor' to pass samples through as given")
    if img.dtype == np.uint8:
        return img
    if not np.issubdtype(img.dtype, np.floating):
        raise KDCacheError(f"{where}: image dtype {img.dtype} is not supported; yield uint8 images, or float images "
                           "in [0, 1]")
    if img.size and (not np.isfinite(img).all() or img.min() < 0 or img.max() > 1):
        raise KDCacheError(f"{where}: float image values span [{np.nanmin(img):.3g}, {np.nanmax(img):.3g}]; images "
                           f"are floats in [0, 1] or uint8 — set {DECLARE_ATTR} = 'tensor' to pass samples through "
                           "as given")
    return img.astype(np.float32, copy=False)


def _to_tensor(x: Any, where: str) -> np.ndarray:
    a, _ = _as_array(x, where)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise KDCacheError(f"{where}: a sample has dtype {a.dtype}; yield numeric tensors")
    return a


def _vocab_of(inner: Any, where: str) -> dict:
    """The vocabulary a dataset of token ids declares: `.vocab` ({"name", "size", "sha256"}) or `.vocab_size`."""
    vocab = getattr(inner, "vocab", None)
    if isinstance(vocab, dict) and isinstance(vocab.get("size"), int) and vocab["size"] > 0:
        return {"name": str(vocab.get("name", "")), "size": vocab["size"], "sha256": vocab.get("sha256")}
    size = getattr(inner, "vocab_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return {"name": type(inner).__name__, "size": size, "sha256": None}
    raise KDCacheError(f"{where}: samples of token ids need a vocabulary: give the dataset .vocab_size (an int), or "
                       ".vocab = {'name': ..., 'size': ..., 'sha256': ...}")


def _label_of(y: Any, where: str) -> int:
    if y is None:
        return -1
    if isinstance(y, Tensor):
        if y.numel() != 1:
            raise KDCacheError(f"{where}: label has shape {tuple(y.shape)}; yield one int per sample")
        y = y.item()
    try:
        v = int(y)
    except (TypeError, ValueError):
        raise KDCacheError(f"{where}: label {y!r} is not an int; yield int labels (-1 = none)") from None
    if float(y) != v:
        raise KDCacheError(f"{where}: label {y!r} is not an int; yield int labels (-1 = none)")
    return v if v >= 0 else -1


class WrappedDataset(SourceDataset):
    """A user's map-style dataset yielding ``(sample, label, ...)`` made a SourceDataset, knowing nothing of kdcache.

    What a sample is comes from the first one (see :func:`sample_kind`); every sample must then have its shape and
    dtype.  Images are taken as (C, H, W) tensors or (H, W, C) numpy/PIL; tensors are kept exactly.  Labels are
    gathered once: from ``.targets`` (or ``.labels``) when the dataset has one of matching length, else by reading
    every item.  Class names come from ``.classes`` when present, else ``str(i)`` for ``i < max(label) + 1``.
    ``raw_bytes`` is the bytes of the sample exactly as the dataset yields it.
    """

    def __init__(self, spec: str, split: str, inner: Any):
        self.inner = inner
        self._where = f"dataset {spec!r}"
        try:
            n = len(inner)
        except TypeError:
            raise KDCacheError(f"{self._where}: the factory returned {type(inner).__name__}, which has no len(); "
                               "return a map-style torch Dataset") from None
        if n == 0:
            raise KDCacheError(f"{self._where} ({split}) is empty: make the factory return samples")
        first, first_label = self._item(0)[:2]
        self._kind = sample_kind(first, getattr(inner, DECLARE_ATTR, None), self._where)
        a = self._convert(first)
        self._shape, self._dtype = tuple(int(s) for s in a.shape), str(a.dtype)
        if isinstance(first_label, (Tensor, np.ndarray)) and np.ndim(first_label) == 1:
            self.labels = self._token_labels(n)
            vocab = _vocab_of(inner, self._where)
            if self.labels.max() >= vocab["size"]:
                raise KDCacheError(f"{self._where}: token id {int(self.labels.max())} is outside the vocabulary of "
                                   f"{vocab['size']}; fix the data or the dataset's vocab_size")
            self.info = DatasetInfo(spec, split, vocab["size"], (), self._shape, self._kind, self._dtype,
                                    tuple(self.labels.shape[1:]), vocab)
            return
        labels = self._labels(n)
        classes = getattr(inner, "classes", None)
        if classes is not None and len(classes) > 0:
            class_names = tuple(str(c) for c in classes)
        else:
            class_names = tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))
        if not class_names:
            raise KDCacheError(f"{self._where}: no sample is labelled and the dataset has no .classes; give it "
                               ".classes (the class names) so the number of classes is known")
        if labels.max() >= len(class_names):
            raise KDCacheError(f"{self._where}: label {int(labels.max())} but only {len(class_names)} classes; "
                               "fix the labels or the dataset's .classes")
        self.labels = labels
        vocab = _vocab_of(inner, self._where) if hasattr(inner, "vocab_size") or hasattr(inner, "vocab") else None
        self.info = DatasetInfo(spec, split, len(class_names), class_names, self._shape, self._kind, self._dtype,
                                vocab=vocab)

    def _labels(self, n: int) -> np.ndarray:
        for attr in ("targets", "labels"):
            t = getattr(self.inner, attr, None)
            if t is None:
                continue
            try:
                arr = np.asarray(t.cpu() if isinstance(t, Tensor) else t)
            except Exception:  # noqa: BLE001 - odd attribute: fall back to reading every item
                continue
            if arr.ndim == 1 and len(arr) == n and np.issubdtype(arr.dtype, np.integer):
                return np.where(arr < 0, -1, arr).astype(np.int64)
        return np.asarray([_label_of(self._item(k)[1], self._where) for k in range(n)], dtype=np.int64)

    def _token_labels(self, n: int) -> np.ndarray:
        """Per-token labels (N, L): the next-token id at every position, -1 = padding."""
        rows = []
        for k in range(n):
            y = self._item(k)[1]
            rows.append(np.asarray(y.cpu() if isinstance(y, Tensor) else y))
        if len({r.shape for r in rows}) != 1 or not np.issubdtype(rows[0].dtype, np.integer):
            raise KDCacheError(f"{self._where}: per-token labels must be integer vectors of one length; got "
                               f"{rows[0].dtype} {rows[0].shape} for sample 0")
        labels = np.stack(rows).astype(np.int64)
        return np.where(labels < 0, -1, labels)

    def _item(self, i: int) -> Any:
        item = self.inner[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise KDCacheError(f"{self._where}: items must be (sample, label) pairs, got {type(item).__name__}; "
                               "make __getitem__ return (sample, label)")
        return item

    def _convert(self, x: Any) -> np.ndarray:
        return _to_image(x, self._where) if self._kind == IMAGE else _to_tensor(x, self._where)

    def _sample(self, i: int) -> Tensor:
        a = self._convert(self._item(i)[0])
        if tuple(a.shape) != self._shape or str(a.dtype) != self._dtype:
            raise KDCacheError(f"{self._where}: sample {i} is {tuple(a.shape)} {a.dtype} but sample 0 is "
                               f"{self._shape} {self._dtype}; make the dataset yield samples of one shape and dtype")
        return torch.from_numpy(np.ascontiguousarray(a))

    def raw_bytes(self, i: int) -> bytes:
        x = self._item(self._index(i))[0]
        if isinstance(x, Tensor):
            return x.detach().cpu().contiguous().numpy().tobytes()
        return np.ascontiguousarray(np.asarray(x)).tobytes()
