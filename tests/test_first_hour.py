"""What a demanding user hits in the first hour: nothing of theirs is destroyed, no traceback on an ordinary
mistake, no silent wrong result, the card's commands chain, and logs read well when redirected."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from clitools import error_line, kd, kt, ok, tree_hash

TRAIN = ["--student", "mlp", "--student-arg", "hidden=(8,)", "--epochs", "1", "--device", "cpu", "--quiet",
         "--no-plots"]


@pytest.fixture(scope="module")
def cache(dump_cache) -> str:
    return dump_cache(".zarr", "--topk", 3, "--chunk-rows", 256)


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_attrs(path: str, **changes) -> None:
    g = zarr.open_group(path, mode="r+")
    a = dict(g.attrs["kdcache"])
    for k, v in changes.items():
        if v is None:
            a.pop(k, None)
        else:
            a[k] = v
    g.attrs["kdcache"] = a


# --- data loss ----------------------------------------------------------------------------------------------

def _user_folder(path: Path) -> dict:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return tree_hash(str(path))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_convert_never_replaces_what_is_not_a_cache(cache, tmp_path, overwrite):
    before = _user_folder(tmp_path / "out.zarr")
    line = error_line(kd("convert", cache, tmp_path / "out.zarr", *overwrite))
    assert "not a kdcache cache" in line and "refusing to touch it" in line
    assert tree_hash(str(tmp_path / "out.zarr")) == before
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:  # another program's HDF5 file
        f["x"] = np.arange(3)
    before = tree_hash(str(tmp_path / "other.h5"))
    error_line(kd("convert", cache, tmp_path / "other.h5", *overwrite))
    assert tree_hash(str(tmp_path / "other.h5")) == before


def test_pack_never_replaces_a_user_file_or_folder(cache, tmp_path):
    (tmp_path / "notes.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip of someone else's
    before = tree_hash(str(tmp_path / "notes.zip"))
    assert "not a kdcache cache" in error_line(kd("pack", cache, tmp_path / "notes.zip", "--overwrite"))
    assert tree_hash(str(tmp_path / "notes.zip")) == before
    (tmp_path / "dir.zip").mkdir()
    assert "dir.zip" in error_line(kd("pack", cache, tmp_path / "dir.zip", "--overwrite"))
    ok(kd("pack", cache, tmp_path / "mine.zip"))
    ok(kd("pack", cache, tmp_path / "mine.zip", "--overwrite"))  # its own packed cache: replaced when asked


# --- a damaged chunk while training ----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "flip-last-byte"])
def test_damaged_chunk_during_training_is_one_line(cache, tmp_path, damage):
    path = _copy(cache, tmp_path / "c.zarr")
    chunk = Path(path) / "values" / "c" / "2" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF]))
    for ram in ("0", "1GiB"):  # streamed and loaded whole
        line = error_line(kt("--cache", path, *TRAIN, "--cache-ram", ram, "--out", tmp_path / f"run{ram}"))
        assert "chunk 2 (rows 512-767, view 0)" in line and "kdcache verify" in line


# --- escape sequences in attributes -------------------------------------------------------------------------

def test_attribute_strings_cannot_drive_the_terminal(cache, tmp_path):
    path = _copy(cache, tmp_path / "c.zarr")
    _edit_attrs(path, version="\x1b]0;pwned\x07\x1b[2J9.0")
    for r in (kd("info", path), kd("verify", path), kt("--cache", path, *TRAIN, "--out", tmp_path / "r")):
        assert r.exit_code == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr
        assert "\\x1b]0;pwned" in r.stderr


# --- ordinary mistakes: one line, no traceback ----------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], "--lr must be a finite number greater than 0"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--warmup-epochs", "1e308"], "--warmup-epochs must be a finite number between 0 and"),
    (["--cache-ram", "1e400"], "--cache-ram takes a size"),
    (["--image-size", "100000"], "bad image size 100000"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["-T", "nan"], "-T/--temperature must be a finite number greater than 0"),
    (["-T", "inf"], "-T/--temperature must be a finite number"),
    (["--mixup", "nan"], "--mixup must be a finite number"),
    (["--clip", "nan"], "--clip must be a finite number"),
    (["--alpha", "nan"], "--alpha must be a finite number between 0 and 1"),
    (["--out", ""], "--out is empty"),
    (["--student-arg", "num_classes=3"], "num_classes is set by kdcache"),
    (["--student-arg", "image_size=8"], "does not take option image_size"),
    (["--device", "cuda:abc"], "unknown --device 'cuda:abc'"),
])
def test_bad_training_input_is_one_line(cache, tmp_path, args, words):
    out = ["--out", tmp_path / "run"] if "--out" not in args else []
    line = error_line(kt("--cache", cache, *TRAIN, *out, *args))
    assert words in line, line


def test_huge_epoch_count_is_refused(cache, tmp_path):
    r = kt("--cache", cache, *TRAIN, "--epochs", "1e20", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "Traceback" not in r.output and "'--epochs'" in r.stderr
    assert "between 1 and" in error_line(kt("--cache", cache, *TRAIN, "--epochs", 10**12, "--out", tmp_path / "r"))


def test_diverging_training_is_one_line_not_a_nan_model(cache, tmp_path):
    line = error_line(kt("--cache", cache, *TRAIN, "--lr", "1e30", "--clip", "0", "--out", tmp_path / "r"))
    assert "training loss became" in line and "lower --lr" in line


def test_run_dir_under_a_file_is_one_line(cache, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = error_line(kt("--cache", cache, *TRAIN, "--out", tmp_path / "afile" / "run"))
    assert "cannot write the run directory" in line


def test_resume_with_another_student_or_other_caches_is_refused(cache, dump_cache, tmp_path):
    run = tmp_path / "run"
    ok(kt("--cache", cache, *TRAIN, "--out", run))
    line = error_line(kt("--cache", cache, *TRAIN, "--student-arg", "hidden=(16,)", "--epochs", 2, "--out", run,
                         "--resume"))
    assert "cannot resume" in line and "student_args" in line and "(16,)" in line
    other = dump_cache(".zarr", "--topk", 4, "--chunk-rows", 256)
    line = error_line(kt("--cache", other, *TRAIN, "--epochs", 2, "--out", run, "--resume"))
    assert "cannot resume" in line and "caches" in line
    ok(kt("--cache", cache, *TRAIN, "--epochs", 2, "--out", run, "--resume"))


def test_factory_with_the_wrong_signature_is_one_line(tmp_path):
    import torch

    torch.save({}, tmp_path / "w.pt")
    line = error_line(kd("dump", "--teacher", "os:getcwd", "--weights", tmp_path / "w.pt", "--device", "cpu",
                         "--quiet", "--out", tmp_path / "c.zarr"))
    assert "cannot build 'os:getcwd'" in line and "num_classes=" in line


@pytest.mark.parametrize("key", ["teacher", "dataset", "num_classes", "kind", "n_views"])
def test_removed_attributes_are_one_line_everywhere(cache, tmp_path, key):
    path = _copy(cache, tmp_path / "c.zarr")
    _edit_attrs(path, **{key: None})
    for r in (kd("info", path), kt("--cache", path, *TRAIN, "--out", tmp_path / "r")):
        assert f"damaged attributes: missing {key}" in error_line(r)
    r = kd("verify", path)
    assert r.exit_code == 1 and f"attributes: missing {key}" in r.stderr


def test_resume_of_a_partial_dump_with_damaged_settings_is_one_line(dump_args, tmp_path):
    out = str(tmp_path / "p.zarr")
    ok(kd(*dump_args, "--out", out, "--chunk-rows", 256))
    g = zarr.open_group(out, mode="r+")
    g["done"][2] = 0
    _edit_attrs(out, status="partial", dump="garbage")
    assert "dump settings are missing or damaged" in error_line(kd(*dump_args, "--out", out, "--chunk-rows", 256,
                                                                   "--resume"))


# --- silent wrong results -------------------------------------------------------------------------------

def test_resume_with_another_compressor_is_refused(dump_args, tmp_path):
    out = str(tmp_path / "p.zarr")
    ok(kd(*dump_args, "--out", out, "--chunk-rows", 256))
    zarr.open_group(out, mode="r+")["done"][3] = 0
    _edit_attrs(out, status="partial")
    before = tree_hash(out)
    line = error_line(kd(*dump_args, "--out", out, "--chunk-rows", 256, "--resume", "--compressor", "gzip"))
    assert "compressed with blosc-zstd" in line and "--compressor blosc-zstd" in line
    assert tree_hash(out) == before
    ok(kd(*dump_args, "--out", out, "--chunk-rows", 256, "--resume"))  # no --compressor: keeps the stored one


def test_training_refuses_a_cleared_done_entry_or_edited_labels(cache, tmp_path):
    path = _copy(cache, tmp_path / "done.zarr")
    zarr.open_group(path, mode="r+")["done"][1] = 0
    assert "1 of its chunks are not marked written" in error_line(kt("--cache", path, *TRAIN, "--out", tmp_path / "a"))
    path = _copy(cache, tmp_path / "labels.zarr")
    g = zarr.open_group(path, mode="r+")
    labels = g["labels"][...]
    labels[5] = (labels[5] + 1) % 10
    g["labels"][...] = labels
    line = error_line(kt("--cache", path, *TRAIN, "--out", tmp_path / "b"))
    assert "labels stored in" in line and "labels_sha256" in line


def test_views_without_augment_are_refused(dump_args, tmp_path):
    line = error_line(kd(*dump_args, "--out", tmp_path / "v.zarr", "--views", 4))
    assert "--views 4 without --augment would store 4 identical copies" in line and "rrc(" in line
    assert not (tmp_path / "v.zarr").exists()


# --- smaller --------------------------------------------------------------------------------------------

def test_weights_that_are_not_a_state_dict(tmp_path, dump_args):
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": {1, 2}}, f)
    args = list(dump_args)
    args[args.index("--weights") + 1] = str(tmp_path / "plain.pkl")
    r = kd(*args, "--out", tmp_path / "c.zarr")
    line = error_line(r)
    assert "refusing to unpickle" in line and "weights_only" not in r.output
    args[args.index("--weights") + 1] = str(tmp_path)
    assert "is a folder" in error_line(kd(*args, "--out", tmp_path / "c.zarr"))


def test_published_weights_for_other_classes_say_what_to_do(tmp_path):
    line = error_line(kd("dump", "--teacher", "resnet18", "--weights", "DEFAULT", "--device", "cpu", "--quiet",
                         "--out", tmp_path / "c.zarr"))
    assert "have 1000 classes but the dataset has 10" in line and "kdtrain --student resnet18" in line
    assert "build it with" not in line


def test_verify_of_an_unfinished_hdf5_names_its_staging(dump_args, tmp_path):
    out = tmp_path / "h.h5"
    ok(kd(*dump_args, "--out", out, "--chunk-rows", 256))
    ok(kd("convert", out, tmp_path / "h.h5.partial.zarr"))
    out.unlink()
    r = kd("verify", out)
    assert "failed verification" in error_line(r, problem_lines=True)
    assert "not written yet" in r.stderr and "h.h5.partial.zarr" in r.stderr and "--resume" in r.stderr


def test_a_cache_url_that_cannot_be_reached_is_one_line(dump_args, tmp_path):
    """The README's `dump --out s3://bucket/x.zarr` offline (no credentials) was a botocore traceback. An fsspec
    URL whose filesystem cannot answer (here an unknown protocol; offline: no credentials, gcsfs missing) is one
    line, when read and when written."""
    url = "nosuch://bucket/x.zarr"
    for r in (kd("info", url), kd(*dump_args, "--out", url), kt("--cache", url, *TRAIN, "--out", tmp_path / "r")):
        line = error_line(r)
        assert f"cannot reach {url} (ValueError: Protocol not known: nosuch)" in line and "check the URL" in line
    url = "http://127.0.0.1:9/x.zarr"  # nothing listens there: fsspec's HTTP filesystem answers "not there"
    assert f"no cache at {url}: check the URL and that its host can be reached" in error_line(kd("info", url))


def test_kdtrain_takes_the_download_its_missing_dataset_error_names(tmp_path, monkeypatch):
    """The README's `kdtrain --student cifar_resnet18 --dataset cifar10 …` without the data said "pass --data-root
    DIR holding it, or --download", and kdtrain had no --download."""
    import torchvision.datasets as tvd

    calls = []

    def cifar10(root, train, download):
        calls.append(download)
        raise RuntimeError("offline" if download else "Dataset not found or corrupted.")

    monkeypatch.setattr(tvd, "CIFAR10", cifar10)
    args = [*TRAIN, "--dataset", "cifar10", "--data-root", tmp_path / "data", "--out", tmp_path / "r"]
    assert "or --download" in error_line(kt(*args))
    assert "CIFAR10 could not be downloaded" in error_line(kt(*args, "--download"))
    assert calls == [False, True]


