"""`kdcache verify`: prove a cache sound, or say precisely which array, chunk and check fails."""

from __future__ import annotations

import numpy as np

from kdcache.data.datasets import labels_sha256
from kdcache.errors import KDCacheError
from kdcache.format.spec import (
    STATUS_COMPLETE,
    Layout,
    check_version,
    is_structural,
    schema_problems,
    view_checksum,
)
from kdcache.io.reader import check_written
from kdcache.storage.backends import Store, open_store


def _arrays(store: Store, layout: Layout) -> list[str]:
    problems = []
    for name, (shape, dtype, _) in layout.arrays().items():
        try:
            if name not in store:
                problems.append(f"{name}: array missing")
                continue
            a = store[name]
        except Exception as e:  # damaged array metadata fails in library-specific ways
            problems.append(f"{name}: array metadata unreadable ({type(e).__name__}: {e})")
            continue
        if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
            problems.append(f"{name}: shape {tuple(a.shape)} dtype {a.dtype}, expected shape {shape} dtype {dtype}")
    return problems


def _chunk(store: Store, layout: Layout, c: int, v: int, stored_crc: int) -> list[str]:
    sl = layout.chunk_slice(c)
    where = f"chunk {c} (rows {sl.start}-{sl.stop - 1}), view {v}"
    try:
        rows = {n: np.asarray(store[n][sl, v]) for n in layout.per_view()}
    except Exception as e:  # a damaged chunk fails to decode in many library-specific ways
        return [f"{where}: cannot be read ({type(e).__name__}: {e})"]
    problems = []
    if view_checksum(rows) != stored_crc:
        problems.append(f"{where}: checksum mismatch (stored {stored_crc:#010x}, data {view_checksum(rows):#010x})")
    for n in ("values", "top", "tail"):
        if n in rows:
            bad = int((~np.isfinite(rows[n].astype(np.float32))).reshape(len(rows[n]), -1).any(1).sum())
            if bad:
                problems.append(f"{where}: {n} holds NaN or Inf in {bad} rows")
    if "indices" in rows:
        idx = rows["indices"]
        if idx.size and (idx.min() < 0 or idx.max() >= layout.num_classes):
            problems.append(f"{where}: indices outside [0, {layout.num_classes})")
        if "values" in rows and (np.diff(rows["values"].astype(np.float32), axis=-1) > 0).any():
            problems.append(f"{where}: top-k values not sorted in descending order")  # q8 codes are sorted by form
    return problems


def verify(path: str) -> tuple[list[str], dict]:
    """All problems found (empty when sound) and a summary of what was checked."""
    try:
        check_written(path)
        store = open_store(path, "r")
    except KDCacheError as e:
        return [str(e)], {}
    try:
        attrs = store.attrs
        try:
            check_version(attrs, path)
        except KDCacheError as e:
            return [str(e)], {}
        problems = schema_problems(attrs)
        if any(is_structural(p) for p in problems):
            return problems, {}
        if attrs["status"] != STATUS_COMPLETE:
            problems.append(f"attributes: status is {attrs['status']!r}, not 'complete' (finish it with --resume)")
        try:
            layout = Layout.from_attrs(attrs)
        except (KDCacheError, ValueError, TypeError) as e:
            return problems + [f"attributes: the layout they describe is invalid ({e})"], {}
        array_problems = _arrays(store, layout)
        if array_problems:  # chunk checks need every array in its declared shape
            return problems + array_problems, {}
        done = np.asarray(store["done"][...], dtype=bool)
        if not done.all():
            problems.append(f"done: {int((~done).sum())} of {len(done)} chunks not written "
                            f"(first: {int(np.nonzero(~done)[0][0])})")
        crcs = np.asarray(store["checksum"][...], dtype=np.uint32)
        for c in np.nonzero(done)[0]:
            for v in range(layout.n_views):
                problems += _chunk(store, layout, int(c), v, int(crcs[c, v]))
        labels = np.asarray(store["labels"][...], dtype="<i8")
        if labels.size and (labels.min() < -1 or labels.max() >= layout.num_classes):
            problems.append(f"labels: values outside [-1, {layout.num_classes})")
        key, want = ("rows", attrs["rows"].get("labels_sha256")) if attrs.get("rows") else \
            ("dataset", attrs["dataset"].get("labels_sha256"))
        if want and labels_sha256(labels) != want:
            problems.append(f"labels: sha256 differs from {key}.labels_sha256 in the attributes")
        return problems, {"chunks": int(done.sum()), "views": layout.n_views, "n": layout.n}
    finally:
        store.close()
