"""Hugging Face ``datasets`` saved to disk (``hfds:DIR``) as a map-style
:class:`~kdcache.data.sources.SourceDataset` of base images, decoded as ``imagefolder:`` decodes files
(:func:`kdcache.data.sources.decode_image`).

A ``datasets.Dataset`` or ``DatasetDict`` written by ``save_to_disk`` (``pip install 'kdcache[shards]'``). Splits: a
``DatasetDict``'s ``train`` and ``test`` (else ``validation``/``val``); else ``DIR/train`` and ``DIR/test`` (or
``DIR/validation``/``DIR/val``) saved separately; else one saved ``Dataset`` serves both splits. Columns:
``hfds:DIR?image=COL&label=COL`` names them; by default the image column is the first of the ``Image`` feature type
(else one named ``image``/``img``/``jpg``/``png``/``webp`` holding bytes), the label column the first ``ClassLabel``
(its names are the class names), else one named ``label``/``labels``/``cls``/``target``/``class`` of integers.
Images are read as stored bytes (``Image(decode=False)``) and decoded as above.

*Fingerprints.* ``raw_bytes(i)`` is the image's stored bytes (one read), so a fingerprint (N, every label, 64 probed
images: :func:`kdcache.data.datasets.fingerprint`) costs 64 reads, not a pass over the data.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from torch import Tensor

from kdcache.data.sources import DatasetInfo, SourceDataset, decode_image
from kdcache.data.wds import exists, fs_of, is_url
from kdcache.errors import KDCacheError, printable

INSTALL_HINT = "pip install 'kdcache[shards]'"

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
_LABEL_NAMES = ("label", "labels", "cls", "target", "class", "fine_label")
_TEST_SPLITS = ("test", "validation", "val")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise KDCacheError(f"hfds: datasets need the datasets package ({e}): {INSTALL_HINT}") from None
    return datasets


def _parse_hfds(spec: str, text: str) -> tuple[str, dict[str, str]]:
    path, _, query = text.partition("?")
    if not path:
        raise KDCacheError("hfds: needs a folder: use hfds:DIR (written by save_to_disk), or "
                           "hfds:DIR?image=COL&label=COL")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = sorted(set(options) - {"image", "label"})
    if unknown:
        raise KDCacheError(f"{spec}: unknown option {', '.join(unknown)}: hfds:DIR takes ?image=COL&label=COL")
    return path, options


def _saved(path: str, name: str) -> bool:
    return os.path.isfile(os.path.join(path, name)) if not is_url(path) else exists(f"{path.rstrip('/')}/{name}")


def _locate(spec: str, path: str, split: str) -> tuple[str, str | None]:
    """(folder to load_from_disk, DatasetDict key or None) for ``split``."""
    names = ("train",) if split == "train" else _TEST_SPLITS
    if _saved(path, "dataset_dict.json"):
        with (open(os.path.join(path, "dataset_dict.json")) if not is_url(path)
              else fs_of(path)[0].open(fs_of(path)[1].rstrip("/") + "/dataset_dict.json")) as f:
            keys = json.load(f).get("splits", [])
        for n in names:
            if n in keys:
                return path, n
        raise KDCacheError(f"{spec}: the saved DatasetDict has splits {', '.join(keys)} but no {split} split "
                           f"({' or '.join(names)}): save one under that name")
    if _saved(path, "state.json"):
        return path, None
    for n in names:
        sub = f"{path.rstrip('/')}/{n}"
        if _saved(sub, "state.json"):
            return sub, None
    raise KDCacheError(f"{spec}: {printable(path)} holds no dataset saved by save_to_disk (no dataset_dict.json, "
                       f"state.json, or {split} folder): save one with Dataset.save_to_disk")


def _load(folder: str, key: str | None) -> Any:
    ds = _datasets().load_from_disk(folder)
    return ds[key] if key is not None else ds


def _columns(spec: str, ds: Any, options: dict[str, str]) -> tuple[str, str]:
    datasets = _datasets()
    features = ds.features
    cols = list(features)

    def pick(kind: str, given: str | None, typed: type, names: tuple[str, ...]) -> str:
        if given is not None:
            if given not in features:
                raise KDCacheError(f"{spec}: no column {given!r} for the {kind}: the columns are {', '.join(cols)}")
            return given
        found = [c for c in cols if isinstance(features[c], typed)]
        found += [c for c in cols if c.lower() in names and c not in found]
        if not found:
            raise KDCacheError(f"{spec}: no {kind} column found among {', '.join(cols)}: name it with "
                               f"hfds:DIR?{kind}=COL")
        return found[0]

    image = pick("image", options.get("image"), datasets.Image, _IMAGE_NAMES)
    label = pick("label", options.get("label"), datasets.ClassLabel, _LABEL_NAMES)
    return image, label


class HFDiskDataset(SourceDataset):
    """A ``datasets`` table saved to disk: ``ds[i]`` reads row i's stored image bytes and decodes them."""

    def __init__(self, info: DatasetInfo, folder: str, key: str | None, image_col: str, labels: np.ndarray,
                 size: int):
        self.info, self.folder, self.key, self.image_col, self.size = info, folder, key, image_col, int(size)
        self.labels = labels
        self._table: Any = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_table"] = None  # each process maps the Arrow files itself
        return state

    def _column(self) -> Any:
        if self._table is None:
            ds = _load(self.folder, self.key).select_columns([self.image_col])
            feature = ds.features[self.image_col]
            if isinstance(feature, _datasets().Image):
                ds = ds.cast_column(self.image_col, _datasets().Image(decode=False))
            self._table = ds
        return self._table

    def _read(self, i: int) -> bytes:
        value = self._column()[int(i)][self.image_col]
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                with open(value["path"], "rb") as f:
                    data = f.read()
            value = data
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise KDCacheError(f"{self.info.spec}: column {self.image_col!r} of row {i} holds "
                               f"{type(value).__name__}, not image bytes: name the image column with ?image=COL")
        return bytes(value)

    def _sample(self, i: int) -> Tensor:
        return decode_image(self._read(i), self.size, f"row {i} of {printable(self.folder)}")

    def raw_bytes(self, i: int) -> bytes:
        return self._read(self._index(i))


