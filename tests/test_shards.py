"""Sharded inputs: WebDataset tar shards (wds:PATTERN) and Hugging Face datasets saved to disk (hfds:DIR).

Tiny shards and datasets are written in tmp_path; every decode is compared with imagefolder's decode of the same
image files, so all three image sources give the same base images.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from clitools import kd, kt, ok

from kdcache.data import wds
from kdcache.data.datasets import fingerprint, is_factory, open_dataset
from kdcache.errors import KDCacheError

CLASSES = ("cat", "dog", "eel")


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    """An image of a random size around 256 px with a smooth pattern (so JPEG decoding is representative)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(200, 320)), int(rng.integers(200, 320))
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * (seed + 1)) % 256, (y * 3) % 256, ((x + y) * 7 + seed * 40) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, split: str, samples: list[tuple[int, int]], per_shard: int = 3) -> list[str]:
    """Shards folder/SPLIT-00000k.tar of (seed, label) samples; a png every 4th, json labels every 5th, an
    unlabelled one where the label is -1; also the same images as an image folder (folder/files/SPLIT/k.ext)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(0, len(samples), per_shard):
        path = os.path.join(folder, f"{split}-{k // per_shard:06d}.tar")
        with tarfile.open(path, "w") as tar:
            for j, (seed, label) in enumerate(samples[k:k + per_shard], start=k):
                ext = "png" if j % 4 == 3 else "jpg"
                data = _image(seed, "PNG" if ext == "png" else "JPEG")
                key = f"s{j:05d}"
                _add(tar, f"{key}.{ext}", data)
                if label >= 0:
                    if j % 5 == 4:
                        _add(tar, f"{key}.json", f'{{"label": {label}, "x": 1}}'.encode())
                    else:
                        _add(tar, f"{key}.cls", f"{label}\n".encode())
                files = os.path.join(folder, "files", split)
                os.makedirs(files, exist_ok=True)
                with open(os.path.join(files, f"{j:05d}.{ext}"), "wb") as f:
                    f.write(data)
        paths.append(path)
    return paths


TRAIN = [(i, i % 3) for i in range(8)]
TEST = [(100 + i, (i + 1) % 3) for i in range(4)]


@pytest.fixture()
def wds_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "index"))
    d = tmp_path / "shards"
    write_shards(d, "train", TRAIN)
    write_shards(d, "test", TEST)
    (d / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return d


def _folder_images(folder, split: str) -> list[torch.Tensor]:
    """imagefolder's decode of the same files (one class folder holding them all, in name order)."""
    from kdcache.data.sources import DatasetInfo, ImageFolderDataset

    files = sorted(os.listdir(os.path.join(folder, "files", split)))
    info = DatasetInfo("x", split, 1, ("a",), (3, 256, 256))
    ds = ImageFolderDataset(info, [(os.path.join(folder, "files", split, f), 0) for f in files], 256)
    return [ds[i][0] for i in range(len(ds))]


def test_wds_samples_labels_order_and_decode(wds_dir):
    ds = open_dataset(f"wds:{wds_dir}/train-{{000000..000002}}.tar", "train")
    assert len(ds) == len(TRAIN) and ds.info.class_names == CLASSES and ds.info.sample_shape == (3, 256, 256)
    assert ds.labels.tolist() == [y for _, y in TRAIN]
    want = _folder_images(wds_dir, "train")
    for i in range(len(ds)):
        x, y, idx = ds[i]
        assert idx == i and y == TRAIN[i][1] and x.dtype == torch.uint8
        assert torch.equal(x, want[i])  # exactly imagefolder's decode


def test_wds_split_placeholder_globs_and_val_fallback(wds_dir, tmp_path):
    spec = f"wds:{wds_dir}/{{split}}-*.tar"
    train, test = open_dataset(spec, "train"), open_dataset(spec, "test")
    assert (len(train), len(test)) == (len(TRAIN), len(TEST))
    assert test.labels.tolist() == [y for _, y in TEST]
    assert train.info.spec == spec and test.info.split == "test"
    val = tmp_path / "valonly"
    write_shards(val, "train", TRAIN[:3])
    write_shards(val, "val", TEST[:2])
    assert len(open_dataset(f"wds:{val}/{{split}}-{{000000..000000}}.tar", "test")) == 2
    same = open_dataset(f"wds:{wds_dir}/train-*.tar", "test")  # no {split}: both splits read the same shards
    assert len(same) == len(TRAIN)