def test_argument_errors_come_before_torch_is_imported():
    code = ("import sys\nfrom kdcache.cli import kdcache_main\n"
            "try:\n    kdcache_main(['dump', '--teacher', 'x', '--batch-size', '0'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "False"], (r.stdout, r.stderr)
    assert "--batch-size must be at least 1, got 0" in r.stderr


def test_log_csv_has_plain_line_endings(cache, tmp_path):
    ok(kt("--cache", cache, *TRAIN, "--out", tmp_path / "r"))
    assert b"\r" not in (tmp_path / "r" / "log.csv").read_bytes()


# --- the card's commands, verbatim -------------------------------------------------------------------------

def test_the_cards_commands_chain(tmp_path):
    """kdtrain --student resnet18 → kdcache dump --teacher resnet18 → kdtrain --cache logits.zarr --student vit_ti.

    The dump finds the teacher kdtrain wrote (runs/resnet18/best.pt) by its name; each command is run as a person
    would, as the console scripts, with only the epoch count added where the card leaves it open."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        assert "\r" not in r.stderr  # a redirected run logs plain lines, never progress-bar updates
        return r

    run("kdtrain", "--student", "resnet18", "--epochs", "1")
    r = run("kdcache", "dump", "--teacher", "resnet18")
    assert "weights runs/resnet18/best.pt (kdtrain's run of resnet18)" in r.stderr
    r = run("kdtrain", "--cache", "logits.zarr", "--student", "vit_ti", "--epochs", "1")
    assert "epoch 1/1: train loss" in r.stderr and "test top-1" in r.stderr
    attrs = json.loads((tmp_path / "logits.zarr" / "zarr.json").read_text())["attributes"]["kdcache"]
    assert attrs["teacher"]["weights"]["path"] == "runs/resnet18/best.pt"
    assert (tmp_path / "runs" / "vit_ti" / "metrics.json").exists()
