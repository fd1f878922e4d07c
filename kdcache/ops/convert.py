"""`kdcache convert` (Zarr ↔ HDF5 or another compressor, lossless, verified) and `kdcache pack` (one .zip file that
zarr opens directly, locally or over HTTP)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from contextlib import ExitStack

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.format.spec import BOOKKEEPING, STATUS_COMPLETE, Layout, check_version
from kdcache.io.output import Output, claim
from kdcache.storage.backends import Store, copy_arrays, open_store
from kdcache.storage.paths import backend_for, is_packed, is_url


def differences(a: Store, b: Store) -> list[str]:
    """Where two caches differ: attributes (but `compressor`) and every array, compared chunk by chunk."""
    out = []
    aa, ba = dict(a.attrs), dict(b.attrs)
    aa.pop("compressor", None), ba.pop("compressor", None)
    if aa != ba:
        keys = sorted(k for k in set(aa) | set(ba) if aa.get(k) != ba.get(k))
        out.append(f"attributes differ: {', '.join(keys)}")
    layout = Layout.from_attrs(a.attrs)
    for name in layout.arrays():
        if name not in b:
            out.append(f"{name}: missing")
            continue
        for c in range(layout.n_chunks if name not in BOOKKEEPING else 1):
            sl = layout.chunk_slice(c) if name not in BOOKKEEPING else slice(None)
            x, y = np.asarray(a[name][sl]), np.asarray(b[name][sl])
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                out.append(f"{name}: differs in chunk {c}")
                break
    return out


def _open_complete(path: str) -> Store:
    src = open_store(path, "r")
    check_version(src.attrs, path)
    if src.attrs.get("status") != STATUS_COMPLETE:
        src.close()
        raise KDCacheError(f"{path} is a partial cache: finish it with 'kdcache dump ... --resume' first")
    return src


def _verified(src: Store, dest: str) -> None:
    out = open_store(dest, "r")
    try:
        diffs = differences(src, out)
    finally:
        out.close()
    if diffs:
        raise KDCacheError(f"conversion to {dest} is not lossless ({'; '.join(diffs)}); please report this bug")


def convert(src_path: str, dest: str, compressor: str | None = None, overwrite: bool = False) -> None:
    """Copy a complete cache into another backend (or compressor), then check every array came out equal."""
    if is_packed(dest):
        raise KDCacheError("to make a .zip, use 'kdcache pack'")
    if is_url(dest):
        raise KDCacheError(f"convert writes local files ({dest} is a URL): convert locally, then upload, "
                           "or dump straight to a .zarr URL")
    output = Output(dest, "convert", [src_path], compressor)
    src = _open_complete(src_path)
    try:
        layout = Layout.from_attrs(src.attrs)
        with ExitStack() as stack:
            output.prepare(layout, src.attrs, stack, overwrite)
            store = output.open()
            copy_arrays(src, store.__getitem__, layout)
            output.finalize(store, carry={k: src.attrs.get(k) for k in ("stats", "version")})
            store.close()
        output.cleanup()
        _verified(src, dest)
    finally:
        src.close()


def pack(src_path: str, dest: str, overwrite: bool = False) -> None:
    """One uncompressed zip of a complete Zarr cache (chunks are compressed already); zarr reads it in place."""
    if not is_packed(dest):
        raise KDCacheError(f"pack writes a .zip file: name the output like {dest}.zip")
    if is_url(dest):
        raise KDCacheError(f"pack writes a local file ({dest} is a URL): pack locally, then upload it")
    with ExitStack() as stack:
        claim(dest, overwrite, stack)
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dest))))
        root = src_path
        if backend_for(src_path) != "zarr" or is_packed(src_path) or is_url(src_path):
            root = os.path.join(tmpdir, "cache.zarr")
            convert(src_path, root)
        _open_complete(root).close()
        tmp = os.path.join(tmpdir, "pack.zip")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for d, _, files in os.walk(root):
                for f in sorted(files):
                    full = os.path.join(d, f)
                    z.write(full, os.path.relpath(full, root))
        src = open_store(src_path, "r")
        try:
            os.replace(tmp, dest)
            _verified(src, dest)
        finally:
            src.close()
