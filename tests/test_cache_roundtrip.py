"""Dump a cache, then recompute the teacher's logits directly and compare them with what was stored."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, TEACHER, TEACHER_ARGS

N_TRAIN, C, BATCH = 1437, 10, 256


@pytest.fixture(scope="module")
def reference(teacher_weights):
    """The teacher's fp32 logits (N, C) for digits/train, computed here without the dump code.

    Batches follow the dump's rule (at most BATCH rows, never across a chunk boundary) so the
    float32 results can be compared bit for bit; returns logits_for(chunk_rows).
    """
    from kdcache.data.datasets import open_dataset
    from kdcache.data.render import Preprocess, render
    from kdcache.data.views import identity_views
    from kdcache.models import build_model

    ds = open_dataset("digits", "train")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    model = build_model(TEACHER, num_classes=C, input_shape=(3, IMAGE_SIZE, IMAGE_SIZE), **TEACHER_ARGS)
    model.load_state_dict(torch.load(teacher_weights, weights_only=True)["model"])
    model.eval()
    pre = Preprocess(IMAGE_SIZE)
    memo: dict[int, torch.Tensor] = {}

    def logits_for(chunk_rows: int = N_TRAIN) -> torch.Tensor:
        if chunk_rows not in memo:
            out = []
            with torch.inference_mode():
                for c0 in range(0, N_TRAIN, chunk_rows):
                    c1 = min(c0 + chunk_rows, N_TRAIN)
                    for s in range(c0, c1, BATCH):
                        e = min(s + BATCH, c1)
                        x = render(images[s:e], torch.from_numpy(identity_views(e - s)[:, 0]), pre)
                        out.append(model(x).float())
            memo[chunk_rows] = torch.cat(out)
        return memo[chunk_rows]

    logits_for.labels = np.asarray(ds.labels, dtype=np.int64)
    return logits_for


def _check_common(arrays: dict, attrs: dict, labels: np.ndarray, chunk_rows: int) -> None:
    n_chunks = math.ceil(N_TRAIN / chunk_rows)
    assert attrs["status"] == "complete"
    assert attrs["n"] == N_TRAIN and attrs["num_classes"] == C and attrs["n_views"] == 1
    assert attrs["chunk_rows"] == chunk_rows
    np.testing.assert_array_equal(arrays["labels"], labels)
    identity = np.broadcast_to(np.asarray([0, 0, 1, 1, 0], np.float32), (N_TRAIN, 1, 5))
    np.testing.assert_array_equal(arrays["views"], identity)
    assert arrays["done"].shape == (n_chunks,)
    assert (arrays["done"] == 1).all()
    assert arrays["checksum"].shape == (n_chunks, 1)


def _check_top1(attrs: dict, logits: torch.Tensor, labels: np.ndarray, stored_pred: np.ndarray) -> None:
    """stats.teacher_top1 is the accuracy of the stored prediction; it matches the fp32 argmax up to ties."""
    lab = torch.from_numpy(labels)
    by_hand = float((torch.from_numpy(stored_pred) == lab).double().mean())
    assert attrs["stats"]["teacher_top1"] == pytest.approx(by_hand, abs=1e-12)
    fp32 = float((logits.argmax(-1) == lab).double().mean())
    top2 = logits.half().float().topk(2, -1).values
    ambiguous = int((top2[:, 0] == top2[:, 1]).sum())  # argmax ties created by fp16 rounding
    assert abs(by_hand - fp32) <= ambiguous / N_TRAIN + 1e-12
    assert 0.0 < by_hand < 1.0


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("chunk_rows", [None, 100], ids=["one-chunk", "chunk100"])
def test_full_roundtrip(dump_cache, read_plain, reference, suffix, chunk_rows):
    extra = [] if chunk_rows is None else ["--chunk-rows", chunk_rows]
    arrays, attrs = read_plain(dump_cache(suffix, *extra))
    logits = reference(chunk_rows or N_TRAIN)
    _check_common(arrays, attrs, reference.labels, chunk_rows or N_TRAIN)
    assert attrs["kind"] == "full" and attrs["k"] is None and attrs["value_dtype"] == "float16"
    assert set(arrays) == {"values", "labels", "views", "done", "checksum"}
    values = arrays["values"]
    assert values.dtype == np.float16 and values.shape == (N_TRAIN, 1, C)
    got = torch.from_numpy(values[:, 0].astype(np.float32))
    torch.testing.assert_close(got, logits, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(got, logits.half().float(), atol=0, rtol=0)  # exactly fp16-rounded logits
    _check_top1(attrs, logits, reference.labels, values[:, 0].astype(np.float32).argmax(-1))
    assert attrs["stats"]["topk_mass"] == 1.0


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("chunk_rows", [None, 100], ids=["one-chunk", "chunk100"])
def test_topk_roundtrip(dump_cache, read_plain, reference, suffix, chunk_rows):
    k = 3
    extra = ["--topk", k] + ([] if chunk_rows is None else ["--chunk-rows", chunk_rows])
    arrays, attrs = read_plain(dump_cache(suffix, *extra))
    logits = reference(chunk_rows or N_TRAIN)
    _check_common(arrays, attrs, reference.labels, chunk_rows or N_TRAIN)
    assert attrs["kind"] == "topk" and attrs["k"] == k and attrs["index_dtype"] == "int16"
    values, indices, tail = arrays["values"][:, 0], arrays["indices"][:, 0], arrays["tail"][:, 0]
    assert values.dtype == np.float16 and indices.dtype == np.int16 and tail.dtype == np.float32

    ref_vals, ref_idx = logits.topk(k, dim=-1)
    sorted_ref = ref_vals.sort(-1, descending=True).values
    assert (sorted_ref[:, :-1] > sorted_ref[:, 1:]).all(), "ties in the random teacher's logits: change seed"
    np.testing.assert_array_equal(indices, ref_idx.numpy())
    got = torch.from_numpy(values.astype(np.float32))
    torch.testing.assert_close(got, ref_vals, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(got, ref_vals.half().float(), atol=0, rtol=0)

    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, ref_idx, False)
    ref_tail = logits.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(torch.from_numpy(tail), ref_tail, atol=1e-4, rtol=1e-5)

    _check_top1(attrs, logits, reference.labels, indices[:, 0].astype(np.int64))
    # top-k mass at T=1 from the teacher's own logits (fp16 rounding of the values moves it by < 1e-3)
    mass = float(logits.softmax(-1).gather(1, ref_idx).sum(-1).mean())
    assert attrs["stats"]["topk_mass"] == pytest.approx(mass, abs=1e-3)


@pytest.mark.parametrize("topk", [None, 3], ids=["full", "top3"])
def test_float32_is_exact(dump_cache, read_plain, reference, topk):
    extra = ["--dtype", "float32"] + ([] if topk is None else ["--topk", topk])
    arrays, attrs = read_plain(dump_cache(".zarr", *extra))
    logits = reference()
    assert attrs["value_dtype"] == "float32" and arrays["values"].dtype == np.float32
    if topk is None:
        torch.testing.assert_close(torch.from_numpy(arrays["values"][:, 0]), logits, atol=0, rtol=0)
    else:
        vals, idx = logits.topk(topk, dim=-1)
        torch.testing.assert_close(torch.from_numpy(arrays["values"][:, 0]), vals, atol=0, rtol=0)
        np.testing.assert_array_equal(arrays["indices"][:, 0], idx.numpy())


def test_backends_store_the_same_arrays(dump_cache, read_plain):
    """A Zarr and an HDF5 dump of the same command hold identical arrays and the same layout attrs."""
    for extra in ([], ["--topk", 3]):
        za, zattrs = read_plain(dump_cache(".zarr", *extra))
        ha, hattrs = read_plain(dump_cache(".h5", *extra))
        assert set(za) == set(ha)
        for name in za:
            np.testing.assert_array_equal(za[name], ha[name], err_msg=name)
            assert za[name].dtype == ha[name].dtype, name
        for key in ("kind", "k", "n", "num_classes", "n_views", "chunk_rows", "value_dtype", "index_dtype",
                    "dataset", "stats"):
            assert zattrs[key] == hattrs[key], key
