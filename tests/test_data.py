"""Source datasets: digits, torchvision error paths, imagefolder, factories, fingerprints."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from kdcache.data.datasets import (
    DatasetInfo,
    SourceDataset,
    dataset_names,
    fingerprint,
    open_dataset,
)
from kdcache.data.render import Preprocess, render
from kdcache.data.views import identity_views
from kdcache.errors import KDCacheError


@pytest.fixture(scope="module")
def digits():
    return open_dataset("digits", "train"), open_dataset("digits", "test")


# --------------------------------------------------------------------------- digits


def _sk_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8), d.target.astype(np.int64)


def test_digits_split_sizes_disjoint_stratified(digits):
    from kdcache.data.datasets import _digits_split

    tr, te = digits
    assert len(tr) == 1437 and len(te) == 360
    images, y = _sk_digits()
    itr, ite = _digits_split(y, "train"), _digits_split(y, "test")
    assert len(itr) + len(ite) == 1797
    assert len(np.intersect1d(itr, ite)) == 0
    assert np.array_equal(np.union1d(itr, ite), np.arange(1797))
    # the datasets hold exactly those samples, in original order
    assert np.all(np.diff(itr) > 0) and np.all(np.diff(ite) > 0)
    assert np.array_equal(tr.labels, y[itr]) and np.array_equal(te.labels, y[ite])
    assert np.array_equal(tr.data, images[itr]) and np.array_equal(te.data, images[ite])
    # stratified: each class's test share is within one sample of 20%
    full = np.bincount(y, minlength=10)
    test_counts = np.bincount(te.labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * full) <= 1.0)
    assert np.array_equal(np.bincount(tr.labels, minlength=10) + test_counts, full)


def test_digits_items_and_info(digits):
    tr, te = digits
    assert tr.labels.dtype == np.int64 and tr.labels.shape == (1437,)
    assert isinstance(tr.info, DatasetInfo)
    assert tr.info.sample_shape == (1, 8, 8)
    assert tr.info.num_classes == 10
    assert tr.info.class_names == tuple(str(i) for i in range(10))
    assert tr.info.spec == "digits" and tr.info.split == "train" and te.info.split == "test"
    img, y, i = tr[5]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (1, 8, 8)
    assert y == int(tr.labels[5]) and i == 5
    allimgs = torch.stack([tr[k][0] for k in range(len(tr))])
    assert int(allimgs.max()) == 255 and int(allimgs.min()) == 0
    assert tr[-1][2] == len(tr) - 1
    with pytest.raises(IndexError):
        tr[len(tr)]
    assert isinstance(tr, torch.utils.data.Dataset) and isinstance(tr, SourceDataset)


def test_digits_values(digits):
    tr, _ = digits
    allowed = {int(round(v * 255 / 16)) for v in range(17)}
    assert set(np.unique(tr.data).tolist()) <= allowed
    assert np.array_equal(np.frombuffer(tr.raw_bytes(7), np.uint8), tr[7][0].numpy().reshape(-1))


def test_digits_loader_batches(digits):
    tr, _ = digits
    dl = torch.utils.data.DataLoader(tr, batch_size=256, shuffle=False)
    imgs, ys, idx = next(iter(dl))
    assert imgs.shape == (256, 1, 8, 8) and imgs.dtype == torch.uint8
    assert torch.equal(idx, torch.arange(256))
    assert torch.equal(ys, torch.from_numpy(tr.labels[:256]))


def test_bad_spec_and_split():
    with pytest.raises(KDCacheError, match="unknown dataset 'nope'.*digits.*cifar10.*imagefolder:PATH"):
        open_dataset("nope")
    with pytest.raises(KDCacheError, match="unknown split 'val'.*train, test"):
        open_dataset("digits", "val")
    assert dataset_names()[0] == "digits" and "cifar10" in dataset_names()


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(digits):
    tr, te = digits
    fp = fingerprint(tr)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint(open_dataset("digits", "train")) == fp
    assert fingerprint(te) != fp
    # one label changed
    ds = open_dataset("digits", "train")
    ds.labels[100] = (ds.labels[100] + 1) % 10
    assert fingerprint(ds) != fp
    # one raw byte changed in a probed sample (index 0 is always probed)
    ds = open_dataset("digits", "train")
    ds.data[0, 3, 3] ^= 1
    assert fingerprint(ds) != fp
    # the last sample is probed too
    ds = open_dataset("digits", "train")
    ds.data[-1, 0, 0] ^= 1
    assert fingerprint(ds) != fp


def test_fingerprint_independent_of_resolution(digits):
    tr, _ = digits
    fp = fingerprint(tr)
    # rendering at any resolution does not touch the dataset
    imgs = torch.stack([tr[i][0] for i in range(16)])
    for s in (8, 32, 64):
        render(imgs, torch.from_numpy(identity_views(16)[:, 0]), Preprocess(s))
    assert fingerprint(tr) == fp


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    "spec,name",
    [("cifar10", "CIFAR10"), ("CIFAR100", "CIFAR100"), ("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")],
)
def test_torchvision_missing_files(tmp_path, spec, name):
    with pytest.raises(KDCacheError) as e:
        open_dataset(spec, "train", data_root=str(tmp_path), download=False)
    msg = str(e.value)
    assert msg.startswith(f"{name} not found under {tmp_path}")
    assert "--data-root" in msg and "--download" in msg and "\n" not in msg


def test_mnist_from_local_files(tmp_path):
    """A fake MNIST in torchvision's on-disk format loads without network."""
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labs.tobytes())
        if prefix == "t10k":
            test_imgs, test_labs = imgs, labs
    ds = open_dataset("mnist", "test", data_root=str(tmp_path))
    assert len(ds) == 5 and ds.info.sample_shape == (1, 28, 28) and ds.info.num_classes == 10
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, test_labs.astype(np.int64))
    img, y, i = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28)
    assert np.array_equal(img[0].numpy(), test_imgs[3]) and y == int(test_labs[3])
    assert len(open_dataset("mnist", "train", data_root=str(tmp_path))) == 12


