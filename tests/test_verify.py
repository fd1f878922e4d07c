"""`kdcache verify`: ok on sound caches; exit 1 naming the array/chunk/attribute for each kind of damage.

Every corruption is made with plain zarr/h5py or plain file edits on a copy of a sound cache. Where the
damage should be caught by one specific check (NaN, index range, sort order), the stored CRC is
recomputed first (by the rule in docs/FORMAT.md, with zlib, not kdcache's code) so the checksum check
cannot be what catches it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from clitools import copy_cache, flip_byte, invoke, zarr_chunk_file

from kdcache.cli import kdcache_main

N, ROWS, N_CHUNKS = 1437, 128, 12
PER_VIEW = ("values", "indices", "tail", "views")


@pytest.fixture(scope="module")
def sound(tmp_path_factory, save_teacher):
    """name -> path of a sound cache (top-3, digits, mlp teacher at 8 px, 128-row chunks)."""
    d = tmp_path_factory.mktemp("verify")
    save_teacher(d / "teacher.pt")
    base = ["dump", "--teacher", "mlp", "--weights", d / "teacher.pt", "--dataset", "digits", "--image-size", 8,
            "--chunk-rows", ROWS, "--device", "cpu", "--quiet"]
    made = {
        "raw.zarr": ["--topk", 3, "--compressor", "none"],  # flips in chunk files are silent data changes
        "raw.h5": ["--topk", 3, "--compressor", "none"],
        "blosc.zarr": ["--topk", 3],                         # the default compressors
        "gzip.h5": ["--topk", 3],
        "views.zarr": ["--topk", 3, "--compressor", "none", "--views", 2, "--augment", "flip"],
        "full.zarr": ["--compressor", "none"],
    }
    out = {}
    for name, extra in made.items():
        r = invoke(kdcache_main, [*base, *extra, "--out", d / name])
        assert r.exit_code == 0, r.output
        out[name] = str(d / name)
    return out


# --- plain-format helpers (docs/FORMAT.md), independent of kdcache's code --------------------------

def _crc(rows: dict[str, np.ndarray]) -> int:
    crc = 0
    for name in PER_VIEW:
        if name in rows:
            a = np.ascontiguousarray(rows[name])
            crc = zlib.crc32(a.astype(a.dtype.newbyteorder("<")).tobytes(), crc)
    return crc


def _rehash(g, c: int, v: int) -> None:
    """Store the CRC that chunk c, view v now has, as a writer would have."""
    sl = slice(c * ROWS, min((c + 1) * ROWS, N))
    rows = {n: np.asarray(g[n][sl, v]) for n in PER_VIEW if n in g}
    crcs = np.asarray(g["checksum"][...])
    crcs[c, v] = _crc(rows)
    g["checksum"][...] = crcs


def _zarr_attrs(path: str, change) -> None:
    g = zarr.open_group(path, mode="r+")
    a = dict(g.attrs["kdcache"])
    change(a)
    g.attrs["kdcache"] = a


def _h5_attrs(path: str, change) -> None:
    with h5py.File(path, "r+") as f:
        a = json.loads(f.attrs["kdcache"])
        change(a)
        f.attrs["kdcache"] = json.dumps(a)


def _h5_chunk_offset(path: str, name: str, c: int) -> int:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((c * ROWS, 0, 0))
        return info.byte_offset + info.size // 2


def _verify_failure(path: str) -> str:
    """Run `kdcache verify`; it must fail cleanly. Returns stderr (problem lines, then the error line)."""
    r = invoke(kdcache_main, ["verify", path])
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ")
    assert all(ln.startswith(f"{path}: ") for ln in lines[:-1]), r.stderr
    return r.stderr


# --- sound caches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["raw.zarr", "raw.h5", "blosc.zarr", "gzip.h5", "views.zarr", "full.zarr"])
def test_sound_cache_verifies_ok(sound, name):
    r = invoke(kdcache_main, ["verify", sound[name]])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"ok: {sound[name]}: {N} samples, {N_CHUNKS} chunks") and r.stderr == ""


# --- corruptions: (cache, how to damage it, regexes the report must contain, regexes no problem line may
# match[, regexes of further problem lines allowed as consequences]); any other problem line fails the test --

def _zarr(fn):
    return lambda p: fn(zarr.open_group(p, mode="r+"))


def _poke(name: str, chunk: int, view: int, at: tuple, value: float) -> Callable:
    """Set one element (`at`, within the chunk's rows) of `name` in chunk `chunk` and re-checksum that chunk's
    view `view`: data the CRC accepts, which only the content checks (NaN/Inf, index range) can catch."""
    def poke(g):
        rows = slice(chunk * ROWS, (chunk + 1) * ROWS)
        a = np.asarray(g[name][rows])
        a[at] = value
        g[name][rows] = a
        _rehash(g, chunk, view)
    return poke


_nan_values = _poke("values", 2, 0, (7, 0, 0), np.nan)
_inf_tail = _poke("tail", 4, 0, (3, 0), np.inf)
_nan_view1 = _poke("values", 9, 1, (0, 1, 0), np.nan)
_index_out_of_range = _poke("indices", 6, 0, (5, 0, 2), 10)
_negative_index = _poke("indices", 1, 0, (0, 0, 0), -3)


def _unsorted(g):
    v = np.asarray(g["values"][8 * ROWS:9 * ROWS])
    v[2, 0, :] = v[2, 0, ::-1].copy()
    g["values"][8 * ROWS:9 * ROWS] = v
    _rehash(g, 8, 0)


def _labels_changed(g):
    lab = np.asarray(g["labels"][...])
    lab[100] = (lab[100] + 1) % 10
    g["labels"][...] = lab


def _labels_out_of_range(g):
    lab = np.asarray(g["labels"][...])
    lab[5] = 42
    g["labels"][...] = lab


def _values_from_other_chunk(g):  # valid, decodable, finite, sorted data: only the CRC can tell
    g["values"][3 * ROWS:4 * ROWS] = g["values"][4 * ROWS:5 * ROWS]


def _checksum_edited(g):
    crcs = np.asarray(g["checksum"][...])
    crcs[10, 0] ^= 0x1
    g["checksum"][...] = crcs


def _done_cleared(g):
    g["done"][3] = 0


def _tail_as_float64(g):
    t = np.asarray(g["tail"][...]).astype(np.float64)
    del g["tail"]
    g.create_array("tail", shape=t.shape, dtype="float64", chunks=(ROWS, 1), fill_value=0)
    g["tail"][...] = t


def _tail_missing(p):
    shutil.rmtree(os.path.join(p, "tail"))


def _set(**kv):
    return lambda a: a.update(kv)


def _delete(key):
    return lambda a: a.pop(key)


def _dataset_n(a):
    a["dataset"] = dict(a["dataset"], n=1000)


CHUNK5 = r"chunk 5 \(rows 640-767\), view 0"
CRC_FAIL = r"^\S+: chunk \d+ \(rows \d+-\d+\), view 0: checksum mismatch"  # consequences allowed beside the cause
SHAPE = r"^\S+: \w+: shape \(.*\) dtype \w+, expected shape"
CORRUPTIONS = {
    # silent data changes in chunk files (no compression: the codec still decodes them)
    "zarr-flip-values-byte": ("raw.zarr", lambda p: flip_byte(zarr_chunk_file(p), 300),
                              [CHUNK5 + r": checksum mismatch"], []),
    "zarr-flip-indices-byte": ("raw.zarr", lambda p: flip_byte(zarr_chunk_file(p, "indices", 7), 10, 0x02),
                               [r"chunk 7 \(rows 896-1023\), view 0: checksum mismatch"], []),
    "zarr-flip-tail-byte": ("raw.zarr", lambda p: flip_byte(zarr_chunk_file(p, "tail", 11), 8, 0x10),
                            [r"chunk 11 \(rows 1408-1436\), view 0: checksum mismatch"], []),
    "zarr-flip-values-view1": ("views.zarr", lambda p: flip_byte(os.path.join(p, "values", "c", "5", "1", "0"), 64),
                               [r"chunk 5 \(rows 640-767\), view 1: checksum mismatch"], [r"view 0"]),
    "zarr-flip-compressed-byte": ("blosc.zarr", lambda p: flip_byte(zarr_chunk_file(p), os.path.getsize(zarr_chunk_file(p)) // 2,
                                                                0xFF),
                                  [CHUNK5 + r": (checksum mismatch|cannot be read)"], []),
    "zarr-values-chunk-deleted": ("raw.zarr", lambda p: os.remove(zarr_chunk_file(p, "values", 7)),
                                  [r"chunk 7 \(rows 896-1023\), view 0: checksum mismatch"], []),
    "zarr-values-chunk-truncated": ("raw.zarr", lambda p: os.truncate(zarr_chunk_file(p), 100),
                                    [CHUNK5 + r": cannot be read"], []),
    "zarr-values-from-other-chunk": ("raw.zarr", _zarr(_values_from_other_chunk),
                                     [r"chunk 3 \(rows 384-511\), view 0: checksum mismatch"], [r"chunk 4"]),
    "zarr-checksum-edited": ("raw.zarr", _zarr(_checksum_edited),
                             [r"chunk 10 \(rows 1280-1407\), view 0: checksum mismatch"], []),
    "zarr-done-cleared": ("raw.zarr", _zarr(_done_cleared), [r"done: 1 of 12 chunks not written \(first: 3\)"], []),
    "zarr-done-chunk-file-deleted": ("raw.zarr", lambda p: os.remove(os.path.join(p, "done", "c", "9")),
                                     [r"done: 1 of 12 chunks not written \(first: 9\)"], []),
    # bad values behind a valid CRC: only the specific check can catch them
    "zarr-nan-in-values": ("raw.zarr", _zarr(_nan_values),
                           [r"chunk 2 \(rows 256-383\), view 0: values holds NaN or Inf in 1 rows"], [r"checksum"]),
    "zarr-nan-in-view1": ("views.zarr", _zarr(_nan_view1),
                          [r"chunk 9 \(rows 1152-1279\), view 1: values holds NaN or Inf in 1 rows"], [r"checksum"]),
    "zarr-inf-in-tail": ("raw.zarr", _zarr(_inf_tail),
                         [r"chunk 4 \(rows 512-639\), view 0: tail holds NaN or Inf in 1 rows"], [r"checksum"]),
    "zarr-index-out-of-range": ("raw.zarr", _zarr(_index_out_of_range),
                                [r"chunk 6 \(rows 768-895\), view 0: indices outside \[0, 10\)"], [r"checksum"]),
    "zarr-negative-index": ("raw.zarr", _zarr(_negative_index),
                            [r"chunk 1 \(rows 128-255\), view 0: indices outside \[0, 10\)"], [r"checksum"]),
    "zarr-topk-unsorted": ("raw.zarr", _zarr(_unsorted),
                           [r"chunk 8 \(rows 1024-1151\), view 0: top-k values not sorted"], [r"checksum"]),
    "zarr-labels-changed": ("raw.zarr", _zarr(_labels_changed), [r"labels: sha256 differs"], [r"checksum"]),
    "zarr-labels-out-of-range": ("raw.zarr", _zarr(_labels_out_of_range),
                                 [r"labels: values outside \[-1, 10\)", r"labels: sha256 differs"], []),
    # arrays
    "zarr-tail-array-missing": ("raw.zarr", _tail_missing, [r"tail: array missing"], [], [CRC_FAIL]),
    "zarr-tail-wrong-dtype": ("raw.zarr", _zarr(_tail_as_float64),
                              [r"tail: shape \(1437, 1\) dtype float64, expected shape \(1437, 1\) dtype float32"], [],
                              [CRC_FAIL]),
    # attributes
    "zarr-attr-n-wrong": ("raw.zarr", lambda p: _zarr_attrs(p, _set(n=1000)),
                          [r"labels: shape \(1437,\) dtype int64, expected shape \(1000,\)",
                           r"dataset\.n 1437 differs from n 1000"], [], [SHAPE]),
    "zarr-attr-dataset-n-wrong": ("raw.zarr", lambda p: _zarr_attrs(p, _dataset_n),
                                  [r"attributes: dataset\.n 1000 differs from n 1437"], []),
    "zarr-attr-missing-teacher": ("raw.zarr", lambda p: _zarr_attrs(p, _delete("teacher")),
                                  [r"attributes: missing teacher"], []),
    "zarr-attr-missing-n-and-k": ("raw.zarr", lambda p: _zarr_attrs(p, lambda a: (a.pop("n"), a.pop("k"))),
                                  [r"attributes: missing k, n"], []),
    "zarr-attr-status-partial": ("raw.zarr", lambda p: _zarr_attrs(p, _set(status="partial")),
                                 [r"attributes: status is 'partial', not 'complete'"], []),
    "zarr-attr-n-float": ("raw.zarr", lambda p: _zarr_attrs(p, _set(n=1437.0)),
                          [r"attributes: n should be int, found float"], []),
    "zarr-attr-teacher-null": ("raw.zarr", lambda p: _zarr_attrs(p, _set(teacher=None)),
                               [r"attributes: teacher should be dict, found NoneType"], []),
    "zarr-attr-chunk-rows-wrong": ("raw.zarr", lambda p: _zarr_attrs(p, _set(chunk_rows=64)),
                                   [r"done: shape \(12,\) dtype uint8, expected shape \(23,\)"], [], [SHAPE]),
    "zarr-attr-version-9": ("raw.zarr", lambda p: _zarr_attrs(p, _set(version="9.0")),
                            [r"format version 9\.0, newer than this kdcache reads \(up to \d+\.x\); upgrade"], []),
    "zarr-attr-version-garbage": ("raw.zarr", lambda p: _zarr_attrs(p, _set(version="abc")),
                                  [r"format version abc"], []),
    "zarr-attr-not-kdcache": ("raw.zarr", lambda p: _zarr_attrs(p, _set(format="something-else")),
                              [r"is not a kdcache cache"], []),
    "zarr-group-metadata-garbage": ("raw.zarr", lambda p: Path(p, "zarr.json").write_text("{not json"),
                                    [r"cannot open .* as a zarr cache"], []),
    # HDF5
    "h5-truncated-half": ("raw.h5", lambda p: os.truncate(p, os.path.getsize(p) // 2),
                          [r"cannot open .* as a hdf5 cache \(OSError: .*truncated file"], []),
    "h5-truncated-tail": ("gzip.h5", lambda p: os.truncate(p, os.path.getsize(p) - 100),
                          [r"cannot open .* as a hdf5 cache"], []),
    "h5-flip-values-byte": ("raw.h5", lambda p: flip_byte(p, _h5_chunk_offset(p, "values", 5)),
                            [CHUNK5 + r": checksum mismatch"], []),
    "h5-flip-compressed-byte": ("gzip.h5", lambda p: flip_byte(p, _h5_chunk_offset(p, "values", 5), 0xFF),
                                [CHUNK5 + r": (checksum mismatch|cannot be read)"], []),
    "h5-attr-n-wrong": ("raw.h5", lambda p: _h5_attrs(p, _set(n=1000)),
                        [r"labels: shape \(1437,\) dtype int64, expected shape \(1000,\)"], [],
                        [SHAPE, r"dataset\.n 1437 differs from n 1000"]),
    "h5-attr-status-partial": ("gzip.h5", lambda p: _h5_attrs(p, _set(status="partial")),
                               [r"attributes: status is 'partial'"], []),
    "h5-attr-version-9": ("raw.h5", lambda p: _h5_attrs(p, _set(version="9.0")), [r"format version 9\.0, newer"], []),
    "h5-labels-changed": ("raw.h5", lambda p: _h5_edit(p, "labels", 100), [r"labels: sha256 differs"], []),
    # full-logits cache
    "full-nan-in-values": ("full.zarr", _zarr(_nan_values),
                           [r"chunk 2 \(rows 256-383\), view 0: values holds NaN or Inf in 1 rows"], [r"checksum"]),
}


def _h5_edit(path: str, name: str, row: int) -> None:
    with h5py.File(path, "r+") as f:
        f[name][row] = (f[name][row] + 1) % 10


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corruption_is_reported_precisely(sound, tmp_path, case):
    src, damage, must, must_not, *also = CORRUPTIONS[case]
    also = also[0] if also else []
    path = copy_cache(sound[src], tmp_path)
    damage(path)
    report = _verify_failure(path)
    problems = report.splitlines()[:-1]
    for pattern in must:
        assert re.search(pattern, report), (pattern, report)
    for pattern in must_not:
        assert not any(re.search(pattern, p) for p in problems), (pattern, report)
    # nothing but the damage is reported: every problem line matches one of the expected patterns
    for p in problems:
        assert any(re.search(pat, p) for pat in [*must, *also]), (p, report)


# attribute edits that verify reports cleanly but only through the layout check's own wording
@pytest.mark.parametrize("change, words", [
    (_set(k=20), ["20", "between 1 and 9"]),
    (_set(value_dtype="float64"), ["float64"]),
    (_set(n_views=0), ["views=0"]),
])
def test_impossible_layout_attributes_are_one_clean_line(sound, tmp_path, change, words):
    path = copy_cache(sound["raw.zarr"], tmp_path)
    _zarr_attrs(path, change)
    report = _verify_failure(path)
    for w in words:
        assert w in report, (w, report)


DAMAGED_METADATA = {
    "attr-n-not-a-number": (
        lambda p: _zarr_attrs(p, _set(n="abc")), r"attributes: n should be int, found str"),
    "attr-dataset-not-a-dict": (
        lambda p: _zarr_attrs(p, _set(dataset="digits")), r"attributes: dataset should be dict, found str"),
    "attrs-not-json": (
        lambda p: zarr.open_group(p, mode="r+").attrs.__setitem__("kdcache", "{garbage"), r"kdcache"),
    "values-array-metadata-deleted": (
        lambda p: os.remove(os.path.join(p, "values", "zarr.json")), r"values: array missing"),
    "array-metadata-garbage": (
        lambda p: Path(p, "tail", "zarr.json").write_text("{not json"), r"tail"),
}


@pytest.mark.parametrize("case", list(DAMAGED_METADATA))
def test_damaged_metadata_is_reported_not_a_traceback(sound, tmp_path, case):
    damage, pattern = DAMAGED_METADATA[case]
    path = copy_cache(sound["raw.zarr"], tmp_path)
    damage(path)
    report = _verify_failure(path)
    assert re.search(pattern, report), report


def test_verify_missing_and_foreign_paths(tmp_path):
    for name, words in (("nope.zarr", "no cache at"), ("nope.h5", "no cache at"), ("x.txt", "cannot tell")):
        assert words in _verify_failure(str(tmp_path / name))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    assert "not a kdcache cache" in _verify_failure(str(tmp_path / "other.zarr"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    assert "not a kdcache cache" in _verify_failure(str(tmp_path / "other.h5"))
    (tmp_path / "junk.h5").write_bytes(os.urandom(4096))
    assert "cannot open" in _verify_failure(str(tmp_path / "junk.h5"))
