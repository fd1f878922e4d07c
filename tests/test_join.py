"""Range caches (`dump --rows`) and `kdcache join`: the ranges joined equal one dump of the whole dataset."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from clitools import assert_same_arrays, error_line, ok

N = 1437  # digits train split
ALIGNED = ["--chunk-rows", "256", "--topk", "3", "--views", "2", "--augment", "rrc(0.35,1)+flip", "--seed", "3"]


@pytest.fixture(scope="module")
def ranges(dump_cache):
    """The whole dump and three chunk-aligned range dumps of it (multi-view, top-k)."""
    return {r: dump_cache(".zarr", *ALIGNED, *(["--rows", r] if r else [])) for r in ("", "0:512", "512:1024",
                                                                                   "1024:")}


def test_range_cache_records_its_rows_and_verifies(cli, ranges, read_plain):
    arrays, attrs = read_plain(ranges["512:1024"])
    full, full_attrs = read_plain(ranges[""])
    assert attrs["n"] == 512 and attrs["dataset"]["n"] == N and attrs["chunk_rows"] == 256
    assert attrs["rows"]["start"] == 512 and attrs["rows"]["stop"] == 1024 and full_attrs["rows"] is None
    assert attrs["dump"]["rows"] == [512, 1024] and full_attrs["version"] == "1.1"
    assert attrs["version"] == "2.0"  # a range cache: kdcache readers before 1.1 refuse it instead of misreading it
    # the rows are the whole dump's rows 512..1023, views included (views hash the dataset index, not the row)
    for name in ("values", "indices", "tail", "views", "labels"):
        assert np.array_equal(arrays[name], full[name][512:1024]), name
    assert ok(cli("verify", ranges["512:1024"])).startswith("ok: ")
    text = ok(cli("info", ranges["512:1024"]))
    assert "rows: 512:1024 of 1437 (a range cache" in text
    card = ok(cli("info", ranges["512:1024"], "--markdown"))
    assert "| Rows | 512:1024 of 1437" in card
    assert json.loads(ok(cli("info", ranges["1024:"], "--json")))["rows"] == [1024, N]


def test_join_of_aligned_ranges_is_byte_identical_to_one_dump(cli, ranges, read_plain, tmp_path):
    want, want_attrs = read_plain(ranges[""])
    out = str(tmp_path / "joined.zarr")
    line = ok(cli("join", ranges["1024:"], ranges["0:512"], ranges["512:1024"], "--out", out))  # any order
    assert line.strip() == f"wrote {out} (rows 0:{N}, all of the dataset)"
    got, attrs = read_plain(out)
    assert_same_arrays(got, want)
    differ = {k for k in set(attrs) | set(want_attrs) if attrs.get(k) != want_attrs.get(k)}
    assert "join" in differ and differ <= {"join", "command", "created"}
    assert [m["rows"] for m in attrs["join"]["members"]] == [[0, 512], [512, 1024], [1024, N]]
    assert ok(cli("verify", out)).startswith("ok: ")
    assert "joined: from 3 range caches (rows 0:512, 512:1024, 1024:1437)" in ok(cli("info", out))
    assert "| Joined | from 3 range caches" in ok(cli("info", out, "--markdown"))
    damaged = str(tmp_path / "damaged.zarr")
    shutil.copytree(out, damaged)
    meta = os.path.join(damaged, "zarr.json")
    doc = json.loads(open(meta).read())
    doc["attributes"]["kdcache"]["join"] = {"members": None}  # the attribute is only described: no traceback
    open(meta, "w").write(json.dumps(doc))
    assert "joined" not in ok(cli("info", damaged))

    # joins nest: two ranges into an HDF5 range cache, then that with the third
    ab = str(tmp_path / "ab.h5")
    assert "a range cache; the dataset has 1437" in ok(cli("join", ranges["0:512"], ranges["512:1024"], "--out", ab))
    _, ab_attrs = read_plain(ab)
    assert ab_attrs["n"] == 1024 and ab_attrs["rows"]["start"] == 0 and ab_attrs["rows"]["stop"] == 1024
    assert ok(cli("verify", ab)).startswith("ok: ")
    again = str(tmp_path / "again.h5")
    ok(cli("join", ab, ranges["1024:"], "--out", again))
    assert_same_arrays(read_plain(again)[0], want)
    assert not os.path.exists(again + ".partial.zarr")


def test_unaligned_ranges_rechunk_and_train(cli, dump_cache, read_plain, tmp_path):
    args = ["--chunk-rows", "256", "--dtype", "float32"]
    full, _ = read_plain(dump_cache(".zarr", *args))
    parts = [dump_cache(".zarr", *args, "--rows", r) for r in ("0:300", "300:1000", "1000:")]
    out = str(tmp_path / "joined.zarr")
    ok(cli("join", *parts, "--out", out))
    got, attrs = read_plain(out)
    assert attrs["chunk_rows"] == 256 and got["done"].shape == (6,) and got["done"].all()
    for name in ("labels", "views", "done"):
        assert np.array_equal(got[name], full[name]), name
    # batches split at other chunk boundaries than the whole dump's: same logits up to float rounding
    np.testing.assert_allclose(got["values"], full["values"], rtol=0, atol=1e-5)
    assert ok(cli("verify", out)).startswith("ok: ")
    run = tmp_path / "run"
    ok(cli("train", "--cache", out, "--student", "mlp", "--student-arg", "hidden=(16,)", "--epochs", "1",
           "--device", "cpu", "--quiet", "--no-plots", "--out", run))
    assert (run / "metrics.json").is_file()


def test_join_refuses_gaps_overlaps_and_strangers(cli, ranges, dump_cache, tmp_path):
    out = str(tmp_path / "x.zarr")
    a, b, c = ranges["0:512"], ranges["512:1024"], ranges["1024:"]
    line = error_line(cli("join", a, c, "--out", out))
    assert "rows 512:1024 are in none of the caches" in line and "--rows 512:1024" in line
    assert "overlap" in error_line(cli("join", a, ranges[""], "--out", out))
    assert "overlap" in error_line(cli("join", a, a, "--out", out))
    topk = ALIGNED.index("--topk") + 1
    other = dump_cache(".zarr", *ALIGNED[:topk], "4", *ALIGNED[topk + 1:], "--rows", "512:1024")
    line = error_line(cli("join", a, other, "--out", out))
    assert "k differs (3 vs 4)" in line
    assert "at least two" in error_line(cli("join", a, "--out", out))
    assert "one of the caches being read" in error_line(cli("join", a, b, "--out", a))
    assert "pack" in error_line(cli("join", a, b, "--out", str(tmp_path / "x.zip")))
    assert not os.path.exists(out)

    # a partial member is refused, and an existing output is kept unless --overwrite
    partial = str(tmp_path / "partial.zarr")
    shutil.copytree(b, partial)
    meta = os.path.join(partial, "zarr.json")
    doc = json.loads(open(meta).read())
    doc["attributes"]["kdcache"]["status"] = "partial"
    open(meta, "w").write(json.dumps(doc))
    assert "partial cache" in error_line(cli("join", a, partial, "--out", out))
    ok(cli("join", a, b, "--out", out))
    assert "--overwrite" in error_line(cli("join", a, b, "--out", out))
    ok(cli("join", a, b, "--out", out, "--overwrite"))
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    assert "not a kdcache cache" in error_line(cli("join", a, b, "--out", foreign, "--overwrite"))
    assert (foreign / "precious.txt").read_text() == "mine"


def test_range_caches_refused_for_training_and_checked_on_resume(cli, ranges, dump_args, tmp_path):
    r = cli("train", "--cache", ranges["0:512"], "--student", "mlp", "--epochs", "1", "--device", "cpu",
            "--out", tmp_path / "run")
    line = error_line(r)
    assert "holds only rows 0:512 of the 1437 samples" in line and "kdcache join" in line
    assert not (tmp_path / "run" / "metrics.json").exists()

    bad = {"5:3": "is empty or outside", "0:99999": "is empty or outside", "x": "--rows takes START:STOP",
           "1:2:3": "--rows takes START:STOP"}
    for text, words in bad.items():
        assert words in error_line(cli(*dump_args, "--out", tmp_path / "bad.zarr", "--rows", text)), text
    assert not (tmp_path / "bad.zarr").exists()

    # --resume must be the same command: other rows are refused and the partial cache is left as it was
    part = str(tmp_path / "part.zarr")
    shutil.copytree(ranges["0:512"], part)
    meta = os.path.join(part, "zarr.json")
    doc = json.loads(open(meta).read())
    doc["attributes"]["kdcache"]["status"] = "partial"
    open(meta, "w").write(json.dumps(doc))
    line = error_line(cli(*dump_args, *ALIGNED, "--rows", "0:600", "--out", part, "--resume"))
    assert "rows=[0, 512]" in line and "[0, 600]" in line
    ok(cli(*dump_args, *ALIGNED, "--rows", "0:512", "--out", part, "--resume"))
    # a range dump begun under a 1.x version label still finishes as 2.0, which 1.x readers refuse
    doc = json.loads(open(meta).read())
    doc["attributes"]["kdcache"] |= {"status": "partial", "version": "1.1"}
    open(meta, "w").write(json.dumps(doc))
    ok(cli(*dump_args, *ALIGNED, "--rows", "0:512", "--out", part, "--resume"))
    assert json.loads(open(meta).read())["attributes"]["kdcache"]["version"] == "2.0"


def test_verify_checks_a_range_caches_rows(cli, ranges, tmp_path):
    for key, value, words in (("stop", 1000, "do not hold n=512"), ("labels_sha256", "0" * 64,
                                                                      "differs from rows.labels_sha256")):
        bad = str(tmp_path / f"bad-{key}.zarr")
        shutil.copytree(ranges["512:1024"], bad)
        meta = os.path.join(bad, "zarr.json")
        doc = json.loads(open(meta).read())
        doc["attributes"]["kdcache"]["rows"][key] = value
        open(meta, "w").write(json.dumps(doc))
        r = cli("verify", bad)
        assert r.exit_code == 1 and words in r.stderr, r.stderr


def test_merge_keeps_rows_and_refuses_different_ones(cli, ranges, read_plain, tmp_path):
    a = ranges["0:512"]
    out = str(tmp_path / "ens.zarr")
    ok(cli("merge", a, a, "--out", out, "--mode", "mean-logit"))
    arrays, attrs = read_plain(out)
    assert attrs["rows"]["start"] == 0 and attrs["rows"]["stop"] == 512 and arrays["values"].shape[0] == 512
    assert attrs["version"] == "2.0" and ok(cli("verify", out)).startswith("ok: ")
    np.testing.assert_array_equal(arrays["values"], read_plain(a)[0]["values"])  # mean of one teacher twice
    assert "rows differs" in error_line(cli("merge", a, ranges["512:1024"], "--out", tmp_path / "e2.zarr"))


def test_chunk_batches_are_lazy_chunk_aligned_and_offset():
    from kdcache.ops.dump import ChunkBatches
    from kdcache.format.spec import Layout

    lay = Layout(n=1000, n_views=1, num_classes=10, k=None, value_dtype="float16", chunk_rows=256)
    b = ChunkBatches(lay, [3, 1], batch_size=100, offset=5000)
    got = [list(x) for x in b]
    assert [(x[0], x[-1]) for x in got] == [(5768, 5867), (5868, 5967), (5968, 5999),
                                            (5256, 5355), (5356, 5455), (5456, 5511)]
    assert len(b) == len(got) == 6 and b.rows == 232 + 256


def test_join_members_may_differ_in_batch_size_and_compressor(cli, dump_cache, read_plain, tmp_path):
    """Machines pick their own batch size: the join is still exact, and records what it cannot vouch for."""
    args = ["--chunk-rows", "256", "--dtype", "float32"]
    full, _ = read_plain(dump_cache(".zarr", *args))
    a = dump_cache(".zarr", *args, "--rows", ":512", "--compressor", "zstd")
    b = dump_cache(".zarr", *args, "--rows", "512:", "--compressor", "zstd", "--batch-size", "100")
    out = str(tmp_path / "mixed.zarr")
    ok(cli("join", a, b, "--out", out))
    got, attrs = read_plain(out)
    assert attrs["dump"]["batch_size"] is None and attrs["compressor"] == "zstd"  # shared compressor kept
    np.testing.assert_allclose(got["values"], full["values"], rtol=0, atol=1e-5)
    assert np.array_equal(got["labels"], full["labels"]) and ok(cli("verify", out)).startswith("ok: ")
    h5 = str(tmp_path / "mixed.h5")  # zstd is not an HDF5 filter: the backend's default instead
    ok(cli("join", a, b, "--out", h5))
    assert read_plain(h5)[1]["compressor"] == "gzip"


def test_join_refuses_a_member_with_changed_labels(cli, ranges, tmp_path):
    bad = str(tmp_path / "bad.zarr")
    shutil.copytree(ranges["0:512"], bad)
    import zarr

    labels = zarr.open_group(bad, mode="r+")["labels"]
    labels[7] = (int(labels[7]) + 1) % 10
    line = error_line(cli("join", bad, ranges["512:1024"], "--out", tmp_path / "x.zarr"))
    assert f"the labels stored in {bad} differ from the labels_sha256 it records" in line and "kdcache verify" in line
    assert not (tmp_path / "x.zarr").exists()


def test_damaged_rows_attribute_is_one_line(cli, ranges, tmp_path):
    bad = str(tmp_path / "bad.zarr")
    shutil.copytree(ranges["512:1024"], bad)
    meta = os.path.join(bad, "zarr.json")
    doc = json.loads(open(meta).read())
    doc["attributes"]["kdcache"]["rows"] = [512, 1024]
    open(meta, "w").write(json.dumps(doc))
    for line in (error_line(cli("info", bad)), error_line(cli("join", bad, ranges["0:512"], "--out", tmp_path / "x.zarr"))):
        assert "damaged attributes: rows should be null or an object" in line and "kdcache verify" in line
    r = cli("verify", bad)
    assert r.exit_code == 1 and "rows should be null or an object with int start and stop" in r.stderr
    doc["attributes"]["kdcache"]["rows"] = {"start": 512, "stop": 1024}
    del doc["attributes"]["kdcache"]["teacher"]
    open(meta, "w").write(json.dumps(doc))
    line = error_line(cli("join", bad, ranges["0:512"], "--out", tmp_path / "x.zarr"))
    assert f"{bad} has damaged attributes: missing teacher" in line
