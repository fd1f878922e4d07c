"""Shared fixtures for the cache tests: a small random teacher, the CLI in-process, memoised dumps.

kdcache is imported lazily inside fixtures only, so a module that uses none of them
(tests/test_conformance.py) never imports kdcache itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

IMAGE_SIZE = 16
TEACHER = "mlp"
TEACHER_ARGS = {"hidden": [32]}  # recorded in the checkpoint (as kdtrain does), so `kdcache dump` rebuilds it
KDCACHE_BIN = str(Path(sys.executable).with_name("kdcache"))


def save_mlp_teacher(path, image_size: int = 8, hidden=(16,), seed: int = 0) -> str:
    """Save an untrained digits MLP checkpoint as kdtrain writes them (random weights give non-trivial logits)."""
    import torch

    from kdcache.models import build_model

    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=10, image_size=image_size, hidden=hidden)
    torch.save({"model": model.state_dict(), "arch": "mlp", "arch_args": {"hidden": hidden}}, path)
    return str(path)


@pytest.fixture(scope="session")
def save_teacher():
    """save(path, image_size=8, hidden=(16,), seed=0) -> path of a random-weights mlp checkpoint for digits."""
    return save_mlp_teacher


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> str:
    """A checkpoint of an untrained small MLP for digits at 16 px."""
    path = tmp_path_factory.mktemp("teacher") / f"{TEACHER}.pt"
    return save_mlp_teacher(path, IMAGE_SIZE, TEACHER_ARGS["hidden"])


@pytest.fixture(scope="session")
def cli():
    """run(*args) -> click Result of `kdcache ARGS` invoked in-process (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from kdcache.cli import kdcache_main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(kdcache_main, [str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def dump_args(teacher_weights) -> list[str]:
    """`kdcache dump` arguments shared by every test dump (append --out and the rest)."""
    return ["dump", "--teacher", TEACHER, "--weights", teacher_weights, "--dataset", "digits",
            "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--quiet"]


@pytest.fixture(scope="session")
def dump_cache(tmp_path_factory, cli, dump_args):
    """make(suffix, *extra_args) -> path of a cache dumped once per session; treat it as read-only."""
    root = tmp_path_factory.mktemp("caches")
    made: dict[tuple, str] = {}

    def make(suffix: str = ".zarr", *extra) -> str:
        key = (suffix, *map(str, extra))
        if key not in made:
            out = root / f"cache{len(made)}{suffix}"
            r = cli(*dump_args, "--out", out, *extra)
            assert r.exit_code == 0, r.output
            made[key] = str(out)
        return made[key]

    return make


def _read_plain(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every array and the `kdcache` attribute dict of a cache, read with plain zarr/h5py."""
    if path.rstrip("/").endswith(".zarr"):
        import zarr

        g = zarr.open_group(path, mode="r")
        return {name: np.asarray(a[...]) for name, a in g.arrays()}, dict(g.attrs["kdcache"])
    import h5py

    with h5py.File(path, "r") as f:
        return {name: f[name][...] for name in f}, json.loads(f.attrs["kdcache"])


@pytest.fixture(scope="session")
def read_plain():
    """read(path) -> (arrays, attrs) using only zarr/h5py."""
    return _read_plain


def _tree_hash(path: str) -> dict[str, str]:
    """sha256 of every file under path (or of path itself if it is a file), by relative name."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return {str(q.relative_to(p.parent)): hashlib.sha256(q.read_bytes()).hexdigest() for q in files}


@pytest.fixture(scope="session")
def tree_hash():
    """hash(path) -> {relative file name: sha256} for a file or a directory tree."""
    return _tree_hash

