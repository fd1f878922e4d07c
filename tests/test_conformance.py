"""Conformance: real caches against docs/FORMAT.md, read with plain zarr / h5py / numpy / json / zlib only.

This module never imports kdcache. Its fixture makes caches in a child Python process (which
does use kdcache) with arguments built here by clitools.dump_args (which imports no kdcache either);
everything checked here is derived from the text of docs/FORMAT.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from clitools import dump_args

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
AUG = "rrc(0.35,1)+flip"

# name -> (suffix, dump arguments). Pairs that share teacher, split, views and chunking let the
# top-k caches be checked against the float32 logits of a full cache.
CACHES = {
    "zarr-full-f32-test": (".zarr", ["--split", "test", "--dtype", "float32", "--chunk-rows", "100"]),
    "zarr-top3-test": (".zarr", ["--split", "test", "--topk", "3", "--chunk-rows", "100"]),
    "zarr-full-default": (".zarr", []),
    "h5-full-f32-2views": (".h5", ["--dtype", "float32", "--views", "2", "--augment", AUG, "--chunk-rows", "500"]),
    "h5-top4-2views-lzf": (".h5", ["--topk", "4", "--views", "2", "--augment", AUG, "--chunk-rows", "500",
                                   "--compressor", "lzf"]),
    "zarr-rows-f32-2views": (".zarr", ["--dtype", "float32", "--views", "2", "--augment", AUG, "--chunk-rows", "500",
                                       "--rows", "500:1200"]),
}
PAIRS = {"zarr-top3-test": "zarr-full-f32-test", "h5-top4-2views-lzf": "h5-full-f32-2views"}

# Runs in a child process: the only place kdcache is used. argv[1] is JSON: the teacher checkpoint to write,
# the `kdcache dump` argument lists of the caches, the `kdcache pack` arguments and the interrupted dump's.
MAKE_CACHES = r"""
import json, sys
import torch
from kdcache.cli import kdcache_main
from kdcache.models import build_model

job = json.loads(sys.argv[1])
torch.manual_seed(0)
model = build_model("mlp", num_classes=10, input_shape=(3, 16, 16), hidden=[32])
torch.save({"model": model.state_dict(), "arch": "mlp", "arch_args": {"hidden": [32]}}, job["teacher"])
for args in job["dumps"]:
    kdcache_main(args, standalone_mode=False)

# A packed (.zip) copy of one Zarr cache.
kdcache_main(job["pack"], standalone_mode=False)

# An HDF5 dump interrupted (as by Ctrl-C) at sample 750: leaves only its staging Zarr.
from kdcache.data.datasets import ArrayDataset, open_dataset

class Interrupted(ArrayDataset):
    def __getitem__(self, i):
        if int(i) >= 750:
            raise KeyboardInterrupt
        return super().__getitem__(i)

def interrupted(split, root=None):
    d = open_dataset("digits", split)
    return Interrupted(d.info, d.data, d.labels, d.layout)

try:
    kdcache_main(job["interrupted"], standalone_mode=False)
except SystemExit as e:
    assert e.code == 130, e.code
else:
    raise AssertionError("the interrupted dump finished")
