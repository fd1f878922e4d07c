"""`kdcache convert` (Zarr ↔ HDF5, lossless, verified) and `kdcache pack` (one .zip file zarr opens directly)."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile

import numpy as np

from kdcache.cache.format import STATUS_COMPLETE, Layout, check_version
from kdcache.cache.store import (
    Store,
    backend_for,
    copy_arrays,
    create_zarr,
    default_compressor,
    ensure_parent,
    is_url,
    open_store,
    path_exists,
    write_hdf5,
)
from kdcache.errors import KDCacheError


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
        for c in range(layout.n_chunks if name not in ("done", "checksum") else 1):
            sl = layout.chunk_slice(c) if name not in ("done", "checksum") else slice(None)
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


def _refuse_existing(dest: str, overwrite: bool) -> None:
    if path_exists(dest) and not overwrite:
        raise KDCacheError(f"{dest} already exists: pass --overwrite to replace it, or choose another output")


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
    backend = backend_for(dest)
    if dest.lower().endswith(".zip"):
        raise KDCacheError("to make a .zip, use 'kdcache pack'")
    if is_url(dest):
        raise KDCacheError(f"convert writes local files ({dest} is a URL): convert locally, then upload, "
                           "or dump straight to a .zarr URL")
    ensure_parent(dest)
    _refuse_existing(dest, overwrite)
    src = _open_complete(src_path)
    try:
        comp = compressor or default_compressor(backend)
        attrs = src.attrs | {"compressor": comp}
        tmp = dest.rstrip("/") + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
        if backend == "hdf5":
            write_hdf5(src, tmp, comp, attrs)
        else:
            out = create_zarr(tmp, Layout.from_attrs(attrs), comp, attrs)
            copy_arrays(src, out.__getitem__, Layout.from_attrs(attrs))
        if os.path.exists(dest):
            shutil.rmtree(dest) if os.path.isdir(dest) else os.remove(dest)
        os.replace(tmp, dest)
        _verified(src, dest)
    finally:
        src.close()


def pack(src_path: str, dest: str, overwrite: bool = False) -> None:
    """One uncompressed zip of a complete Zarr cache (chunks are compressed already); zarr reads it in place."""
    if not dest.lower().endswith(".zip"):
        raise KDCacheError(f"pack writes a .zip file: name the output like {dest}.zip")
    if is_url(dest):
        raise KDCacheError(f"pack writes a local file ({dest} is a URL): pack locally, then upload it")
    _refuse_existing(dest, overwrite)
    ensure_parent(dest)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dest))) as tmpdir:
        root = src_path
        if backend_for(src_path) != "zarr" or src_path.lower().endswith(".zip") or is_url(src_path):
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
