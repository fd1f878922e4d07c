"""Shared fixtures for the cache tests: a small random teacher, the CLI in-process, memoised dumps.

kdcache is imported lazily inside fixtures only, so a module that uses none of them
(tests/test_conformance.py) never imports kdcache itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import clitools
import pytest
import sharefix

IMAGE_SIZE = 16
TEACHER = "mlp"
TEACHER_ARGS = {"hidden": [32]}  # recorded in the checkpoint (as kdtrain does), so `kdcache dump` rebuilds it
KDCACHE_BIN = str(Path(sys.executable).with_name("kdcache"))


def save_mlp_teacher(path, image_size: int = 8, hidden=(16,), seed: int = 0) -> str:
    """Save an untrained digits MLP checkpoint as kdtrain writes them (random weights give non-trivial logits)."""
    import torch

    from kdcache.models import build_model

    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=10, input_shape=(3, image_size, image_size), hidden=hidden)
    torch.save({"model": model.state_dict(), "arch": "mlp", "arch_args": {"hidden": hidden}}, path)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def _shard_index_in_tmp(tmp_path_factory):
    """Tar-shard indexes (kdcache.data.wds) go to a temporary folder, never the user's ~/.cache (subprocesses
    inherit it)."""
    os.environ["KDCACHE_INDEX_DIR"] = str(tmp_path_factory.mktemp("shard-index"))


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
    return clitools.kd


@pytest.fixture(scope="session")
def dump_args(teacher_weights) -> list[str]:
    """clitools.dump_args for teacher_weights (mlp, digits, 16 px) without --out: append --out and the rest."""
    return clitools.dump_args(teacher_weights, None, teacher=TEACHER, image_size=IMAGE_SIZE)


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


@pytest.fixture(scope="session")
def read_plain():
    """read(path) -> (arrays, attrs) using only zarr/h5py."""
    return clitools.read_plain


@pytest.fixture(scope="session")
def tree_hash():
    """hash(path) -> {relative file name: sha256} for a file or a directory tree."""
    return clitools.tree_hash


# --- the sharing tests (test_share.py, test_remote.py): an 8 px mlp teacher and its 128-row caches ---

@pytest.fixture(scope="module")
def share_dir(tmp_path_factory) -> Path:
    """The sharing tests' scratch folder (one per module)."""
    return tmp_path_factory.mktemp("share")


@pytest.fixture(scope="module")
def share_teacher(share_dir, save_teacher):
    """share_teacher(seed) -> checkpoint of a random-weights mlp (hidden=(16,)) for digits at 8 px."""
    made: dict[int, str] = {}

    def make(seed: int = 0) -> str:
        if seed not in made:
            made[seed] = save_teacher(share_dir / f"teacher{seed}.pt", sharefix.IMAGE_SIZE, seed=seed)
        return made[seed]

    return make


@pytest.fixture(scope="module")
def share_cache(share_dir, share_teacher):
    """share_cache(name, seed=0, *extra) -> a 128-row cache of digits by share_teacher(seed), dumped once per module
    (read-only)."""
    made: dict[tuple, str] = {}
    (share_dir / "caches").mkdir()

    def make(name: str, seed: int = 0, *extra) -> str:
        key = (name, seed, *map(str, extra))
        if key not in made:
            out = str(share_dir / "caches" / name)
            assert not os.path.exists(out), f"two different dumps named {name}"
            args = clitools.dump_args(share_teacher(seed), out, *extra, image_size=sharefix.IMAGE_SIZE,
                                      chunk_rows=sharefix.ROWS)
            clitools.ok(clitools.kd(*args))
            made[key] = out
        return made[key]

    return make
