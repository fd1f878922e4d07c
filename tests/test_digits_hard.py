"""digits-hard: the generated harder digits benchmark (kdcache.data.hard)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kdcache.data import hard
from kdcache.data.datasets import _digits_arrays, dataset_names, fingerprint, open_dataset

SPECS = hard.spec_names()


def _fresh(spec: str, split: str) -> np.ndarray:
    hard._build.cache_clear()
    return np.array(open_dataset(spec, split).data)


def test_registered_by_name():
    assert "digits-hard" in dataset_names()
    assert SPECS == ["digits-hard", "digits-hard-shift", "digits-hard-small", "digits-hard-large"]
    ds = open_dataset("Digits-Hard", "train")  # names are case-insensitive, like digits
    assert ds.info.spec == "Digits-Hard"


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_builds_byte_identical(split):
    a, b = _fresh("digits-hard", split), _fresh("digits-hard", split)
    assert a.tobytes() == b.tobytes()
    assert fingerprint(open_dataset("digits-hard", split)) == fingerprint(open_dataset("digits-hard", split))


def test_pinned_digest():
    """The exact bytes are part of the benchmark: a change to the generator must be deliberate (bump this)."""
    got = {s: hashlib.sha256(open_dataset("digits-hard", s).data.tobytes()).hexdigest()[:16]
           for s in ("train", "test")}
    assert got == {"train": "bce571a1e4ff5dbb", "test": "0692a01f1079c55a"} or pytest.fail(f"digests changed: {got}")


@pytest.mark.parametrize("spec", SPECS)
def test_shapes_dtypes(spec):
    for split, n in (("train", 2874), ("test", 1080)):
        ds = open_dataset(spec, split)
        assert len(ds) == n and ds.data.shape == (n, 24, 24) and ds.data.dtype == np.uint8
        assert ds.labels.dtype == np.int64 and ds.labels.shape == (n,)
        assert ds.info.sample_shape == (1, 24, 24) and ds.info.num_classes == 10
        x, y, i = ds[5]
        assert tuple(x.shape) == (1, 24, 24) and str(x.dtype) == "torch.uint8" and y == int(ds.labels[5]) and i == 5
        assert 0 < ds.data.mean() < 255 and ds.data.std() > 10  # not blank, not constant


def test_label_balance():
    for split in ("train", "test"):
        counts = np.bincount(open_dataset("digits-hard", split).labels, minlength=10)
        n = counts.sum()
        assert counts.min() >= 0.9 * n / 10 and counts.max() <= 1.1 * n / 10, counts


def test_train_test_disjoint():
    tr, te = open_dataset("digits-hard", "train"), open_dataset("digits-hard", "test")
    assert not set(tr.source_index.tolist()) & set(te.source_index.tolist())
    assert len(set(tr.source_index.tolist()) | set(te.source_index.tolist())) == 1797
    images, y = _digits_arrays()
    assert (y[tr.source_index] == tr.labels).all() and (y[te.source_index] == te.labels).all()
    tr_rows = {r.tobytes() for r in tr.data}
    assert not any(r.tobytes() in tr_rows for r in te.data)
    assert len(tr_rows) == len(tr)  # every rendering differs, repeats of one digit included


def test_variants_share_train_and_test_draws():
    base_tr = open_dataset("digits-hard", "train").data
    base_te = open_dataset("digits-hard", "test")
    for spec in SPECS[1:]:
        assert open_dataset(spec, "train").data.tobytes() == base_tr.tobytes()
        te = open_dataset(spec, "test")
        assert (te.labels == base_te.labels).all() and (te.source_index == base_te.source_index).all()
        assert te.data.tobytes() != base_te.data.tobytes()


def test_fast_to_build():
    import time

    _digits_arrays()
    hard._build.cache_clear()
    t = time.perf_counter()
    open_dataset("digits-hard", "train"), open_dataset("digits-hard", "test")
    assert time.perf_counter() - t < 2.0


def test_unknown_variant():
    with pytest.raises(Exception):
        open_dataset("digits-hard-tiny", "train")
