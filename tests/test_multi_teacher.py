"""Several teachers in one pass: each sample decoded (and its views drawn) once, every teacher at its own input
size, and each cache equal, array for array, to what a separate dump of that teacher writes."""

from __future__ import annotations

import pytest
from clitools import assert_same_arrays, error_line, kd, ok, read_plain


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, save_teacher):
    d = tmp_path_factory.mktemp("multi")
    return {"a": save_teacher(d / "a.pt", image_size=8, seed=1), "b": save_teacher(d / "b.pt", image_size=16, seed=2)}


COMMON = ["--dataset", "digits", "--device", "cpu", "--quiet", "--chunk-rows", "256", "--topk", "3"]


@pytest.mark.parametrize("suffix, extra", [(".zarr", []), (".h5", []),
                                           (".zarr", ["--views", "2", "--augment", "rrc(0.35,1)+flip"]),
                                           (".h5", ["--views", "2", "--augment", "rrc(0.35,1)+flip"])])
def test_one_pass_equals_separate_dumps(teachers, tmp_path, suffix, extra):
    ok(kd("dump", "--teacher", "mlp", "--weights", teachers["a"], "--image-size", 8, "--out", tmp_path / f"a{suffix}",
          "--teacher", "mlp", "--weights", teachers["b"], "--image-size", 16, "--out", tmp_path / f"b{suffix}",
          *COMMON, *extra))
    for name, size in (("a", 8), ("b", 16)):
        ok(kd("dump", "--teacher", "mlp", "--weights", teachers[name], "--image-size", size,
              "--out", tmp_path / f"{name}-alone{suffix}", *COMMON, *extra))
        (got, got_attrs), (want, want_attrs) = (read_plain(str(tmp_path / f"{n}{suffix}"))
                                                for n in (name, f"{name}-alone"))
        assert_same_arrays(got, want)
        differ = {k for k in set(got_attrs) | set(want_attrs) if got_attrs.get(k) != want_attrs.get(k)}
        assert differ <= {"created", "command"}, differ
        assert got_attrs["teacher"]["preprocess"]["image_size"] == size
    views_a, views_b = (read_plain(str(tmp_path / f"{n}{suffix}"))[0]["views"] for n in "ab")
    assert (views_a == views_b).all()  # the same views: the caches can be merged into an ensemble
    ok(kd("merge", tmp_path / f"a{suffix}", tmp_path / f"b{suffix}", "--out", tmp_path / "ens.zarr"))


def test_a_resumed_pass_writes_only_what_each_cache_lacks(teachers, tmp_path):
    import zarr

    args = ["dump", "--teacher", "mlp", "--weights", teachers["a"], "--out", tmp_path / "a.zarr", "--image-size", 8,
            "--teacher", "mlp", "--weights", teachers["b"], "--out", tmp_path / "b.zarr", "--image-size", 16, *COMMON]
    ok(kd(*args))
    want = {n: read_plain(str(tmp_path / f"{n}.zarr"))[0] for n in "ab"}
    for name, chunks in (("a", [1]), ("b", [2, 4])):  # as if each had been killed at a different point
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r+")
        for c in chunks:
            g["done"][c] = 0
        g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {"status": "partial"}
    ok(kd(*args, "--resume"))
    for name in "ab":
        assert_same_arrays(read_plain(str(tmp_path / f"{name}.zarr"))[0], want[name])


@pytest.mark.parametrize("flags, words", [
    (["--out", "x.zarr"], "--out was given 1 time(s) for 2 --teacher"),
    (["--out", "x.zarr", "--out", "x.zarr"], "the same --out"),
    (["--out", "x.zarr", "--out", "y.zarr", "--weights", "w.pt"], "--weights was given 1 time(s) for 2"),
    (["--out", "x.zarr", "--out", "y.zarr", "--teacher-arg", "hidden=(4,)"], "--teacher-arg applies to a single"),
])
def test_pairing_mistakes_are_one_line(tmp_path, flags, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(kd("dump", "--teacher", "mlp", "--teacher", "cnn_s", *COMMON, *flags))
    assert words in line