"""


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("conformance")
    paths = {name: str(root / f"{name}{suffix}") for name, (suffix, _) in CACHES.items()}
    teacher = root / "teacher.pt"
    job = {
        "teacher": str(teacher),
        "dumps": [dump_args(teacher, paths[name], *extra, image_size=16) for name, (_, extra) in CACHES.items()],
        "pack": ["pack", paths[list(CACHES)[1]], str(root / "packed.zip")],
        # digits that raise KeyboardInterrupt at sample 750 (MAKE_CACHES defines `interrupted`)
        "interrupted": dump_args(teacher, root / "interrupted.h5", "--topk", 3, image_size=16,
                                 dataset="__main__:interrupted", chunk_rows=100),
    }
    r = subprocess.run([sys.executable, "-c", MAKE_CACHES, json.dumps(job)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    # the --quiet dumps that succeed write nothing to stderr; the interrupted one writes one line
    assert r.stderr.startswith("interrupted") and len(r.stderr.splitlines()) == 1, r.stderr
    paths["interrupted"] = str(root / "interrupted.h5")
    paths["packed"] = str(root / "packed.zip")
    return paths


def _open(path: str) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(arrays, kdcache attribute dict, per-array storage info {name: (chunks, compressed?)})."""
    if path.endswith(".zarr"):
        g = zarr.open_group(path, mode="r")
        arrays = {n: np.asarray(a[...]) for n, a in g.arrays()}
        store = {n: (tuple(a.chunks), len(a.compressors) > 0) for n, a in g.arrays()}
        return arrays, g.attrs["kdcache"], store
    with h5py.File(path, "r") as f:
        arrays = {n: f[n][...] for n in f}
        store = {n: (tuple(f[n].chunks), f[n].compression is not None) for n in f}
        raw = f.attrs["kdcache"]
        assert isinstance(raw, str), f"HDF5 attribute must be a JSON string, got {type(raw).__name__}"
        assert h5py.check_string_dtype(f.attrs.get_id("kdcache").dtype) is not None
        return arrays, json.loads(raw), store


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def test_partial_hdf5_dump_is_a_staging_zarr(caches):
    """Life cycle: only whole chunks are marked done, status stays partial, no stats, no HDF5 file yet."""
    path = caches["interrupted"]
    assert not Path(path).exists() and not Path(path + ".tmp").exists()
    g = zarr.open_group(path + ".partial.zarr", mode="r")
    a = g.attrs["kdcache"]
    assert a["format"] == "kdcache" and a["status"] == "partial" and "stats" not in a
    assert a["compressor"] == "gzip"  # the HDF5 file's; the staging arrays themselves are uncompressed
    assert all(len(g[n].compressors) == 0 for n in g.array_keys())
    done = g["done"][:]
    assert done.tolist() == [1] * 7 + [0] * 8  # rows 0-699 are whole chunks; chunk 7 stopped at row 750
    r = a["chunk_rows"]
    for ci in np.nonzero(done)[0]:
        crc = 0
        for name in ("values", "indices", "tail", "views"):
            part = np.ascontiguousarray(g[name][ci * r:(ci + 1) * r, 0])
            crc = zlib.crc32(part.astype(part.dtype.newbyteorder("<")).tobytes(), crc)
        assert crc == int(g["checksum"][ci, 0])


def test_packed_zip_is_the_zarr_cache_in_a_stored_zip(caches):
    path, source = caches["packed"], caches[list(CACHES)[1]]
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert "zarr.json" in {i.filename for i in infos}
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    g = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    src = zarr.open_group(source, mode="r")
    assert dict(g.attrs["kdcache"]) == dict(src.attrs["kdcache"])
    assert sorted(g.array_keys()) == sorted(src.array_keys())
    for name in src.array_keys():
        np.testing.assert_array_equal(g[name][...], src[name][...])
        assert g[name].dtype == src[name].dtype and g[name].chunks == src[name].chunks