# --------------------------------------------------------------------------- imagefolder


def _write_pngs(root, classes=("cat", "dog"), n=3, size=(20, 12), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{k}.png")


def test_imagefolder_flat(tmp_path):
    _write_pngs(tmp_path / "imgs")
    spec = f"imagefolder:{tmp_path / 'imgs'}"
    ds = open_dataset(spec, "train")
    assert len(ds) == 6
    assert ds.info.class_names == ("cat", "dog") and ds.info.num_classes == 2
    assert ds.info.sample_shape == (3, 256, 256) and ds.info.spec == spec
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    img, y, i = ds[4]
    assert img.dtype == torch.uint8 and img.shape == (3, 256, 256) and y == 1 and i == 4
    assert ds.raw_bytes(0) == (tmp_path / "imgs" / "cat" / "0.png").read_bytes()
    # without split folders, both splits use the same folder
    assert len(open_dataset(spec, "test")) == 6


def test_imagefolder_resize_crop_matches_pil(tmp_path):
    from PIL import Image

    _write_pngs(tmp_path, classes=("a",), n=1, size=(20, 12))
    ds = open_dataset(f"imagefolder:{tmp_path}")
    img = Image.open(tmp_path / "a" / "0.png").convert("RGB").resize((427, 256), Image.BILINEAR)  # 20x12 -> 256 short
    want = np.asarray(img)[:, 86:342].transpose(2, 0, 1)
    assert np.array_equal(ds[0][0].numpy(), want)


def test_imagefolder_split_dirs_and_errors(tmp_path):
    _write_pngs(tmp_path / "train", n=2)
    _write_pngs(tmp_path / "val", classes=("cat", "dog"), n=1, seed=1)
    spec = f"imagefolder:{tmp_path}"
    assert len(open_dataset(spec, "train")) == 4
    assert len(open_dataset(spec, "test")) == 2  # val/ serves the test split
    with pytest.raises(KDCacheError, match="does not exist"):
        open_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDCacheError, match="no images found"):
        open_dataset(f"imagefolder:{tmp_path / 'empty'}")
    only_train = tmp_path / "ot"
    _write_pngs(only_train / "train", n=1)
    with pytest.raises(KDCacheError, match="no .* folder for the test split"):
        open_dataset(f"imagefolder:{only_train}", "test")


# --------------------------------------------------------------------------- factories


