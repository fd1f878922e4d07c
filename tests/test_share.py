"""Sharing caches: over HTTP (Range requests) and S3 (moto on loopback), pack/convert round trips, merge, versions.

Every server here is started by the test on 127.0.0.1 (a free port) and stopped by it; nothing
else is contacted. The CLI runs in-process through click's CliRunner.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from servers import serve_http, serve_s3

from kdcache.cache import open_cache
from kdcache.cache.convert import differences
from kdcache.cache.store import open_store
from kdcache.cli import kdcache_main, kdtrain_main

N_TRAIN, N_TEST, C = 1437, 360, 10
ROWS = 128
N_CHUNKS = -(-N_TRAIN // ROWS)  # 12
IMAGE_SIZE = 8
ACCESS_KEY, SECRET_KEY = "testing", "testing-secret-kd7f3"
PER_VIEW = ("values", "indices", "tail", "views")


# --- helpers -------------------------------------------------------------------------------------

def _invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def kd(*args):
    return _invoke(kdcache_main, *args)


def ok(r) -> str:
    """stdout of a CLI call that must have succeeded."""
    assert r.exit_code == 0, (r.exit_code, r.output, repr(r.exception))
    return r.stdout


def error_line(r) -> str:
    """The single `error: …` line of a CLI call that must have failed cleanly (exit 1, no traceback)."""
    assert r.exit_code == 1, (r.exit_code, r.output, repr(r.exception))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def train_args(cache: str, out: Path, *extra) -> list[str]:
    return ["--cache", cache, "--student", "mlp", "--student-arg", "hidden=(16,)", "--epochs", "1",
            "--batch-size", "128", "--device", "cpu", "--quiet", "--no-plots", "--out", out, *extra]


def read_plain(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every array and the `kdcache` attributes, with plain zarr / h5py (no kdcache)."""
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            return {k: f[k][...] for k in f}, json.loads(f.attrs["kdcache"])
    if path.endswith(".zip"):
        g = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    else:
        g = zarr.open_group(path, mode="r")
    return {k: np.asarray(a[...]) for k, a in g.arrays()}, dict(g.attrs["kdcache"])


