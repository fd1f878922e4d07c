"""`kdcache dump` / `kdcache info` through the CLI: refusals, overwrite, resume, locking, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from clitools import copy_cache, error_line
from conftest import IMAGE_SIZE, KDCACHE_BIN, TEACHER

N, ROWS = 1437, 100


def _no_leftovers(out: str) -> None:
    assert not os.path.exists(out + ".lock")
    if out.endswith(".h5"):
        assert not os.path.exists(out + ".partial.zarr") and not os.path.exists(out + ".tmp")


def _set_attrs(path: str, **changes) -> None:
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | changes


# --- existing output ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_existing_complete_cache_refused_then_overwritten(cli, dump_args, dump_cache, read_plain, tree_hash,
                                                          tmp_path, suffix):
    out = copy_cache(dump_cache(suffix, "--topk", 3), tmp_path)
    before = tree_hash(out)
    for flags in ([], ["--resume"]):
        line = error_line(cli(*dump_args, "--out", out, "--topk", 3, *flags))
        assert line.startswith("error: ") and "--overwrite" in line
        assert tree_hash(out) == before
    _no_leftovers(out)

    r = cli(*dump_args, "--out", out, "--topk", 2, "--overwrite")
    assert r.exit_code == 0, r.output
    arrays, attrs = read_plain(out)
    assert attrs["status"] == "complete" and attrs["k"] == 2 and arrays["values"].shape == (N, 1, 2)
    _no_leftovers(out)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_foreign_directory_is_never_touched(cli, dump_args, tree_hash, tmp_path, overwrite):
    out = tmp_path / "photos.zarr"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("not a cache")
    (out / "sub" / "data.bin").write_bytes(os.urandom(100))
    before = tree_hash(str(out))
    line = error_line(cli(*dump_args, "--out", out, *overwrite))
    assert line.startswith("error: ") and "not a kdcache cache" in line
    assert tree_hash(str(out)) == before
    assert not os.path.exists(str(out) + ".lock")


def test_foreign_hdf5_file_is_never_touched(cli, dump_args, tree_hash, tmp_path):
    import h5py

    out = tmp_path / "experiment.h5"
    with h5py.File(out, "w") as f:
        f["measurements"] = np.arange(10)
    before = tree_hash(str(out))
    assert error_line(cli(*dump_args, "--out", out)).startswith("error: ")
    assert tree_hash(str(out)) == before
    line = error_line(cli(*dump_args, "--out", out, "--overwrite"))
    assert "not a kdcache cache" in line
    assert tree_hash(str(out)) == before


# --- resume ------------------------------------------------------------------------------------

def test_partial_zarr_refused_then_resumed(cli, dump_args, dump_cache, read_plain, tree_hash, tmp_path):
    extra = ["--topk", 3, "--chunk-rows", ROWS]
    ref_arrays, ref_attrs = read_plain(dump_cache(".zarr", *extra))
    out = copy_cache(dump_cache(".zarr", *extra), tmp_path)
    # what a crash after chunk 2 and before chunk 7 leaves: undone chunks hold anything
    g = zarr.open_group(out, mode="r+")
    g["done"][3:7] = 0
    g["values"][300:700] = 0
    g["checksum"][3:7] = 0
    attrs = dict(g.attrs["kdcache"])
    attrs["status"] = "partial"
    del attrs["stats"]
    g.attrs["kdcache"] = attrs
    before = tree_hash(out)

    line = error_line(cli(*dump_args, "--out", out, *extra))
    assert "--resume" in line and "partial" in line
    assert tree_hash(out) == before
    r = cli("info", out)  # info describes partial caches too
    assert r.exit_code == 0 and "partial" in r.output and "--resume" in r.output

    r = cli(*dump_args, "--out", out, *extra, "--resume")
    assert r.exit_code == 0, r.output
    arrays, attrs = read_plain(out)
    assert attrs["status"] == "complete"
    assert attrs["stats"] == ref_attrs["stats"]
    for name, a in ref_arrays.items():
        np.testing.assert_array_equal(arrays[name], a, err_msg=name)
    _no_leftovers(out)


FAILING_DATASET = '''
import os
from kdcache.data.datasets import ArrayDataset, open_dataset


class InterruptedDigits(ArrayDataset):
    """digits/train that raises KeyboardInterrupt (as Ctrl-C would) at item $KDT_STOP_AT."""

    def __getitem__(self, i):
        stop = os.environ.get("KDT_STOP_AT")
        if stop is not None and int(i) >= int(stop):
            raise KeyboardInterrupt
        return super().__getitem__(i)


def digits(split, root=None):
    d = open_dataset("digits", split)
    return InterruptedDigits(d.info, d.data, d.labels, d.layout)
'''


def test_interrupted_hdf5_dump_resumes(cli, dump_args, dump_cache, read_plain, tmp_path, monkeypatch):
    """Ctrl-C mid-dump leaves only the staging Zarr; --resume (same command) finishes the same cache."""
    (tmp_path / "kdt_interrupt_ds.py").write_text(FAILING_DATASET)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "t.h5")
    cmd = [*dump_args, "--out", out, "--topk", 3, "--chunk-rows", ROWS, "--dataset", "kdt_interrupt_ds:digits"]

    monkeypatch.setenv("KDT_STOP_AT", "750")
    r = cli(*cmd)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "--resume" in r.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".lock")
    stage = out + ".partial.zarr"
    g = zarr.open_group(stage, mode="r")
    assert g.attrs["kdcache"]["status"] == "partial"
    np.testing.assert_array_equal(g["done"][:], [1] * 7 + [0] * 8)  # whole chunks only

    assert "--resume" in error_line(cli(*cmd))
    assert "--resume" in error_line(cli("info", out))
    line = error_line(cli(*[a if a != 3 else 4 for a in cmd], "--resume"))
    assert "topk" in line
    line = error_line(cli(*cmd, "--seed", 1, "--resume"))
    assert "seed" in line

    monkeypatch.delenv("KDT_STOP_AT")
    r = cli(*cmd, "--resume")
    assert r.exit_code == 0, r.output
    _no_leftovers(out)
    arrays, attrs = read_plain(out)
    ref_arrays, ref_attrs = read_plain(dump_cache(".h5", "--topk", 3, "--chunk-rows", ROWS))
    assert attrs["status"] == "complete" and attrs["stats"] == ref_attrs["stats"]
    assert attrs["dataset"]["fingerprint"] == ref_attrs["dataset"]["fingerprint"]
    for name, a in ref_arrays.items():
        np.testing.assert_array_equal(arrays[name], a, err_msg=name)


def test_resume_with_another_compressor_keeps_attrs_true(cli, dump_args, tmp_path, monkeypatch):
    import h5py

    (tmp_path / "kdt_interrupt_ds2.py").write_text(FAILING_DATASET)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "t.h5")
    cmd = [*dump_args, "--out", out, "--chunk-rows", ROWS, "--dataset", "kdt_interrupt_ds2:digits"]
    monkeypatch.setenv("KDT_STOP_AT", "250")
    assert cli(*cmd).exit_code == 130
    monkeypatch.delenv("KDT_STOP_AT")
    r = cli(*cmd, "--resume", "--compressor", "lzf")
    if r.exit_code != 0:  # refusing is fine, if it says why
        assert "compressor" in error_line(r)
        return
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["kdcache"])["compressor"] == f["values"].compression


# --- clean errors ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict[str, str]:
    """Checkpoints that do not fit the 10-class teacher: 5 classes; another architecture."""
    from kdcache.models import build_model

    root = tmp_path_factory.mktemp("bad_weights")
    five = build_model(TEACHER, num_classes=5, input_shape=(3, IMAGE_SIZE, IMAGE_SIZE), hidden=[32])
    torch.save({"model": five.state_dict(), "arch": TEACHER, "arch_args": {"hidden": [32]}}, root / "five.pt")
    other = build_model("cnn_s", num_classes=10, input_shape=(3, IMAGE_SIZE, IMAGE_SIZE), width=4)
    torch.save({"model": other.state_dict(), "arch": "cnn_s"}, root / "other.pt")
    return {"five": str(root / "five.pt"), "other": str(root / "other.pt")}


def _replace(args: list[str], flag: str, value: str | None) -> list[str]:
    """args with `flag VALUE` replaced (value None: removed)."""
    i = args.index(flag)
    return args[:i] + ([flag, value] if value is not None else []) + args[i + 2:]


ERRORS = {
    # case: (how to change the base arguments, words the message must contain)
    "unknown-teacher": (lambda a, w: _replace(a, "--teacher", "resnet9000"), ["resnet9000"]),
    "unknown-dataset": (lambda a, w: _replace(a, "--dataset", "nosuchdata"), ["nosuchdata"]),
    "unknown-suffix": (lambda a, w: a[:-1] + [a[-1][:-5] + ".txt"], [".zarr", ".h5"]),
    "topk-too-big": (lambda a, w: a + ["--topk", "10"], ["--topk", "10"]),
    "topk-zero": (lambda a, w: a + ["--topk", "0"], ["--topk"]),
    "weights-5-classes": (lambda a, w: _replace(a, "--weights", w["five"]), ["10 classes"]),
    "weights-other-arch": (lambda a, w: _replace(a, "--weights", w["other"]), ["cnn_s"]),
    "weights-missing": (lambda a, w: _replace(a, "--weights", "/nonexistent/teacher.pt"), ["not found"]),
    "no-weights": (lambda a, w: _replace(a, "--weights", None), ["--weights"]),
    "resume-and-overwrite": (lambda a, w: a + ["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    "unknown-compressor": (lambda a, w: a + ["--compressor", "snappy"], ["snappy"]),
    "zarr-compressor-for-h5": (lambda a, w: a[:-1] + [a[-1][:-5] + ".h5", "--compressor", "blosc-zstd"],
                               ["blosc-zstd"]),
    "zero-views": (lambda a, w: a + ["--views", "0"], ["--views"]),
    "bad-augment": (lambda a, w: a + ["--augment", "rotate(30)"], ["rotate(30)"]),
    "bad-augment-range": (lambda a, w: a + ["--augment", "rrc(0.5,2)"], ["rrc"]),
    "negative-chunk-rows": (lambda a, w: a + ["--chunk-rows", "-5"], []),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_clean_line(cli, dump_args, bad_weights, tmp_path, case):
    change, words = ERRORS[case]
    args = change([*map(str, dump_args), "--out", str(tmp_path / "c.zarr")], bad_weights)
    line = error_line(cli(*args))
    assert line.startswith("error: ")
    for word in words:
        assert word in line, (word, line)
    assert os.listdir(tmp_path) == [], "a refused dump leaves nothing behind"


def test_errors_in_a_real_process(dump_args, tmp_path):
    """The console script itself: exit 1, one `error:` line on stderr, no traceback, nothing on stdout."""
    args = _replace([*map(str, dump_args), "--out", str(tmp_path / "c.zarr")], "--dataset", "nosuchdata")
    r = subprocess.run([KDCACHE_BIN, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and "nosuchdata" in r.stderr


def test_concurrent_dump_is_refused(dump_args, tmp_path):
    from kdcache.storage.lock import WriteLock

    out = str(tmp_path / "busy.zarr")
    with WriteLock(out):
        r = subprocess.run([KDCACHE_BIN, *map(str, dump_args), "--out", out], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ")
        assert "another kdcache process is writing" in r.stderr and str(os.getpid()) in r.stderr
        assert "Traceback" not in r.stderr
        assert not os.path.exists(out)
    assert not os.path.exists(out + ".lock")


# --- info --------------------------------------------------------------------------------------

def _disk_bytes(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_info_text_json_markdown(cli, dump_cache, read_plain, suffix):
    path = dump_cache(suffix, "--topk", 3)
    _, attrs = read_plain(path)
    top1 = attrs["stats"]["teacher_top1"]

    r = cli("info", path)
    assert r.exit_code == 0, r.output
    assert "1437" in r.output and "top-3" in r.output and "teacher top-1" in r.output
    assert f"{100 * top1:.2f}%" in r.output and "complete" in r.output

    r = cli("info", path, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n"] == N and s["kind"] == "topk" and s["k"] == 3 and s["status"] == "complete"
    assert s["bytes_on_disk"] == _disk_bytes(path)
    assert s["bytes_per_sample"] == pytest.approx(s["bytes_on_disk"] / N)
    assert s["teacher_top1"] == top1 and s["mean_entropy"] == attrs["stats"]["mean_entropy"]
    assert 0 < s["topk_mass"] < 1
    # by hand: mean top-3 softmax mass of the teacher's full (float32) logits
    full, _ = read_plain(dump_cache(".zarr", "--dtype", "float32"))
    p = torch.from_numpy(full["values"][:, 0]).softmax(-1)
    assert s["topk_mass"] == pytest.approx(float(p.topk(3, -1).values.sum(-1).mean()), abs=1e-3)
    assert s["warnings"] == []

    r = cli("info", path, "--markdown")
    assert r.exit_code == 0, r.output
    assert "|---|---|" in r.output and "| Teacher |" in r.output and "top-1" in r.output.lower()


def test_info_full_cache(cli, dump_cache):
    r = cli("info", dump_cache(".zarr"), "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["kind"] == "full" and s["k"] is None and s["topk_mass"] == 1.0 and s["mean_entropy"] > 0
    assert "full logits" in cli("info", dump_cache(".zarr")).output


def test_info_warns_about_near_one_hot_teacher(cli, dump_cache, tmp_path):
    path = copy_cache(dump_cache(".zarr", "--topk", 3), tmp_path)
    g = zarr.open_group(path, mode="r")
    _set_attrs(path, stats=dict(g.attrs["kdcache"]["stats"]) | {"teacher_top1": 0.995})
    s = json.loads(cli("info", path, "--json").stdout)
    assert len(s["warnings"]) == 1 and "99.5%" in s["warnings"][0]
    assert "warning" in cli("info", path).output
    assert "Note:" in cli("info", path, "--markdown").output
    # the same score on a held-out split is no reason to warn
    _set_attrs(path, dataset=dict(g.attrs["kdcache"]["dataset"]) | {"split": "test"})
    assert json.loads(cli("info", path, "--json").stdout)["warnings"] == []


@pytest.mark.parametrize("name", ["missing.zarr", "missing.h5", "cache.txt"])
def test_info_bad_path(cli, tmp_path, name):
    line = error_line(cli("info", str(tmp_path / name)))
    assert line.startswith("error: ")
