"""Sharing caches on disk: pack/convert round trips, merge into ensembles, format versions.

Caches over HTTP and S3 are tested in tests/test_remote.py. The CLI runs in-process through click's CliRunner.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import h5py
import numpy as np
import pytest
import zarr
from clitools import assert_same_arrays, dump_args, error_line, kd, kt, ok, read_plain, tree_hash
from sharefix import N_TEST, N_TRAIN, ROWS, C, make_partial, train_args, without

from kdcache.format.spec import READER_MAJOR
from kdcache.io import open_cache
from kdcache.ops.convert import differences
from kdcache.storage.backends import open_store

NEWER_MAJOR = f"{READER_MAJOR + 1}.0"  # a major version newer than this kdcache reads


# --- helpers -------------------------------------------------------------------------------------

def set_attrs(path: str, **changes) -> None:
    if path.endswith(".h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["kdcache"] = json.dumps(json.loads(f.attrs["kdcache"]) | changes)
        return
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | changes


def chunk_shapes(path: str) -> dict[str, tuple[int, ...]]:
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            return {k: tuple(f[k].chunks) for k in f}
    return {k: tuple(a.chunks) for k, a in zarr.open_group(path, mode="r").arrays()}


def ulp16(x: np.ndarray) -> np.ndarray:
    """One float16 ulp at |x| (float64): the rounding a float16-stored value may carry, either way."""
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)


def assert_f16_close(stored: np.ndarray, want: np.ndarray) -> None:
    """`stored` (float16) is `want` (float64) rounded to float16, give or take one float16 ulp."""
    assert stored.dtype == np.float16
    err = np.abs(stored.astype(np.float64) - want)
    bad = err > ulp16(want) + 1e-6
    assert not bad.any(), f"{int(bad.sum())} values off by more than a float16 ulp (max error {err.max():.3g})"


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    m = z.max(axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis, keepdims=True))).squeeze(axis)




# --- local output --------------------------------------------------------------------------------

def test_kdtrain_on_partial_cache_says_partial_with_default_cache_ram(share_dir, share_cache):
    part = str(share_dir / "partial-for-train.zarr")
    shutil.copytree(share_cache("c.zarr"), part)
    make_partial(part)
    line = error_line(kt(*train_args(part, share_dir / "run-partial-ram")))
    assert "partial cache" in line and "--resume" in line, line


@pytest.mark.parametrize("command", ["dump", "convert"])
def test_output_in_missing_directory_works_or_fails_cleanly(share_dir, share_cache, share_teacher, command):
    out = share_dir / f"missing-dir-{command}" / ("x.zarr" if command == "dump" else "x.h5")
    if command == "dump":
        r = kd(*dump_args(share_teacher(0), out, chunk_rows=ROWS))
    else:
        r = kd("convert", share_cache("c.zarr"), out)
    if r.exit_code == 0:
        assert ok(kd("verify", out)).startswith("ok: ")
    else:
        assert "directory" in error_line(r)


# --- 3. pack and convert -------------------------------------------------------------------------

def test_pack_then_read_is_equal(share_dir, share_cache):
    src = share_cache("c.zarr")
    z = str(share_dir / "packed.zip")
    ok(kd("pack", src, z))
    a, b = open_store(src), open_store(z)
    try:
        assert differences(a, b) == []
        assert a.attrs == b.attrs
    finally:
        a.close(), b.close()
    # independently, with plain zarr: every array byte-equal, attributes equal (compressor included)
    za, zb = read_plain(src), read_plain(z)
    assert_same_arrays(za[0], zb[0])
    assert za[1] == zb[1]
    # the zip is uncompressed (chunks are compressed already) and kdcache reads it like the directory
    import zipfile

    with zipfile.ZipFile(z) as f:
        assert {i.compress_type for i in f.infolist()} == {zipfile.ZIP_STORED}
        assert "zarr.json" in f.namelist() and "values/c/0/0/0" in f.namelist()
    with open_cache(z) as packed, open_cache(src) as orig:
        idx = np.random.default_rng(0).permutation(N_TRAIN)[:300]
        assert packed.read(idx).values.equal(orig.read(idx).values)
    # an existing .zip is refused without --overwrite and left alone; a partial cache is refused
    before = tree_hash(z)
    assert "--overwrite" in error_line(kd("pack", src, z))
    assert tree_hash(z) == before
    ok(kd("pack", src, z, "--overwrite"))
    part = str(share_dir / "partial-for-pack.zarr")
    shutil.copytree(src, part)
    make_partial(part)
    assert "partial" in error_line(kd("pack", part, share_dir / "partial.zip"))
    assert not os.path.exists(share_dir / "partial.zip")
    assert "pack writes a .zip" in error_line(kd("pack", src, share_dir / "nozip.zarr"))


def test_convert_zarr_h5_zarr_lossless(share_dir, share_cache):
    src = share_cache("c.zarr")
    h5 = str(share_dir / "conv.h5")
    back = str(share_dir / "conv-back.zarr")
    ok(kd("convert", src, h5))
    ok(kd("convert", h5, back))
    (za, aa), (ha, ah), (ba, ab) = read_plain(src), read_plain(h5), read_plain(back)
    assert_same_arrays(za, ha)
    assert_same_arrays(za, ba)
    assert aa["compressor"] == "blosc-zstd" and ah["compressor"] == "gzip" and ab["compressor"] == "blosc-zstd"
    assert without(aa, "compressor") == without(ah, "compressor") == without(ab, "compressor")
    assert chunk_shapes(src) == chunk_shapes(h5) == chunk_shapes(back)
    for p in (h5, back):
        assert ok(kd("verify", p)).startswith("ok: ")
        assert not os.path.exists(p + ".tmp")
    # with another compressor: attributes differ in `compressor` only
    other = str(share_dir / "conv-zstd.zarr")
    ok(kd("convert", src, other, "--compressor", "zstd"))
    oa, oattrs = read_plain(other)
    assert_same_arrays(za, oa)
    assert oattrs["compressor"] == "zstd" and without(oattrs, "compressor") == without(aa, "compressor")


def test_convert_refusals(share_dir, share_cache):
    src = share_cache("c.zarr")
    dest = str(share_dir / "exists.h5")
    ok(kd("convert", src, dest))
    for target in (dest, src):
        before = tree_hash(target)
        line = error_line(kd("convert", src if target != src else dest, target))
        assert "already holds a complete cache" in line and "--overwrite" in line
        assert tree_hash(target) == before
    ok(kd("convert", src, dest, "--overwrite"))
    assert read_plain(dest)[0]["values"].tobytes() == read_plain(src)[0]["values"].tobytes()

    part = str(share_dir / "partial.zarr")
    shutil.copytree(src, part)
    make_partial(part)
    for out in ("partial.h5", "partial-copy.zarr"):
        line = error_line(kd("convert", part, share_dir / out))
        assert "partial" in line and "--resume" in line
        assert not os.path.exists(share_dir / out) and not os.path.exists(share_dir / (out + ".tmp"))
    assert "kdcache pack" in error_line(kd("convert", src, share_dir / "x.zip"))


# --- 4. merge ------------------------------------------------------------------------------------

def _values(path: str) -> np.ndarray:
    """The stored values (N, V, W) of a cache, as stored (float16)."""
    return read_plain(path)[0]["values"]


def test_merge_mean_prob_and_mean_logit(share_dir, share_cache):
    a, b = share_cache("a.zarr", 0), share_cache("b.zarr", 1)
    z1, z2 = _values(a), _values(b)
    assert z1.dtype == z2.dtype == np.float16 and not np.array_equal(z1, z2)
    z1, z2 = z1[:, 0].astype(np.float64), z2[:, 0].astype(np.float64)

    T = 2.0
    out = str(share_dir / "mean-prob.zarr")
    ok(kd("merge", a, b, "--out", out, "--mode", "mean-prob", "--temperature", T))
    arrays, attrs = read_plain(out)
    want = T * np.logaddexp(np.log(0.5) + log_softmax(z1 / T), np.log(0.5) + log_softmax(z2 / T))
    assert arrays["values"].shape == (N_TRAIN, 1, C)
    assert_f16_close(arrays["values"][:, 0], want)
    # softmax(z/T) of the stored logits is the mean of the members' distributions
    p = np.exp(log_softmax(arrays["values"][:, 0].astype(np.float64) / T))
    np.testing.assert_allclose(p, 0.5 * np.exp(log_softmax(z1 / T)) + 0.5 * np.exp(log_softmax(z2 / T)), atol=2e-3)
    members = attrs["teacher"]["members"]
    assert [m["path"] for m in members] == [a, b]
    assert attrs["merge"]["mode"] == "mean-prob" and attrs["merge"]["temperature"] == T
    assert attrs["kind"] == "full" and attrs["status"] == "complete" and attrs["value_dtype"] == "float16"
    assert np.array_equal(arrays["labels"], read_plain(a)[0]["labels"])
    assert ok(kd("verify", out)).startswith("ok: ")

    out = str(share_dir / "mean-logit.zarr")
    ok(kd("merge", a, b, "--out", out, "--mode", "mean-logit", "--weights", "3,1"))
    arrays, attrs = read_plain(out)
    assert_f16_close(arrays["values"][:, 0], 0.75 * z1 + 0.25 * z2)
    assert attrs["merge"]["weights"] == [0.75, 0.25]
    assert [m["path"] for m in attrs["teacher"]["members"]] == [a, b]
    assert "--overwrite" in error_line(kd("merge", a, b, "--out", out))


def test_merge_refuses_different_datasets(share_dir, share_cache):
    a, t = share_cache("a.zarr", 0), share_cache("a-test.zarr", 0, "--split", "test")
    out = share_dir / "mixed.zarr"
    line = error_line(kd("merge", a, t, "--out", out))
    assert "dataset n differs" in line and str(N_TRAIN) in line and str(N_TEST) in line
    assert not os.path.exists(out)


def test_merge_with_topk_member_follows_documented_rule(share_dir, share_cache):
    a, b3 = share_cache("a.zarr", 0), share_cache("b-top3.zarr", 1, "--topk", 3)
    k = 3
    arr_b, attrs_b = read_plain(b3)
    assert attrs_b["kind"] == "topk" and attrs_b["k"] == k
    z1 = _values(a)[:, 0].astype(np.float64)
    # documented rule: each dropped class of a top-k member gets tail − log(C − k)
    vals, idx, tail = arr_b["values"][:, 0].astype(np.float64), arr_b["indices"][:, 0], arr_b["tail"][:, 0]
    z2 = np.repeat((tail.astype(np.float64) - math.log(C - k))[:, None], C, axis=1)
    np.put_along_axis(z2, idx.astype(np.int64), vals, axis=1)

    T = 2.0
    out = str(share_dir / "merged-topk.zarr")
    ok(kd("merge", a, b3, "--out", out, "--temperature", T))
    arrays, attrs = read_plain(out)
    assert attrs["kind"] == "topk" and attrs["k"] == k and "tail − log(C−k)" in attrs["merge"]["topk_rule"]
    z = T * np.logaddexp(np.log(0.5) + log_softmax(z1 / T), np.log(0.5) + log_softmax(z2 / T))
    order = np.argsort(-z, axis=1, kind="stable")
    top, rest = order[:, :k], order[:, k:]
    got_idx = arrays["indices"][:, 0].astype(np.int64)
    assert np.array_equal(got_idx, top)
    assert_f16_close(arrays["values"][:, 0], np.take_along_axis(z, top, 1))
    np.testing.assert_allclose(arrays["tail"][:, 0], logsumexp(np.take_along_axis(z, rest, 1)), rtol=1e-5, atol=1e-5)
    assert [m["path"] for m in attrs["teacher"]["members"]] == [a, b3]
    assert [m["k"] for m in attrs["teacher"]["members"]] == [None, k]
    assert ok(kd("verify", out)).startswith("ok: ")


# --- 5. versioning -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def versioned(share_dir, share_cache):
    """copy(version, suffix) -> a copy of the train cache whose attributes say `version`."""

    def make(version: str, suffix: str = ".zarr") -> str:
        src = share_cache("c" + suffix)
        dst = str(share_dir / f"v{version}{suffix}")
        if not os.path.exists(dst):
            (shutil.copytree if suffix == ".zarr" else shutil.copyfile)(src, dst)
            set_attrs(dst, version=version)
        return dst

    return make


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("command", ["info", "verify", "kdtrain"])
def test_newer_major_version_refused(versioned, share_dir, command, suffix):
    path = versioned(NEWER_MAJOR, suffix)
    if command == "kdtrain":
        r = kt(*train_args(path, share_dir / f"run-newer-major{suffix}"))
    else:
        r = kd(command, path)
    line = error_line(r, problem_lines=command == "verify")
    if command == "verify":  # verify lists each problem on its own line, then one summary error line
        assert "failed verification (1 problem(s))" in line
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith(f"{path}: "))
    assert f"version {NEWER_MAJOR}" in line and "upgrade kdcache" in line, line


def test_newer_minor_version_read(versioned, share_dir):
    path = versioned("1.7")
    # a minor version only adds: an unknown key and an unknown optional array must be ignored
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {"future_key": {"added_in": "1.7"}}
    g.create_array("future_array", shape=(4,), dtype="int8", fill_value=0)
    assert "kdcache 1.7" in ok(kd("info", path))
    assert ok(kd("verify", path)).startswith(f"ok: {path}: {N_TRAIN} samples")
    ok(kt(*train_args(path, share_dir / "run-v17")))
    assert ok(kd("info", versioned("1.7", ".h5"))).count("kdcache 1.7") == 1