def chunk_shapes(path: str) -> dict[str, tuple[int, ...]]:
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            return {k: tuple(f[k].chunks) for k in f}
    return {k: tuple(a.chunks) for k, a in zarr.open_group(path, mode="r").arrays()}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k, x in a.items():
        assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
        assert x.tobytes() == b[k].tobytes(), f"{k} differs"


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def set_attrs(path: str, **changes) -> None:
    if path.endswith(".h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["kdcache"] = json.dumps(json.loads(f.attrs["kdcache"]) | changes)
        return
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | changes


def make_partial(path: str, chunk: int = 5) -> None:
    """Mark one chunk not written (done = 0, its values zeroed) and the cache partial, as a crash leaves it."""
    g = zarr.open_group(path, mode="r+")
    g["done"][chunk] = 0
    sl = slice(chunk * ROWS, min((chunk + 1) * ROWS, N_TRAIN))
    g["values"][sl] = np.zeros(g["values"][sl].shape, dtype=g["values"].dtype)
    a = dict(g.attrs["kdcache"])
    a.pop("stats", None)
    g.attrs["kdcache"] = a | {"status": "partial"}


def tree_hash(path: str) -> dict[str, str]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return {str(q.relative_to(p.parent)): hashlib.sha256(q.read_bytes()).hexdigest() for q in files}


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


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("share")


@pytest.fixture(scope="module")
def teacher(work, save_teacher):
    """teacher(seed) -> checkpoint of a random-weights mlp (hidden=(16,)) for digits at 8 px."""
    made: dict[int, str] = {}

    def make(seed: int = 0) -> str:
        if seed not in made:
            made[seed] = save_teacher(work / f"teacher{seed}.pt", IMAGE_SIZE, seed=seed)
        return made[seed]

    return make


def dump_args(weights: str, out: str, *extra) -> list[str]:
    return ["dump", "--teacher", "mlp", "--weights", weights, "--image-size", IMAGE_SIZE, "--chunk-rows", ROWS,
            "--device", "cpu", "--quiet", "--out", out, *extra]


@pytest.fixture(scope="module")
def cache(work, teacher):
    """cache(name, seed=0, *extra) -> a local cache dumped once per module (treat it as read-only)."""
    made: dict[tuple, str] = {}
    (work / "caches").mkdir()

    def make(name: str, seed: int = 0, *extra) -> str:
        key = (name, seed, *map(str, extra))
        if key not in made:
            out = str(work / "caches" / name)
            assert not os.path.exists(out), f"two different dumps named {name}"
            ok(kd(*dump_args(teacher(seed), out, *extra)))
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on 127.0.0.1 with a bucket `bucket`; env points boto/s3fs at it and nowhere else."""
    import s3fs

    with serve_s3() as endpoint, pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)   # botocore (≥ 1.31) honours these; s3fs passes no endpoint
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        s3fs.S3FileSystem.clear_instance_cache()
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
        fs = s3fs.S3FileSystem()
        assert fs.ls("bucket") == [] and endpoint.startswith("http://127.0.0.1:")
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


# --- 1. HTTP -------------------------------------------------------------------------------------

def test_range_server_answers_ranges_and_head(tmp_path):
    """The test server itself: 206 + Content-Range for byte ranges, Content-Length on HEAD, 416 past the end."""
    import requests

    data = bytes(range(256)) * 4
    (tmp_path / "f.bin").write_bytes(data)
    with serve_http(str(tmp_path)) as (url, log):
        s = requests.Session()
        r = s.get(f"{url}/f.bin", headers={"Range": "bytes=10-19"}, timeout=10)
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}" and r.headers["Content-Length"] == "10"
        r = s.get(f"{url}/f.bin", headers={"Range": "bytes=1000-"}, timeout=10)
        assert r.status_code == 206 and r.content == data[1000:]
        r = s.get(f"{url}/f.bin", headers={"Range": "bytes=-5"}, timeout=10)
        assert r.status_code == 206 and r.content == data[-5:]
        r = s.get(f"{url}/f.bin", headers={"Range": "bytes=5000-5001"}, timeout=10)
        assert r.status_code == 416
        r = s.head(f"{url}/f.bin", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
        r = s.get(f"{url}/f.bin", timeout=10)
        assert r.status_code == 200 and r.content == data
        assert s.get(f"{url}/nope", timeout=10).status_code == 404
        assert log.count("GET", "/f.bin") == 5 and log.count("HEAD", "/f.bin") == 1


def test_http_info_verify_train_and_pack(work, cache, record_property, capsys):
    zpath, hpath = cache("c.zarr"), cache("c.h5")
    served = work / "www"
    served.mkdir()
    shutil.copytree(zpath, served / "c.zarr")
    shutil.copyfile(hpath, served / "c.h5")
    ok(kd("pack", zpath, served / "c.zip"))
    with serve_http(str(served)) as (url, log):
        for name in ("c.zarr", "c.h5", "c.zip"):
            out = ok(kd("info", f"{url}/{name}"))
            assert "complete" in out and f"{N_TRAIN} × 1 view(s)" in out and "mlp" in out
            out = ok(kd("verify", f"{url}/{name}"))
            assert out.startswith(f"ok: {url}/{name}: {N_TRAIN} samples, {N_CHUNKS} chunks")
            assert log.count(prefix=f"/{name}") > 0
        # the single-file caches are read with byte ranges (served 206), not whole-file downloads only
        ranged = {p for p, _ in log.ranges}
        assert {"/c.h5", "/c.zip"} <= ranged, log.ranges

        info = json.loads(ok(kd("info", "--json", f"{url}/c.zarr")))
        assert info["n"] == N_TRAIN and info["chunk_rows"] == ROWS and info["bytes_on_disk"] is None

        # one streamed epoch (nothing loaded whole): each values chunk fetched about once
        log.reset()
        ok(_invoke(kdtrain_main, *train_args(f"{url}/c.zarr", work / "run-http", "--cache-ram", "0")))
        metrics = json.loads((work / "run-http" / "metrics.json").read_text())
        assert len(metrics["history"]) == 1 and metrics["teachers"][0]["cache"] == f"{url}/c.zarr"
        chunk_gets = log.count("GET", pattern=r"^/c\.zarr/values/c/\d+/0/0$")
        all_gets = log.count("GET", "/c.zarr/")
        record_property("values_chunk_gets_per_epoch", chunk_gets)
        record_property("all_gets_per_epoch", all_gets)
        with capsys.disabled():
            print(f"\n[http] one epoch: {chunk_gets} GETs of values chunks for {N_CHUNKS} chunks "
                  f"({all_gets} GETs under /c.zarr/ in all)")
        assert N_CHUNKS <= chunk_gets <= 2 * N_CHUNKS, log.paths("GET", "/c.zarr/values/")
        assert all(n <= 2 for n in log.paths("GET", "/c.zarr/values/c/").values())

        # pack straight from the URL: the same cache as packing the local copy
        ok(kd("pack", f"{url}/c.zarr", work / "from-url.zip"))
    a, b = read_plain(str(work / "from-url.zip")), read_plain(str(served / "c.zip"))
    assert_same_arrays(a[0], b[0])
    assert a[1] == b[1]


def test_http_zarr_without_directory_listing(work, cache):
    """Static hosts (CDNs, object-store websites, nginx without autoindex) 404 directory URLs; zarr.json is there."""
    served = work / "www-nolist"
    shutil.copytree(cache("c.zarr"), served / "c.zarr")
    with serve_http(str(served), listing=False) as (url, _):
        g = zarr.open_group(f"{url}/c.zarr", mode="r")           # plain zarr reads it fine
        assert dict(g.attrs["kdcache"])["n"] == N_TRAIN
        ok(kd("info", f"{url}/c.zarr"))


# --- 2. S3 ---------------------------------------------------------------------------------------

def test_s3_dump_info_verify_train_resume_overwrite(s3, work, cache, teacher):
    url = "s3://bucket/c.zarr"
    args = dump_args(teacher(0), url)
    ok(kd(*args))
    assert s3.exists("bucket/c.zarr/zarr.json") and s3.exists("bucket/c.zarr/values/c/11/0/0")
    assert not s3.exists("bucket/c.zarr.lock")
    out = ok(kd("info", url))
    assert "complete" in out and f"{N_TRAIN} × 1 view(s)" in out
    assert ok(kd("verify", url)).startswith(f"ok: {url}: {N_TRAIN} samples, {N_CHUNKS} chunks")

    # the same arrays and attributes as the same dump written locally
    local = cache("c.zarr")
    with open_cache(url) as remote, open_cache(local) as here:
        assert remote.complete and here.complete
        assert without(remote.attrs, "created", "command") == without(here.attrs, "created", "command")
        for name in ("values", "labels", "views", "done", "checksum"):
            x, y = np.asarray(remote.store[name][...]), np.asarray(here.store[name][...])
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
        for c in (0, 7, N_CHUNKS - 1):
            a, b = remote.read_chunk(c), here.read_chunk(c)
            assert all(a[k].tobytes() == b[k].tobytes() for k in a)

    # no credential anywhere in the attributes, nor in any metadata object of the cache
    with open_cache(url) as remote:
        text = json.dumps(remote.attrs)
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in text
        for meta in s3.find("bucket/c.zarr"):
            if meta.endswith("zarr.json"):
                assert secret.encode() not in s3.cat_file(meta), meta

    ok(_invoke(kdtrain_main, *train_args(url, work / "run-s3", "--cache-ram", "0")))
    assert json.loads((work / "run-s3" / "metrics.json").read_text())["teachers"][0]["cache"] == url

    # a second dump without flags is refused, and so is --resume of a complete cache; nothing changes
    before = {p: s3.info(p)["ETag"] for p in s3.find("bucket/c.zarr")}
    for flags in ([], ["--resume"]):
        line = error_line(kd(*args, *flags))
        assert "already is a complete cache" in line and "--overwrite" in line
    assert error_line(kd(*args, "--resume", "--overwrite")).endswith("pass one of them")
    s3.invalidate_cache()
    assert {p: s3.info(p)["ETag"] for p in s3.find("bucket/c.zarr")} == before

    # a partial cache on S3 (one chunk lost): refused without flags, resumable, and then equal to the local dump
    make_partial(url, chunk=5)
    s3.invalidate_cache()
    line = error_line(kd(*args))
    assert "holds a partial dump" in line and "--resume" in line
    assert "batch_size" in error_line(kd(*dump_args(teacher(0), url, "--batch-size", 64, "--resume")))
    line = error_line(_invoke(kdtrain_main, *train_args(url, work / "run-partial", "--cache-ram", "0")))
    assert "partial cache (11 of 12 chunks" in line and "--resume" in line
    ok(kd(*args, "--resume"))
    assert ok(kd("verify", url)).startswith("ok: ")
    with open_cache(url) as remote, open_cache(local) as here:
        assert np.asarray(remote.store["values"][...]).tobytes() == np.asarray(here.store["values"][...]).tobytes()
        assert remote.attrs["stats"] == here.attrs["stats"]

    # pack straight from S3: the same arrays and attributes as the local dump
    ok(kd("pack", url, work / "from-s3.zip"))
    (sa, sattrs), (la, lattrs) = read_plain(str(work / "from-s3.zip")), read_plain(local)
    assert_same_arrays(sa, la)
    assert without(sattrs, "created", "command") == without(lattrs, "created", "command")

    # --overwrite with another layout replaces the cache whole: no chunk object of the old layout is left
    ok(kd(*dump_args(teacher(0), url, "--overwrite"), "--chunk-rows", 512))
    s3.invalidate_cache()
    keys = [p[len("bucket/c.zarr/"):] for p in s3.find("bucket/c.zarr")]
    assert sorted(k for k in keys if k.startswith("values/c/")) == [f"values/c/{c}/0/0" for c in (0, 1, 2)], keys
    assert sorted(k for k in keys if k.startswith("done/c/")) == [f"done/c/{c}" for c in (0, 1, 2)], keys
    with open_cache(url) as remote, open_cache(local) as here:
        assert remote.layout.chunk_rows == 512 and remote.layout.n_chunks == 3
        assert np.asarray(remote.store["values"][...]).tobytes() == np.asarray(here.store["values"][...]).tobytes()
    assert ok(kd("verify", url)).startswith(f"ok: {url}: {N_TRAIN} samples, 3 chunks")


def test_s3_range_dumps_joined_on_s3_equal_the_local_dump(s3, cache, teacher):
    """Two machines without shared disk: each dumps a range to the bucket, then join writes the whole cache there."""
    parts = ["s3://bucket/part1.zarr", "s3://bucket/part0.zarr"]
    ok(kd(*dump_args(teacher(0), parts[1], "--rows", f":{6 * ROWS}")))
    ok(kd(*dump_args(teacher(0), parts[0], "--rows", f"{6 * ROWS}:")))
    url = "s3://bucket/joined.zarr"
    assert ok(kd("join", *parts, "--out", url)).strip() == f"wrote {url} (rows 0:{N_TRAIN}, all of the dataset)"
    assert ok(kd("verify", url)).startswith(f"ok: {url}: {N_TRAIN} samples, {N_CHUNKS} chunks")
    with open_cache(url) as remote, open_cache(cache("c.zarr")) as here:
        assert remote.attrs["rows"] is None and remote.attrs["stats"] == here.attrs["stats"]
        for name in ("values", "labels", "views", "done", "checksum"):
            x, y = np.asarray(remote.store[name][...]), np.asarray(here.store[name][...])
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name


def test_s3_refusals_are_clean(s3, teacher):
    line = error_line(kd(*dump_args(teacher(0), "s3://bucket/c.h5")))
    assert "cannot write HDF5 at a URL" in line
    line = error_line(kd("info", "s3://bucket/missing.zarr"))
    assert "no cache at s3://bucket/missing.zarr" in line


def test_convert_to_s3_url_works_or_refuses_cleanly(s3, cache):
    r = kd("convert", cache("c.zarr"), "s3://bucket/converted.zarr")
    if r.exit_code == 0:
        assert ok(kd("verify", "s3://bucket/converted.zarr")).startswith("ok: ")
    else:
        error_line(r)
        s3.invalidate_cache()
        assert not s3.exists("bucket/converted.zarr.tmp"), "a failed convert left its temporary behind"


def test_kdtrain_on_partial_cache_says_partial_with_default_cache_ram(work, cache):
    part = str(work / "partial-for-train.zarr")
    shutil.copytree(cache("c.zarr"), part)
    make_partial(part)
    line = error_line(_invoke(kdtrain_main, *train_args(part, work / "run-partial-ram")))
    assert "partial cache" in line and "--resume" in line, line


@pytest.mark.parametrize("command", ["dump", "convert"])
def test_output_in_missing_directory_works_or_fails_cleanly(work, cache, teacher, command):
    out = work / f"missing-dir-{command}" / ("x.zarr" if command == "dump" else "x.h5")
    r = kd(*dump_args(teacher(0), out)) if command == "dump" else kd("convert", cache("c.zarr"), out)
    if r.exit_code == 0:
        assert ok(kd("verify", out)).startswith("ok: ")
    else:
        assert "directory" in error_line(r)


# --- 3. pack and convert -------------------------------------------------------------------------

def test_pack_then_read_is_equal(work, cache):
    src = cache("c.zarr")
    z = str(work / "packed.zip")
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
    part = str(work / "partial-for-pack.zarr")
    shutil.copytree(src, part)
    make_partial(part)
    assert "partial" in error_line(kd("pack", part, work / "partial.zip"))
    assert not os.path.exists(work / "partial.zip")
    assert "pack writes a .zip" in error_line(kd("pack", src, work / "nozip.zarr"))


def test_convert_zarr_h5_zarr_lossless(work, cache):
    src = cache("c.zarr")
    h5 = str(work / "conv.h5")
    back = str(work / "conv-back.zarr")
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
    other = str(work / "conv-zstd.zarr")
    ok(kd("convert", src, other, "--compressor", "zstd"))
    oa, oattrs = read_plain(other)
    assert_same_arrays(za, oa)
    assert oattrs["compressor"] == "zstd" and without(oattrs, "compressor") == without(aa, "compressor")


def test_convert_refusals(work, cache):
    src = cache("c.zarr")
    dest = str(work / "exists.h5")
    ok(kd("convert", src, dest))
    for target in (dest, src):
        before = tree_hash(target)
        line = error_line(kd("convert", src if target != src else dest, target))
        assert "already exists" in line and "--overwrite" in line
        assert tree_hash(target) == before
    ok(kd("convert", src, dest, "--overwrite"))
    assert read_plain(dest)[0]["values"].tobytes() == read_plain(src)[0]["values"].tobytes()

    part = str(work / "partial.zarr")
    shutil.copytree(src, part)
    make_partial(part)
    for out in ("partial.h5", "partial-copy.zarr"):
        line = error_line(kd("convert", part, work / out))
        assert "partial" in line and "--resume" in line
        assert not os.path.exists(work / out) and not os.path.exists(work / (out + ".tmp"))
    assert "kdcache pack" in error_line(kd("convert", src, work / "x.zip"))


# --- 4. merge ------------------------------------------------------------------------------------

def _values(path: str) -> np.ndarray:
    """The stored values (N, V, W) of a cache, as stored (float16)."""
    return read_plain(path)[0]["values"]


def test_merge_mean_prob_and_mean_logit(work, cache):
    a, b = cache("a.zarr", 0), cache("b.zarr", 1)
    z1, z2 = _values(a), _values(b)
    assert z1.dtype == z2.dtype == np.float16 and not np.array_equal(z1, z2)
    z1, z2 = z1[:, 0].astype(np.float64), z2[:, 0].astype(np.float64)

    T = 2.0
    out = str(work / "mean-prob.zarr")
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

    out = str(work / "mean-logit.zarr")
    ok(kd("merge", a, b, "--out", out, "--mode", "mean-logit", "--weights", "3,1"))
    arrays, attrs = read_plain(out)
    assert_f16_close(arrays["values"][:, 0], 0.75 * z1 + 0.25 * z2)
    assert attrs["merge"]["weights"] == [0.75, 0.25]
    assert [m["path"] for m in attrs["teacher"]["members"]] == [a, b]
    assert "--overwrite" in error_line(kd("merge", a, b, "--out", out))


def test_merge_refuses_different_datasets(work, cache):
    a, t = cache("a.zarr", 0), cache("a-test.zarr", 0, "--split", "test")
    out = work / "mixed.zarr"
    line = error_line(kd("merge", a, t, "--out", out))
    assert "dataset n differs" in line and str(N_TRAIN) in line and str(N_TEST) in line
    assert not os.path.exists(out)


def test_merge_with_topk_member_follows_documented_rule(work, cache):
    a, b3 = cache("a.zarr", 0), cache("b-top3.zarr", 1, "--topk", 3)
    k = 3
    arr_b, attrs_b = read_plain(b3)
    assert attrs_b["kind"] == "topk" and attrs_b["k"] == k
    z1 = _values(a)[:, 0].astype(np.float64)
    # documented rule: each dropped class of a top-k member gets tail − log(C − k)
    vals, idx, tail = arr_b["values"][:, 0].astype(np.float64), arr_b["indices"][:, 0], arr_b["tail"][:, 0]
    z2 = np.repeat((tail.astype(np.float64) - math.log(C - k))[:, None], C, axis=1)
    np.put_along_axis(z2, idx.astype(np.int64), vals, axis=1)

    T = 2.0
    out = str(work / "merged-topk.zarr")
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
def versioned(work, cache):
    """copy(version, suffix) -> a copy of the train cache whose attributes say `version`."""

    def make(version: str, suffix: str = ".zarr") -> str:
        src = cache("c" + suffix)
        dst = str(work / f"v{version}{suffix}")
        if not os.path.exists(dst):
            (shutil.copytree if suffix == ".zarr" else shutil.copyfile)(src, dst)
            set_attrs(dst, version=version)
        return dst

    return make


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("command", ["info", "verify", "kdtrain"])
def test_newer_major_version_refused(versioned, work, command, suffix):
    path = versioned("2.0", suffix)
    if command == "kdtrain":
        r = _invoke(kdtrain_main, *train_args(path, work / f"run-v2{suffix}"))
    else:
        r = kd(command, path)
    line = error_line(r)
    if command == "verify":  # verify lists each problem on its own line, then one summary error line
        assert "failed verification (1 problem(s))" in line
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith(f"{path}: "))
    assert "version 2.0" in line and "upgrade kdcache" in line, line


def test_newer_minor_version_read(versioned, work):
    path = versioned("1.7")
    # a minor version only adds: an unknown key and an unknown optional array must be ignored
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {"future_key": {"added_in": "1.7"}}
    g.create_array("future_array", shape=(4,), dtype="int8", fill_value=0)
    assert "kdcache 1.7" in ok(kd("info", path))
    assert ok(kd("verify", path)).startswith(f"ok: {path}: {N_TRAIN} samples")
    ok(_invoke(kdtrain_main, *train_args(path, work / "run-v17")))
    assert ok(kd("info", versioned("1.7", ".h5"))).count("kdcache 1.7") == 1