def test_wds_labels_json_unlabelled_and_default_class_names(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "index"))
    samples = [(0, 1), (1, -1), (2, 4), (3, 0), (4, 2)]
    write_shards(tmp_path, "train", samples, per_shard=5)
    with tarfile.open(tmp_path / "train-000000.tar", "a") as tar:  # a sample with no image is skipped
        _add(tar, "zz.cls", b"1")
    ds = open_dataset(f"wds:{tmp_path}/train-000000.tar")
    assert ds.labels.tolist() == [1, -1, 4, 0, 2]
    assert ds.info.class_names == ("0", "1", "2", "3", "4")


def test_expand_braces():
    assert wds.expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert wds.expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert wds.expand_braces("x{split}y") == ["x{split}y"]
    assert wds.expand_braces("plain.tar") == ["plain.tar"]


def test_wds_index_is_cached_and_invalidated(wds_dir, monkeypatch):
    spec = f"wds:{wds_dir}/train-*.tar"
    first = open_dataset(spec)
    fp = fingerprint(first)

    def no_scan(*a, **k):
        raise AssertionError("re-scanned a shard whose index is cached")

    real = wds._scan
    monkeypatch.setattr(wds, "_scan", no_scan)
    again = open_dataset(spec)
    assert fingerprint(again) == fp and np.array_equal(again.offsets, first.offsets)
    monkeypatch.setattr(wds, "_scan", real)
    write_shards(wds_dir, "train", [(50 + s, y) for s, y in TRAIN])  # rewritten shards: new bytes, new index
    os.utime(wds_dir / "train-000000.tar", ns=(1, 1))
    changed = open_dataset(spec)
    assert fingerprint(changed) != fp


def test_wds_pickles_and_loads_in_workers(wds_dir):
    ds = open_dataset(f"wds:{wds_dir}/train-*.tar")
    ds.raw_bytes(0)  # a handle opened before the workers fork
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    got = torch.cat([x for x, _, _ in loader])
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(len(ds))]))


def test_wds_fsspec_url_matches_local(wds_dir):
    import fsspec

    mem = fsspec.filesystem("memory")
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "classes.txt"):
        mem.pipe(f"/kdshards/{name}", (wds_dir / name).read_bytes())
    remote = open_dataset("wds:memory://kdshards/train-{000000..000002}.tar")
    local = open_dataset(f"wds:{wds_dir}/train-{{000000..000002}}.tar")
    assert remote.info.class_names == CLASSES and fingerprint(remote) == fingerprint(local)
    assert all(torch.equal(remote[i][0], local[i][0]) for i in range(len(local)))
    assert len(open_dataset("wds:memory://kdshards/train-*.tar")) == len(TRAIN)
    as_url = open_dataset(f"wds:file://{wds_dir}/train-*.tar")  # a URL, read by ranged requests like s3:// or gs://
    assert fingerprint(as_url) == fingerprint(local) and torch.equal(as_url[4][0], local[4][0])


def test_wds_errors(wds_dir, tmp_path):
    with pytest.raises(KDCacheError, match="no shards match"):
        open_dataset(f"wds:{tmp_path}/nothing-*.tar")
    with pytest.raises(KDCacheError, match="needs a shard pattern"):
        open_dataset("wds:")
    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        _add(tar, "a.jpg", _image(0))
    with pytest.raises(KDCacheError, match="not an uncompressed tar"):
        open_dataset(f"wds:{gz}")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        _add(tar, "a.cls", b"1")
    with pytest.raises(KDCacheError, match="hold no images"):
        open_dataset(f"wds:{empty}")
    bad = tmp_path / "bad"
    write_shards(bad, "train", [(0, 5)])
    (bad / "classes.txt").write_text("a\nb\n")
    with pytest.raises(KDCacheError, match="label 5 but classes.txt names 2 classes"):
        open_dataset(f"wds:{bad}/train-000000.tar")
    assert not is_factory("wds:shards") and not is_factory("hfds:folder")