def test_this_module_imports_no_kdcache():
    tree = ast.parse(Path(__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "kdcache" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "kdcache"


@pytest.mark.parametrize("name", CACHES)
def test_layout(caches, name):
    path = caches[name]
    arrays, a, store = _open(path)

    # --- attributes: every key FORMAT.md lists, with its type
    assert a["format"] == "kdcache"
    # 1.x; 2.x for a range cache (its rows start past sample 0, which a 1.x reader would not know)
    assert re.fullmatch(r"\d+\.\d+", a["version"])
    assert a["version"].split(".")[0] == ("1" if a.get("rows") is None else "2")
    assert a["status"] == "complete"
    assert a["kind"] in ("full", "topk")
    n, v, c = a["n"], a["n_views"], a["num_classes"]
    assert all(isinstance(x, int) and x > 0 for x in (n, v, c, a["chunk_rows"]))
    topk = a["kind"] == "topk"
    if topk:
        assert isinstance(a["k"], int) and 0 < a["k"] < c
        assert isinstance(a["tail"], str) and "logsumexp" in a["tail"]
    else:
        assert a["k"] is None and a["tail"] is None
    assert a["value_dtype"] in ("float16", "float32")
    assert a["index_dtype"] == ("int16" if c <= 32767 else "int32")
    assert isinstance(a["compressor"], str)
    t = a["teacher"]
    assert isinstance(t["name"], str) and isinstance(t["params"], int) and isinstance(t["arch_args"], dict)
    assert t["weights"]["source"] in ("file", "torchvision")
    assert isinstance(t["weights"]["params"], int) and isinstance(t["weights"]["arch_args"], dict)
    if t["weights"]["source"] == "file":
        assert isinstance(t["weights"]["path"], str)
        assert re.fullmatch(r"[0-9a-f]{64}", t["weights"]["sha256"])
        assert a["dump"]["weights_sha256"] == t["weights"]["sha256"]
    pre = t["preprocess"]
    assert isinstance(pre["image_size"], int) and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    d = a["dataset"]
    assert isinstance(d["spec"], str) and d["split"] in ("train", "test")
    rows = a.get("rows")  # a range cache holds dataset samples rows.start … rows.stop − 1
    if rows is None:
        assert d["n"] == n
    else:
        assert isinstance(rows["start"], int) and isinstance(rows["stop"], int)
        assert rows["stop"] - rows["start"] == n and 0 <= rows["start"] and rows["stop"] <= d["n"]
        assert a["dump"]["rows"] == [rows["start"], rows["stop"]]
    assert d["num_classes"] == c
    assert len(d["class_names"]) == c and all(isinstance(s, str) for s in d["class_names"])
    assert len(d["base_shape"]) == 3 and all(isinstance(s, int) for s in d["base_shape"])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", d["fingerprint"])
    assert re.fullmatch(r"[0-9a-f]{64}", d["labels_sha256"]) and isinstance(d["labelled"], int)
    vw = a["views"]
    assert vw["fields"] == ["y0", "x0", "h", "w", "flip"]
    assert isinstance(vw["augment"], str) and isinstance(vw["augment_spec"], dict) and isinstance(vw["seed"], int)
    assert set(a["dump"]) >= {"teacher", "weights_sha256", "dataset", "split", "fingerprint", "topk", "dtype",
                              "image_size", "batch_size", "chunk_rows", "views", "augment", "seed", "rows"}
    assert a["dump"]["topk"] == a["k"] and a["dump"]["chunk_rows"] == a["chunk_rows"]
    assert a["dump"]["fingerprint"] == d["fingerprint"]
    assert isinstance(a["created"], str) and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d", a["created"])
    assert a["tool"].startswith("kdcache ") and isinstance(a["command"], str)
    s = a["stats"]
    assert set(s) >= {"teacher_top1", "mean_entropy", "topk_mass"}
    json.dumps(a)  # JSON only

    # --- arrays: names, shapes, dtypes, chunk shapes (sample axis only, one view per chunk)
    r, w = a["chunk_rows"], (a["k"] if topk else c)
    n_chunks = math.ceil(n / r)
    expected = {
        "values": ((n, v, w), a["value_dtype"], (r, 1, w)),
        "labels": ((n,), "int64", (r,)),
        "views": ((n, v, 5), "float32", (r, 1, 5)),
        "done": ((n_chunks,), "uint8", (1,)),
        "checksum": ((n_chunks, v), "uint32", (1, v)),
    }
    if topk:
        expected["indices"] = ((n, v, w), a["index_dtype"], (r, 1, w))
        expected["tail"] = ((n, v), "float32", (r, 1))
    assert set(arrays) == set(expected)
    for arr_name, (shape, dtype, chunks) in expected.items():
        assert arrays[arr_name].shape == shape, arr_name
        assert arrays[arr_name].dtype == np.dtype(dtype), arr_name
        assert store[arr_name][0] == chunks, arr_name
    assert not store["done"][1] and not store["checksum"][1], "done/checksum are never compressed"
    assert all(store[x][1] for x in expected if x not in ("done", "checksum")) == (a["compressor"] != "none")
    assert (arrays["done"] == 1).all()

    # --- chunk rows: --chunk-rows if given, else the ~1 MiB rule, at most the dataset's size
    if "--chunk-rows" in CACHES[name][1]:
        assert r == min(int(CACHES[name][1][CACHES[name][1].index("--chunk-rows") + 1]), d["n"])
    else:
        itemsize = np.dtype(a["value_dtype"]).itemsize
        assert r == min(d["n"], min(max(2 ** math.floor(math.log2(2**20 / (w * itemsize))), 256), 16384))

    # --- labels and views
    labels = arrays["labels"]
    assert hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest() == (rows or d)["labels_sha256"]
    assert (rows is not None or d["labelled"] == int((labels >= 0).sum())) and labels.max() < c and labels.min() >= -1
    views = arrays["views"]
    if vw["augment"] == "none":
        np.testing.assert_array_equal(views, np.broadcast_to(np.float32([0, 0, 1, 1, 0]), (n, v, 5)))
    else:
        y0, x0, h, ww, flip = np.moveaxis(views, -1, 0)
        assert ((h > 0) & (h <= 1) & (ww > 0) & (ww <= 1)).all()
        assert ((y0 >= 0) & (y0 + h <= 1 + 1e-6) & (x0 >= 0) & (x0 + ww <= 1 + 1e-6)).all()  # rrc stays inside
        assert np.isin(flip, (0, 1)).all() and 0 < flip.mean() < 1
        assert not np.array_equal(views[:, 0], views[:, 1])

    # --- top-k: sorted descending, indices in range and distinct, tail finite
    if topk:
        vals, idx = arrays["values"], arrays["indices"]
        assert (vals[..., :-1] >= vals[..., 1:]).all()
        assert ((idx >= 0) & (idx < c)).all()
        assert (np.sort(idx, axis=-1)[..., 1:] != np.sort(idx, axis=-1)[..., :-1]).all()
        assert np.isfinite(arrays["tail"]).all()
    assert np.isfinite(arrays["values"]).all()


@pytest.mark.parametrize("name", CACHES)
def test_checksums(caches, name):
    """CRC-32 per chunk per view over values, indices, tail, views rows (stored dtype, LE, C order)."""
    arrays, a, _ = _open(caches[name])
    r = a["chunk_rows"]
    for ci in range(arrays["done"].shape[0]):
        rows = slice(ci * r, min((ci + 1) * r, a["n"]))
        for v in range(a["n_views"]):
            crc = 0
            for arr_name in ("values", "indices", "tail", "views"):
                if arr_name in arrays:
                    part = np.ascontiguousarray(arrays[arr_name][rows, v])
                    crc = zlib.crc32(part.astype(part.dtype.newbyteorder("<")).tobytes(), crc)
            assert crc == int(arrays["checksum"][ci, v]), f"chunk {ci} view {v}"


@pytest.mark.parametrize("name", CACHES)
def test_stats(caches, name):
    """stats recomputed from the stored arrays as FORMAT.md defines them."""
    arrays, a, _ = _open(caches[name])
    c, s = a["num_classes"], a["stats"]
    values = arrays["values"].astype(np.float64)                     # (N, V, W)
    labels = np.broadcast_to(arrays["labels"][:, None], values.shape[:2])
    if a["kind"] == "full":
        pred = values.argmax(-1)
        logp = values - _logsumexp(values)[..., None]
        entropy = -(np.exp(logp) * logp).sum(-1)
        mass = np.ones(values.shape[:2])
    else:
        k = a["k"]
        pred = arrays["indices"][..., 0]
        big = _logsumexp(np.concatenate([values, arrays["tail"][..., None].astype(np.float64)], -1))
        logp, logp_rest = values - big[..., None], arrays["tail"] - big
        entropy = -(np.exp(logp) * logp).sum(-1) - np.exp(logp_rest) * (logp_rest - np.log(c - k))
        mass = np.exp(logp).sum(-1)
        assert ((mass > 0) & (mass < 1)).all()
    labelled = labels >= 0
    assert s["teacher_top1"] == pytest.approx(((pred == labels) & labelled).sum() / labelled.sum(), abs=1e-12)
    assert s["mean_entropy"] == pytest.approx(entropy.mean(), rel=1e-4)
    assert s["topk_mass"] == pytest.approx(mass.mean(), rel=1e-4)


@pytest.mark.parametrize("name", PAIRS)
def test_topk_matches_full_logits(caches, name):
    """values/indices are the top-k of the teacher's logits; tail is logsumexp of the rest (at T=1)."""
    top, a, _ = _open(caches[name])
    full, fa, _ = _open(caches[PAIRS[name]])
    assert fa["value_dtype"] == "float32" and fa["kind"] == "full"
    np.testing.assert_array_equal(top["views"], full["views"])
    np.testing.assert_array_equal(top["labels"], full["labels"])
    logits, k = full["values"], a["k"]
    order = np.argsort(-logits, axis=-1, kind="stable")
    idx = order[..., :k]
    np.testing.assert_array_equal(top["indices"], idx)
    np.testing.assert_array_equal(top["values"], np.take_along_axis(logits, idx, -1).astype(a["value_dtype"]))
    rest = np.take_along_axis(logits, order[..., k:], -1).astype(np.float64)
    np.testing.assert_allclose(top["tail"], _logsumexp(rest), rtol=1e-5, atol=1e-5)


def test_range_cache_rows_are_the_whole_caches_rows(caches):
    """A range cache's row i is dataset sample rows.start + i: the same bytes as the whole dump's row."""
    part, a, _ = _open(caches["zarr-rows-f32-2views"])
    whole, wa, _ = _open(caches["h5-full-f32-2views"])
    start, stop = a["rows"]["start"], a["rows"]["stop"]
    assert wa.get("rows") is None and a["dataset"] == wa["dataset"] and a["chunk_rows"] == wa["chunk_rows"]
    for name in ("values", "labels", "views"):
        np.testing.assert_array_equal(part[name], whole[name][start:stop], err_msg=name)


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", FORMAT_MD.read_text(), flags=re.S)


def test_format_md_documents_every_array_and_key():
    text = FORMAT_MD.read_text()
    for word in ("values", "indices", "tail", "labels", "views", "done", "checksum", "format", "version",
                 "status", "kind", "num_classes", "n_views", "chunk_rows", "value_dtype", "index_dtype",
                 "compressor", "teacher", "dataset", "dump", "created", "tool", "command", "stats",
                 "teacher_top1", "mean_entropy", "topk_mass", "rows", "start", "stop", "join", "merge"):
        assert f"`{word}`" in text, word
    assert "65504" in text and "## Changelog" in text and "1.0" in text and "**1.1**" in text
    assert len(_doc_blocks()) == 3


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_format_md_examples_run(caches, name, T):
    """FORMAT.md's reading example for the backend plus its soft-target recipe, run as written."""
    path = caches[name]
    read_zarr, read_h5, targets = _doc_blocks()
    read = read_zarr.replace('"logits.zarr"', repr(path)) if path.endswith(".zarr") else \
        read_h5.replace('"logits.h5"', repr(path))
    ns: dict = {}
    exec(compile(read + targets.replace("T=4.0)", f"T={T})"), str(FORMAT_MD), "exec"), ns)
    p, a = ns["p"], ns["a"]
    assert p.shape == (a["n"], a["num_classes"])
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    arrays, _, _ = _open(path)
    if a["kind"] == "full":
        z = arrays["values"][:, 0].astype(np.float64) / T
        np.testing.assert_allclose(p, np.exp(z - _logsumexp(z)[:, None]), rtol=1e-5, atol=1e-7)
    elif T == 1.0:  # exact: the top-k probabilities of the teacher's softmax
        vals = arrays["values"][:, 0].astype(np.float64)
        big = _logsumexp(np.concatenate([vals, arrays["tail"][:, 0:1]], 1))
        got = np.take_along_axis(p, arrays["indices"][:, 0].astype(np.int64), 1)
        np.testing.assert_allclose(got, np.exp(vals - big[:, None]), rtol=1e-5, atol=1e-7)