def open_hfds(spec: str, text: str, split: str, size: int) -> HFDiskDataset:
    """``hfds:DIR[?image=COL&label=COL]``'s ``split`` (see the module docstring)."""
    path, options = _parse_hfds(spec, text)
    path = os.path.expanduser(path) if not is_url(path) else path
    if not is_url(path) and not os.path.isdir(path):
        raise KDCacheError(f"{spec}: folder {printable(path)} does not exist: pass a folder written by "
                           "save_to_disk")
    _datasets()
    folder, key = _locate(spec, path, split)
    ds = _load(folder, key)
    image_col, label_col = _columns(spec, ds, options)
    try:
        labels = np.asarray(ds.with_format("numpy")[label_col], dtype=np.float64)  # one Arrow column, in row order
    except (TypeError, ValueError):
        labels = np.full(1, np.nan)
    if labels.ndim != 1 or np.isnan(labels).any() or (labels != np.round(labels)).any():
        raise KDCacheError(f"{spec}: label column {label_col!r} is not integers: name the label column with "
                           "?label=COL")
    labels = np.where(labels < 0, -1, labels).astype(np.int64)
    feature = ds.features[label_col]
    if isinstance(feature, _datasets().ClassLabel):
        names = tuple(str(n) for n in feature.names)
    else:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0))
    if not len(ds):
        raise KDCacheError(f"{spec} ({split}) is empty: save a dataset with rows")
    if not names:
        raise KDCacheError(f"{spec} ({split}): no row is labelled: use a labelled dataset")
    if labels.max() >= len(names):
        raise KDCacheError(f"{spec} ({split}): label {int(labels.max())} but only {len(names)} classes")
    info = DatasetInfo(spec, split, len(names), names, (3, size, size))
    return HFDiskDataset(info, folder, key, image_col, labels, size)