FACTORY_MODULE = textwrap.dedent(
    '''
    import numpy as np
    import torch

    class FloatHWC(torch.utils.data.Dataset):
        def __init__(self, split):
            rng = np.random.default_rng(0 if split == "train" else 1)
            self.x = rng.random((7, 5, 6, 3)).astype(np.float32)   # HWC floats in [0, 1)
            self.y = [int(v) for v in rng.integers(0, 4, 7)]
            self.y[2] = 3
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    class Unlabelled(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return torch.full((1, 4, 4), i, dtype=torch.uint8), -1

    class DeclaredImage(FloatHWC):
        kdcache_input = "image"

    class BadRange(DeclaredImage):
        def __getitem__(self, i):
            return self.x[i] * 255, self.y[i]

    def make(split, root=None):
        make.calls.append((split, root))
        return FloatHWC(split)
    make.calls = []

    def unlabelled(split, root=None):
        return Unlabelled()

    def declared_image(split, root=None):
        return DeclaredImage(split)

    def bad_range(split, root=None):
        return BadRange(split)

    def no_kwargs():
        return FloatHWC("train")

    def source(split, root=None):
        from kdcache.data.datasets import open_dataset
        return open_dataset("digits", split)
    '''
)


@pytest.fixture
def factory_mod(tmp_path, monkeypatch):
    name = f"kd_user_data_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_factory_floats_pass_through_exactly(factory_mod, tmp_path):
    """A plain Dataset of float arrays: samples reach the model exactly as given — no quantising, no axes moved."""
    import importlib

    ds = open_dataset(f"{factory_mod}:make", "test", data_root=str(tmp_path))
    mod = importlib.import_module(factory_mod)
    assert mod.make.calls == [("test", str(tmp_path))]
    inner = mod.FloatHWC("test")
    assert len(ds) == 7 and ds.info.kind == "tensor"
    assert ds.info.sample_shape == (5, 6, 3) and ds.info.dtype == "float32"
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == inner.y
    assert ds.info.num_classes == max(inner.y) + 1 == 4
    assert ds.info.class_names == ("0", "1", "2", "3")
    x, y, i = ds[2]
    assert x.dtype == torch.float32 and y == 3 and i == 2
    assert x.numpy().tobytes() == inner.x[2].tobytes()
    assert ds.raw_bytes(2) == inner.x[2].tobytes()
    fp = fingerprint(ds)
    assert fp == fingerprint(open_dataset(f"{factory_mod}:make", "test"))
    assert fp != fingerprint(open_dataset(f"{factory_mod}:make", "train"))


def test_factory_declared_float_images_are_not_quantised(factory_mod):
    ds = open_dataset(f"{factory_mod}:declared_image", "test")
    assert ds.info.kind == "image" and ds.info.sample_shape == (3, 5, 6) and ds.info.dtype == "float32"
    img, _, _ = ds[2]
    assert np.array_equal(img.numpy(), ds.inner.x[2].transpose(2, 0, 1))  # exact floats, CHW


def test_factory_unlabelled_and_passthrough(factory_mod):
    ds = open_dataset(f"{factory_mod}:unlabelled")
    assert ds.labels.tolist() == [-1, -1, -1, -1]
    assert ds.info.class_names == ("a", "b", "c") and ds.info.sample_shape == (1, 4, 4)
    assert ds[3][1] == -1 and int(ds[3][0].max()) == 3
    src = open_dataset(f"{factory_mod}:source", "test")
    assert len(src) == 360 and src.info.spec == "digits"  # a SourceDataset is used as is


def test_factory_errors(factory_mod):
    with pytest.raises(KDCacheError, match="cannot import module 'no_such_mod_xyz'.*PYTHONPATH"):
        open_dataset("no_such_mod_xyz:make")
    with pytest.raises(KDCacheError, match="has no callable 'nope'"):
        open_dataset(f"{factory_mod}:nope")
    with pytest.raises(KDCacheError, match="split= and root="):
        open_dataset(f"{factory_mod}:no_kwargs")
    with pytest.raises(KDCacheError, match=r"floats in \[0, 1\].*kdcache_input = 'tensor'"):
        open_dataset(f"{factory_mod}:bad_range")