def test_dump_and_train_from_wds(wds_dir, tmp_path, monkeypatch):
    """kdcache dump over shards, then kdtrain reopening the cache's wds: spec (train and test splits)."""
    from kdcache.models import build_model

    torch.manual_seed(0)
    w = tmp_path / "t.pt"
    torch.save(build_model("mlp", len(CLASSES), (3, 8, 8), hidden=(16,)).state_dict(), w)
    monkeypatch.chdir(tmp_path)
    spec = f"wds:{wds_dir}/{{split}}-*.tar"
    ok(kd("dump", "--teacher", "mlp", "--teacher-arg", "hidden=(16,)", "--weights", w, "--dataset", spec,
          "--image-size", 8, "--device", "cpu", "--quiet", "--out", tmp_path / "w.zarr", "--num-workers", 2,
          "--batch-size", 3))
    from kdcache.io import open_cache

    with open_cache(str(tmp_path / "w.zarr")) as c:
        assert c.attrs["dataset"]["spec"] == spec and c.attrs["dataset"]["n"] == len(TRAIN)
    ok(kt("--cache", tmp_path / "w.zarr", "--student", "mlp", "--epochs", 1, "--device", "cpu", "--quiet",
          "--no-plots", "--out", tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.json").exists()


# --------------------------------------------------------------------------- hfds


def _hf(folder, split_samples: dict[str, list[tuple[int, int]]], as_dict: bool = True, image_col: str = "image",
        label_col: str = "label", class_label: bool = True):
    datasets = pytest.importorskip("datasets")
    out = {}
    for split, samples in split_samples.items():
        features = datasets.Features({image_col: datasets.Image(),
                                      label_col: datasets.ClassLabel(names=list(CLASSES)) if class_label
                                      else datasets.Value("int64")})
        rows = {image_col: [{"bytes": _image(s, "PNG" if j % 4 == 3 else "JPEG"), "path": None}
                            for j, (s, _) in enumerate(samples)],
                label_col: [y for _, y in samples]}
        out[split] = datasets.Dataset.from_dict(rows, features=features)
    if as_dict:
        datasets.DatasetDict(out).save_to_disk(str(folder))
    else:
        for split, ds in out.items():
            ds.save_to_disk(str(folder / split) if len(out) > 1 else str(folder))
    return folder


def test_hfds_dict_matches_wds(wds_dir, tmp_path):
    d = _hf(tmp_path / "hf", {"train": TRAIN, "validation": TEST})
    train, test = open_dataset(f"hfds:{d}", "train"), open_dataset(f"hfds:{d}", "test")
    assert (len(train), len(test)) == (len(TRAIN), len(TEST)) and train.info.class_names == CLASSES
    assert train.labels.tolist() == [y for _, y in TRAIN] and test.labels.tolist() == [y for _, y in TEST]
    w = open_dataset(f"wds:{wds_dir}/{{split}}-*.tar", "train")
    for i in range(len(train)):
        assert torch.equal(train[i][0], w[i][0])
    assert fingerprint(train) == fingerprint(open_dataset(f"hfds:{d}", "train"))
    clone = pickle.loads(pickle.dumps(train))
    assert clone._table is None and torch.equal(clone[2][0], train[2][0])
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([x for x, _, _ in loader]), torch.stack([train[i][0] for i in range(len(train))]))


def test_hfds_split_folders_single_dataset_and_columns(tmp_path):
    d = _hf(tmp_path / "hf", {"train": TRAIN, "test": TEST}, as_dict=False)
    assert len(open_dataset(f"hfds:{d}", "test")) == len(TEST)
    one = _hf(tmp_path / "one", {"train": TRAIN}, as_dict=False, image_col="png", label_col="fine",
              class_label=False)
    with pytest.raises(KDCacheError, match="no label column found"):
        open_dataset(f"hfds:{one}")
    ds = open_dataset(f"hfds:{one}?label=fine", "test")  # one saved dataset serves both splits
    assert len(ds) == len(TRAIN) and ds.info.class_names == ("0", "1", "2")
    with pytest.raises(KDCacheError, match="no column 'nope' for the image"):
        open_dataset(f"hfds:{one}?image=nope&label=fine")
    with pytest.raises(KDCacheError, match="unknown option colour"):
        open_dataset(f"hfds:{one}?colour=red")
    with pytest.raises(KDCacheError, match="does not exist"):
        open_dataset(f"hfds:{tmp_path / 'missing'}")
    with pytest.raises(KDCacheError, match="holds no dataset saved by save_to_disk"):
        open_dataset(f"hfds:{tmp_path}")
    d2 = _hf(tmp_path / "nodict", {"train": TRAIN, "extra": TEST})
    with pytest.raises(KDCacheError, match="no test split"):
        open_dataset(f"hfds:{d2}", "test")
