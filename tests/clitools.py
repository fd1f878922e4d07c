"""Test helpers: build `kdcache dump` arguments, run the CLI in-process and hold its results to the project's
promises; read caches plainly.

`dump_args`, `read_plain` and `tree_hash` use only the standard library, numpy, zarr and h5py; kdcache itself
is imported only when a CLI call runs, so tests/test_conformance.py can share this module without importing
kdcache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


def dump_args(weights, out=None, *extra, teacher: str = "mlp", image_size: int | None = 8, dataset: str = "digits",
              chunk_rows: int | None = None) -> list[str]:
    """Arguments of `kdcache dump` (the subcommand name first), every one a str.

    TEACHER with WEIGHTS over DATASET at IMAGE_SIZE px (None: no --image-size, as tensor data needs), on the
    CPU, with --quiet; `--chunk-rows` when CHUNK_ROWS is given, `--out OUT` unless OUT is None (then the dump
    writes its default, logits.zarr in the working folder), then EXTRA as given.
    """
    args = ["dump", "--teacher", teacher, "--weights", weights, "--dataset", dataset,
            *(["--image-size", image_size] if image_size is not None else []), "--device", "cpu", "--quiet"]
    if chunk_rows is not None:
        args += ["--chunk-rows", chunk_rows]
    if out is not None:
        args += ["--out", out]
    return [str(a) for a in (*args, *extra)]


def invoke(main, args: list) -> object:
    """click Result of `main ARGS` invoked in-process (stdout and stderr kept apart; args str()-ed)."""
    from click.testing import CliRunner

    return CliRunner().invoke(main, [str(a) for a in args])


def kd(*args):
    """`kdcache ARGS` in-process."""
    from kdcache.cli import kdcache_main

    return invoke(kdcache_main, list(args))


def kt(*args):
    """`kdtrain ARGS` in-process."""
    from kdcache.cli import kdtrain_main

    return invoke(kdtrain_main, list(args))


def ok(r) -> str:
    """stdout of a CLI call that must have succeeded."""
    assert r.exit_code == 0, (r.exit_code, r.output, repr(r.exception))
    return r.stdout


def error_line(r, code: int = 1, problem_lines: bool = False) -> str:
    """The one line a failed CLI call prints: exit `code`, no traceback, exactly one `error: …` line on stderr.

    With `problem_lines` (kdcache verify), `PATH: problem` lines may come before that line.
    """
    assert r.exit_code == code, (r.exit_code, r.output, repr(r.exception))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = r.stderr.splitlines()
    if problem_lines:
        assert lines and all(not ln.startswith("error: ") for ln in lines[:-1]), r.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def read_plain(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every array and the `kdcache` attribute dict of a .zarr, .zip or .h5 cache, with plain zarr/h5py."""
    path = str(path)
    if path.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: f[k][...] for k in f}, json.loads(f.attrs["kdcache"])
    import zarr

    store = zarr.storage.ZipStore(path, mode="r") if path.endswith(".zip") else path
    g = zarr.open_group(store, mode="r")
    return {k: np.asarray(a[...]) for k, a in g.arrays()}, dict(g.attrs["kdcache"])


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same array names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        assert got[name].tobytes() == a.tobytes(), f"{name} differs"


def tree_hash(path: str) -> dict[str, str]:
    """sha256 of every file under path (or of path itself if it is a file), by name relative to its parent."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return {str(q.relative_to(p.parent)): hashlib.sha256(q.read_bytes()).hexdigest() for q in files}


def copy_cache(src: str, dst_dir: Path) -> str:
    """Copy a cache (zarr directory or HDF5 file) into `dst_dir` under its own name; returns the copy's path."""
    dst = str(Path(dst_dir) / Path(src).name)
    (shutil.copytree if src.endswith(".zarr") else shutil.copyfile)(src, dst)
    return dst


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place (silent damage, as a bad disk does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def zarr_chunk_file(path: str, name: str = "values", c: int = 5) -> str:
    """The file of chunk `c` (view 0) of per-view array `name` in a zarr v3 cache (docs/FORMAT.md)."""
    return os.path.join(path, name, "c", str(c), *(["0", "0"] if name in ("values", "indices") else
                                                   ["0"] if name == "tail" else []))
