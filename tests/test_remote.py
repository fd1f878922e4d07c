"""Caches over the network: HTTP with Range requests and S3 (moto on loopback), read, verified, trained, written.

Every server here is started by the test on 127.0.0.1 (a free port) and stopped by it; nothing
else is contacted. The CLI runs in-process through click's CliRunner.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zarr
from clitools import assert_same_arrays, dump_args, error_line, kd, kt, ok, read_plain
from servers import serve_http, serve_s3
from sharefix import N_CHUNKS, N_TRAIN, ROWS, make_partial, train_args, without

from kdcache.io import open_cache

ACCESS_KEY, SECRET_KEY = "testing", "testing-secret-kd7f3"


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


def test_http_info_verify_train_and_pack(share_dir, share_cache, record_property, capsys):
    zpath, hpath = share_cache("c.zarr"), share_cache("c.h5")
    served = share_dir / "www"
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
        ok(kt(*train_args(f"{url}/c.zarr", share_dir / "run-http", "--cache-ram", "0")))
        metrics = json.loads((share_dir / "run-http" / "metrics.json").read_text())
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
        ok(kd("pack", f"{url}/c.zarr", share_dir / "from-url.zip"))
    a, b = read_plain(str(share_dir / "from-url.zip")), read_plain(str(served / "c.zip"))
    assert_same_arrays(a[0], b[0])
    assert a[1] == b[1]


def test_http_zarr_without_directory_listing(share_dir, share_cache):
    """Static hosts (CDNs, object-store websites, nginx without autoindex) 404 directory URLs; zarr.json is there."""
    served = share_dir / "www-nolist"
    shutil.copytree(share_cache("c.zarr"), served / "c.zarr")
    with serve_http(str(served), listing=False) as (url, _):
        g = zarr.open_group(f"{url}/c.zarr", mode="r")           # plain zarr reads it fine
        assert dict(g.attrs["kdcache"])["n"] == N_TRAIN
        ok(kd("info", f"{url}/c.zarr"))


# --- 2. S3 ---------------------------------------------------------------------------------------

def test_s3_dump_info_verify_train_resume_overwrite(s3, share_dir, share_cache, share_teacher):
    url = "s3://bucket/c.zarr"
    args = dump_args(share_teacher(0), url, chunk_rows=ROWS)
    ok(kd(*args))
    assert s3.exists("bucket/c.zarr/zarr.json") and s3.exists("bucket/c.zarr/values/c/11/0/0")
    assert not s3.exists("bucket/c.zarr.lock")
    out = ok(kd("info", url))
    assert "complete" in out and f"{N_TRAIN} × 1 view(s)" in out
    assert ok(kd("verify", url)).startswith(f"ok: {url}: {N_TRAIN} samples, {N_CHUNKS} chunks")

    # the same arrays and attributes as the same dump written locally
    local = share_cache("c.zarr")
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

    ok(kt(*train_args(url, share_dir / "run-s3", "--cache-ram", "0")))
    assert json.loads((share_dir / "run-s3" / "metrics.json").read_text())["teachers"][0]["cache"] == url

    # a second dump without flags is refused, and so is --resume of a complete cache; nothing changes
    before = {p: s3.info(p)["ETag"] for p in s3.find("bucket/c.zarr")}
    for flags in ([], ["--resume"]):
        line = error_line(kd(*args, *flags))
        assert "already holds a complete cache" in line and "--overwrite" in line
    assert error_line(kd(*args, "--resume", "--overwrite")).endswith("pass one of them")
    s3.invalidate_cache()
    assert {p: s3.info(p)["ETag"] for p in s3.find("bucket/c.zarr")} == before

    # a partial cache on S3 (one chunk lost): refused without flags, resumable, and then equal to the local dump
    make_partial(url, chunk=5)
    s3.invalidate_cache()
    line = error_line(kd(*args))
    assert "holds a partial dump" in line and "--resume" in line
    assert "batch_size" in error_line(kd(*args, "--batch-size", 64, "--resume"))
    line = error_line(kt(*train_args(url, share_dir / "run-partial", "--cache-ram", "0")))
    assert "partial cache (11 of 12 chunks" in line and "--resume" in line
    ok(kd(*args, "--resume"))
    assert ok(kd("verify", url)).startswith("ok: ")
    with open_cache(url) as remote, open_cache(local) as here:
        assert np.asarray(remote.store["values"][...]).tobytes() == np.asarray(here.store["values"][...]).tobytes()
        assert remote.attrs["stats"] == here.attrs["stats"]

    # pack straight from S3: the same arrays and attributes as the local dump
    ok(kd("pack", url, share_dir / "from-s3.zip"))
    (sa, sattrs), (la, lattrs) = read_plain(str(share_dir / "from-s3.zip")), read_plain(local)
    assert_same_arrays(sa, la)
    assert without(sattrs, "created", "command") == without(lattrs, "created", "command")

    # --overwrite with another layout replaces the cache whole: no chunk object of the old layout is left
    ok(kd(*dump_args(share_teacher(0), url, "--overwrite", chunk_rows=512)))
    s3.invalidate_cache()
    keys = [p[len("bucket/c.zarr/"):] for p in s3.find("bucket/c.zarr")]
    assert sorted(k for k in keys if k.startswith("values/c/")) == [f"values/c/{c}/0/0" for c in (0, 1, 2)], keys
    assert sorted(k for k in keys if k.startswith("done/c/")) == [f"done/c/{c}" for c in (0, 1, 2)], keys
    with open_cache(url) as remote, open_cache(local) as here:
        assert remote.layout.chunk_rows == 512 and remote.layout.n_chunks == 3
        assert np.asarray(remote.store["values"][...]).tobytes() == np.asarray(here.store["values"][...]).tobytes()
    assert ok(kd("verify", url)).startswith(f"ok: {url}: {N_TRAIN} samples, 3 chunks")


def test_s3_range_dumps_joined_on_s3_equal_the_local_dump(s3, share_cache, share_teacher):
    """Two machines without shared disk: each dumps a range to the bucket, then join writes the whole cache there."""
    parts = ["s3://bucket/part1.zarr", "s3://bucket/part0.zarr"]
    ok(kd(*dump_args(share_teacher(0), parts[1], "--rows", f":{6 * ROWS}", chunk_rows=ROWS)))
    ok(kd(*dump_args(share_teacher(0), parts[0], "--rows", f"{6 * ROWS}:", chunk_rows=ROWS)))
    url = "s3://bucket/joined.zarr"
    assert ok(kd("join", *parts, "--out", url)).strip() == f"wrote {url} (rows 0:{N_TRAIN}, all of the dataset)"
    assert ok(kd("verify", url)).startswith(f"ok: {url}: {N_TRAIN} samples, {N_CHUNKS} chunks")
    with open_cache(url) as remote, open_cache(share_cache("c.zarr")) as here:
        assert remote.attrs["rows"] is None and remote.attrs["stats"] == here.attrs["stats"]
        for name in ("values", "labels", "views", "done", "checksum"):
            x, y = np.asarray(remote.store[name][...]), np.asarray(here.store[name][...])
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name


def test_s3_refusals_are_clean(s3, share_teacher):
    line = error_line(kd(*dump_args(share_teacher(0), "s3://bucket/c.h5", chunk_rows=ROWS)))
    assert "cannot write HDF5 at a URL" in line
    line = error_line(kd("info", "s3://bucket/missing.zarr"))
    assert "no cache at s3://bucket/missing.zarr" in line


def test_convert_to_s3_url_works_or_refuses_cleanly(s3, share_cache):
    r = kd("convert", share_cache("c.zarr"), "s3://bucket/converted.zarr")
    if r.exit_code == 0:
        assert ok(kd("verify", "s3://bucket/converted.zarr")).startswith("ok: ")
    else:
        error_line(r)
        s3.invalidate_cache()
        assert not s3.exists("bucket/converted.zarr.tmp"), "a failed convert left its temporary behind"
