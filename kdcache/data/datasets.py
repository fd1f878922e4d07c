"""Dataset specs and their openers: deterministic samples plus labels, and the identity a cache records.

Every dataset here yields fixed-shape samples (see :mod:`kdcache.data.sources`) together with the label and the
sample index.  Images are *base* images at one native resolution: all resizing, cropping, flipping and
normalisation happens later, batched, in :func:`kdcache.data.render.render`, so that a teacher (stage 1, dumping
logits into the cache) and a student (stage 2, training from the cache) see exactly the same view of an image even
at different input resolutions.  Tensor samples are never transformed.

The same ``(spec, split)`` always gives the same samples in the same order;
:func:`fingerprint` turns that into a short hash that is stored with a cache
and checked when the cache is reopened for training.

Specs understood by :func:`open_dataset`:

``digits``
    The embedded default: scikit-learn's copy of the UCI handwritten digits
    (1797 real 8x8 grey images, 10 classes; values 0..16 are mapped to uint8
    with ``round(v * 255 / 16)``).  Needs no files and no network.  The split
    is a deterministic stratified 80/20 split (see :func:`_digits_split`):
    1437 train / 360 test images, each split in original sample order.
``digits-hard`` (and ``digits-hard-shift``, ``-small``, ``-large``)
    A harder benchmark generated from the same digits (see :mod:`kdcache.data.hard`): each digit rendered at a
    random position and scale on a 24x24 canvas among fragments of other digits, plus noise; 2874 train / 1080
    test images (1, 24, 24), from digits' own split of source digits.  The variants share the train split and
    change the test digits' geometry (translated beyond the training range, smaller, larger).  Deterministic.
``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``
    torchvision's datasets, read from ``data_root`` (default: the
    ``KDCACHE_DATA_ROOT`` environment variable, else ``~/.cache/kdcache/data``),
    fetched there first when ``download=True``.  The in-memory ``.data`` arrays
    are used directly (no PIL per item).  MNIST-style: 1x28x28; CIFAR: 3x32x32.
``imagefolder:PATH``
    A torchvision ``ImageFolder`` tree (one sub-folder per class).  The split
    reads ``PATH/<split>/`` (for ``test``, ``PATH/val/`` is accepted too when
    ``PATH/test/`` is absent).  If *neither* ``PATH/train`` nor
    ``PATH/test``/``PATH/val`` exists, ``PATH`` itself is used for whichever
    split is requested (so ``train`` and ``test`` are then the same images).
    Images are decoded with PIL, converted to RGB, resized (shorter side to
    256, antialiased bilinear) and centre-cropped to 256 x 256.  ``raw_bytes``
    is the file's bytes.
``wds:PATTERN``
    WebDataset tar shards, local or fsspec URLs (see :mod:`kdcache.data.wds`): brace ranges
    (``train-{000000..000099}.tar``) and globs; ``{split}`` in the pattern becomes ``train`` / ``test`` (for
    ``test``, ``val`` when there is no ``test`` shard), else both splits read the same shards.  A sample is the
    members sharing a key: an image (``.jpg``/``.png``/``.webp``) and a ``.cls`` or ``.json`` label.  Indexed once
    (tar headers, cached per shard), decoded as ``imagefolder:`` decodes files; ``raw_bytes`` is the image member.
``hfds:DIR``
    A Hugging Face ``datasets`` Dataset/DatasetDict written by ``save_to_disk`` (the ``shards`` extra): splits
    ``train`` and ``test`` (or ``validation``/``val``) of a DatasetDict or as sub-folders, else one dataset for both;
    image and label columns auto-detected (``Image`` / ``ClassLabel`` features) or named with
    ``hfds:DIR?image=COL&label=COL``.  Decoded as ``imagefolder:``; ``raw_bytes`` is the stored image bytes.
``text:PATH``, ``tokens:DIR``, ``pydoc``
    Token sequences for language-model distillation (see :mod:`kdcache.data.text`): ``seq_len`` (``--seq-len``)
    tokens per sample, one next-token label per position (label ``j`` is the token after position ``j``).
    ``text:PATH`` is a UTF-8 file or folder, tokenized by ``tokenizer`` (``None``/``"bytes"``: UTF-8 bytes, or
    ``"hf:DIR"``), split deterministically: the first ``n - n // 10`` token ids are ``train``, the last
    ``n // 10`` ``test``.  ``tokens:DIR`` reads nanoGPT-style ``train.bin``/``val.bin`` with ``DIR/meta.json``
    (``vocab_size``, ``dtype``).  ``pydoc`` is the English reference text that ships with Python
    (``pydoc_data.topics``), split as ``text:``.
``agreement``
    Synthetic subject-verb number agreement (see :mod:`kdcache.data.agreement`): word-id prefixes up to the verb,
    left-padded to 23, labelled with the verb's number (singular/plural); 10 000 train / 3000 test sentences,
    ``ds.attractors`` per sample (0..4).  Generated, so it needs no files and no network.
``package.module:factory``
    ``factory(split=split, root=data_root)`` is imported and called.  It may
    return a :class:`SourceDataset` (used as is) or any map-style torch
    ``Dataset`` yielding ``(sample, label, ...)``, which is wrapped: see
    :class:`WrappedDataset` (images or tensors, recognised or declared).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import Tensor

from kdcache.data.agreement import open_agreement
from kdcache.data.hard import is_hard_spec, open_digits_hard
from kdcache.data.sources import (
    ArrayDataset,
    DatasetInfo,
    ImageFolderDataset,
    SourceDataset,
    WrappedDataset,
)
from kdcache.data.hfds import open_hfds
from kdcache.data.text import open_pydoc, open_text, open_tokens
from kdcache.data.wds import open_wds
from kdcache.errors import KDCacheError

SPLITS = ("train", "test")
DEFAULT_IMAGEFOLDER_SIZE = 256
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# spec name -> (torchvision class name, display name)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR10"),
    "cifar100": ("CIFAR100", "CIFAR100"),
    "mnist": ("MNIST", "MNIST"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST"),
}
_SPEC_FORMS = ("imagefolder:PATH", "wds:PATTERN", "hfds:DIR", "text:PATH", "tokens:DIR", "package.module:factory")
_SEQUENCE_TEXT = ("pydoc",)  # built-ins that take --seq-len and --tokenizer (besides text:)


# --------------------------------------------------------------------------- openers


def default_data_root() -> str:
    """``$KDCACHE_DATA_ROOT`` if set, else ``~/.cache/kdcache/data``."""
    env = os.environ.get("KDCACHE_DATA_ROOT")
    return os.path.expanduser(env) if env else os.path.expanduser("~/.cache/kdcache/data")


def dataset_names() -> list[str]:
    """The built-in dataset names.

    Besides these, ``open_dataset`` takes the forms ``imagefolder:PATH``,
    ``wds:PATTERN`` (WebDataset tar shards), ``hfds:DIR`` (a saved Hugging Face
    dataset), ``text:PATH``, ``tokens:DIR`` and ``package.module:factory``.
    """
    return ["digits", "digits-hard", *_TORCHVISION, "pydoc", "agreement"]


def _valid_specs_text() -> str:
    return ", ".join([*dataset_names(), *_SPEC_FORMS])


def _digits_split(y: np.ndarray, split: str) -> np.ndarray:
    """Deterministic stratified split of the digits: sorted sample indices.

    ``ceil(0.2 * N)`` test samples (360 of 1797) are shared out over the
    classes in proportion to their sizes (floors first, then the leftover
    one by one to the largest remainders, ties to the lower class).  Each
    class's test samples are the first ones of a permutation of its indices
    drawn, class by class in ascending order, from one
    ``np.random.RandomState(0)`` -- a legacy generator whose stream numpy
    keeps fixed across versions.  Both splits keep the original sample order.
    """
    classes, counts = np.unique(y, return_counts=True)
    n_test = int(math.ceil(DIGITS_TEST_FRACTION * len(y)))
    exact = counts * n_test / len(y)
    take = np.floor(exact).astype(np.int64)
    left = n_test - int(take.sum())
    order = np.lexsort((np.arange(len(classes)), -(exact - take)))
    take[order[:left]] += 1
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    test_idx = np.sort(np.concatenate(test))
    if split == "test":
        return test_idx
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0))
    images = np.clip(images, 0, 255).astype(np.uint8)  # (1797, 8, 8)
    images.setflags(write=False)
    y = np.asarray(d.target, dtype=np.int64)
    y.setflags(write=False)
    return images, y


def _open_digits(spec: str, split: str) -> ArrayDataset:
    images, y = _digits_arrays()
    idx = _digits_split(y, split)
    shape = (1, 8, 8)
    info = DatasetInfo(spec, split, 10, tuple(str(i) for i in range(10)), shape)
    return ArrayDataset(info, np.ascontiguousarray(images[idx]), y[idx], "NHW")


def _open_torchvision(spec: str, name: str, split: str, data_root: str | None, download: bool) -> ArrayDataset:
    import torchvision.datasets as tvd

    cls_name, display = _TORCHVISION[name]
    root = os.path.expanduser(data_root) if data_root else default_data_root()
    try:
        ds = getattr(tvd, cls_name)(root=root, train=(split == "train"), download=download)
    except RuntimeError as e:
        if download:
            raise KDCacheError(
                f"{display} could not be downloaded to {root} ({str(e).splitlines()[0] if str(e) else e}): "
                "check the network, or pass --data-root DIR holding it"
            ) from None
        raise KDCacheError(
            f"{display} not found under {root}: pass --data-root DIR holding it, or --download"
        ) from None
    except Exception as e:  # noqa: BLE001 - network errors etc. while downloading
        if not download:
            raise
        raise KDCacheError(
            f"{display} could not be downloaded to {root} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): check the network, "
            "or pass --data-root DIR holding it"
        ) from None
    data = ds.data
    if isinstance(data, Tensor):
        data = data.numpy()
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(
        ds.targets.numpy() if isinstance(ds.targets, Tensor) else ds.targets, dtype=np.int64
    )
    if data.ndim == 3:
        layout, shape = "NHW", (1, data.shape[1], data.shape[2])
    else:
        layout, shape = "NHWC", (data.shape[3], data.shape[1], data.shape[2])
    classes = tuple(str(c) for c in ds.classes)
    info = DatasetInfo(spec, split, len(classes), classes, shape)  # type: ignore[arg-type]
    return ArrayDataset(info, data, labels, layout)


def _imagefolder_dir(spec: str, path: Path, split: str) -> Path:
    names = ("test", "val") if split == "test" else ("train",)
    for n in names:
        if (path / n).is_dir():
            return path / n
    has_split_dirs = any((path / n).is_dir() for n in ("train", "test", "val"))
    if has_split_dirs:
        raise KDCacheError(
            f"{spec}: no {path / split} folder for the {split} split: "
            f"create it, or point imagefolder: at a folder of class folders"
        )
    return path


def _open_imagefolder(spec: str, path_text: str, split: str) -> ImageFolderDataset:
    if not path_text:
        raise KDCacheError("imagefolder: needs a path: use imagefolder:/path/to/images")
    path = Path(os.path.expanduser(path_text))
    if not path.is_dir():
        raise KDCacheError(f"{spec}: folder {path} does not exist: pass an existing folder of class folders")
    root = _imagefolder_dir(spec, path, split)
    size = DEFAULT_IMAGEFOLDER_SIZE
    from torchvision.datasets import ImageFolder

    try:
        tv = ImageFolder(str(root), loader=lambda p: p)  # only used to scan the tree
    except (FileNotFoundError, RuntimeError) as e:
        raise KDCacheError(
            f"{spec}: no images found under {root} ({str(e).splitlines()[0]}): "
            "it must hold one sub-folder of images per class"
        ) from None
    classes = tuple(tv.classes)
    info = DatasetInfo(spec, split, len(classes), classes, (3, size, size))
    return ImageFolderDataset(info, list(tv.samples), size)


def _open_factory(spec: str, split: str, data_root: str | None) -> SourceDataset:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise KDCacheError(
            f"cannot import module {mod_name!r} for dataset {spec!r} ({e}): "
            "make it importable (install it or add its folder to PYTHONPATH)"
        ) from None
    fn: Callable[..., Any] | None = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise KDCacheError(
            f"module {mod_name!r} has no callable {fn_name!r}: "
            f"define {fn_name}(split, root) there or fix the spec"
        )
    try:
        inspect.signature(fn).bind(split=split, root=data_root)
    except TypeError:
        raise KDCacheError(
            f"{spec} must accept keyword arguments split= and root=: "
            f"define it as {fn_name}(split, root=None)"
        ) from None
    except ValueError:  # no signature available (builtins): just try
        pass
    inner = fn(split=split, root=data_root)
    return inner if isinstance(inner, SourceDataset) else WrappedDataset(spec, split, inner)


def open_dataset(spec: str, split: str = "train", data_root: str | None = None, download: bool = False,
                 seq_len: int | None = None, tokenizer: Any = None) -> SourceDataset:
    """Open ``spec``'s ``split`` (see the module docstring for the specs).

    ``data_root`` is where torchvision datasets live (default
    :func:`default_data_root`) and what factories receive as ``root``;
    ``download`` lets torchvision fetch missing files.  ``seq_len`` (tokens
    per sample) is required by ``text:``, ``tokens:`` and ``pydoc`` and refused
    by every other dataset; ``tokenizer`` (``"bytes"``, ``"hf:DIR"``) applies
    to ``text:`` and ``pydoc`` only.
    """
    if split not in SPLITS:
        raise KDCacheError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not isinstance(spec, str) or not spec.strip():
        raise KDCacheError(f"empty dataset spec: use one of {_valid_specs_text()}")
    text = spec.strip()
    low = text.lower()
    is_text = low.startswith("text:") or low in _SEQUENCE_TEXT
    if tokenizer is not None and not is_text:
        raise KDCacheError(f"--tokenizer applies to text:PATH and pydoc datasets, not {spec!r}: leave it out")
    if low.startswith("text:"):
        return open_text(text, text[len("text:"):], split, seq_len, tokenizer)
    if low == "pydoc":
        return open_pydoc(text, split, seq_len, tokenizer)
    if low.startswith("tokens:"):
        return open_tokens(text, text[len("tokens:"):], split, seq_len)
    if seq_len is not None:
        raise KDCacheError(f"--seq-len applies to text/tokens datasets (text:PATH, tokens:DIR, pydoc), not "
                           f"{spec!r}: leave it out")
    if low == "agreement":
        return open_agreement(text, split)
    if low == "digits":
        return _open_digits(spec, split)
    if is_hard_spec(low):
        return open_digits_hard(text, split)
    if low in _TORCHVISION:
        return _open_torchvision(spec, low, split, data_root, download)
    if low.startswith("imagefolder:"):
        return _open_imagefolder(spec, text[len("imagefolder:"):], split)
    if low.startswith("wds:"):
        return open_wds(text, text[len("wds:"):], split, DEFAULT_IMAGEFOLDER_SIZE)
    if low.startswith("hfds:"):
        return open_hfds(text, text[len("hfds:"):], split, DEFAULT_IMAGEFOLDER_SIZE)
    if ":" in text:
        mod_name, _, fn_name = text.partition(":")
        if all(p.isidentifier() for p in mod_name.split(".")) and fn_name.isidentifier():
            return _open_factory(text, split, data_root)
    raise KDCacheError(f"unknown dataset {spec!r}: use one of {_valid_specs_text()}")


# --------------------------------------------------------------------------- fingerprint


def _probe_indices(n: int, n_probe: int) -> np.ndarray:
    if n == 0 or n_probe <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(n_probe, n)).round().astype(np.int64))


def fingerprint(ds: SourceDataset, n_probe: int = 64) -> str:
    """``"sha256:<hex>"`` identifying a dataset's content and order.

    Hashes, in order: a version tag, N (int64 LE), the labels (int64 LE), and
    for each of ``min(n_probe, N)`` evenly spaced sample indices
    (``np.linspace(0, N-1, k).round()``, unique) the index (int64 LE), the
    length of ``raw_bytes(i)`` (int64 LE) and ``raw_bytes(i)`` itself.  It never
    looks at rendered or resized images, so a teacher and a student using
    the same dataset at different resolutions get the same fingerprint.
    """
    n = len(ds)
    h = hashlib.sha256()
    h.update(b"kdcache-dataset-v1\0")
    h.update(np.int64(n).astype("<i8").tobytes())
    h.update(bytes.fromhex(labels_sha256(ds.labels)) if ds.info.per_token else
             memoryview(np.ascontiguousarray(ds.labels, dtype="<i8")))  # per-token labels: their hash, not a copy
    for i in _probe_indices(n, n_probe):
        raw = ds.raw_bytes(int(i))
        h.update(np.asarray([i, len(raw)], dtype="<i8").tobytes())
        h.update(raw)
    return "sha256:" + h.hexdigest()


def labels_sha256(labels: np.ndarray, block: int = 1 << 16) -> str:
    """Hex SHA-256 of labels as little-endian int64, C order (the `labels_sha256` attributes); hashed in blocks of
    rows so that a memory-mapped token corpus is never copied whole."""
    h = hashlib.sha256()
    for s in range(0, len(labels), block):
        h.update(memoryview(np.ascontiguousarray(labels[s:s + block], dtype="<i8")))
    return h.hexdigest()


def identity(ds: SourceDataset) -> dict:
    """What a cache records about its dataset's samples, computed from the dataset itself (see format.attrs)."""
    out = {"n": len(ds), "num_classes": ds.info.num_classes, "class_names": list(ds.info.class_names),
           "fingerprint": fingerprint(ds), "labels_sha256": labels_sha256(ds.labels)}
    if ds.info.vocab is not None:
        out["vocab"] = ds.info.vocab
    return out


def is_factory(spec: str) -> bool:
    """True for a `package.module:factory` spec: opening it imports and runs the user's code."""
    mod_name, sep, fn_name = spec.strip().partition(":")
    if mod_name.lower() in ("imagefolder", "text", "tokens", "wds", "hfds"):  # built-in forms that take a path
        return False
    return bool(sep) and all(p.isidentifier() for p in mod_name.split(".")) and fn_name.isidentifier()
