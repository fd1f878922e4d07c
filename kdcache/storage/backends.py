"""Backends: open and create the same logical layout as a Zarr v3 group or an HDF5 file."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.format.spec import ATTR_KEY, BOOKKEEPING, Layout
from kdcache.storage.paths import backend_for, is_packed, is_url, path_exists

ZARR_COMPRESSORS = ("blosc-zstd", "blosc-lz4", "zstd", "gzip", "none")
HDF5_COMPRESSORS = ("gzip", "lzf", "none")
H5_CHUNK_CACHE_BYTES = 64 << 20


def default_compressor(backend: str) -> str:
    return "blosc-zstd" if backend == "zarr" else "gzip"


def _zarr_codecs(name: str) -> Any:
    import zarr.codecs as zc

    match name:
        case "blosc-zstd":
            return zc.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
        case "blosc-lz4":
            return zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        case "zstd":
            return zc.ZstdCodec(level=3)
        case "gzip":
            return zc.GzipCodec(level=5)
        case "none":
            return None
    raise KDCacheError(f"unknown compressor {name!r} for Zarr: use one of {', '.join(ZARR_COMPRESSORS)}")


def _h5_filter(name: str) -> dict:
    match name:
        case "gzip":
            return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        case "lzf":
            return {"compression": "lzf", "shuffle": True}
        case "none":
            return {}
    raise KDCacheError(f"unknown compressor {name!r} for HDF5: use one of {', '.join(HDF5_COMPRESSORS)}")


def check_compressor(backend: str, name: str) -> None:
    """Fail early (before any teacher runs) on a compressor the backend does not offer."""
    _zarr_codecs(name) if backend == "zarr" else _h5_filter(name)


class Store:
    """A cache's arrays and its `kdcache` attribute dict, on either backend."""

    def __init__(self, path: str, backend: str, handle: Any, file: Any = None) -> None:
        self.path, self.backend, self._h, self._file = path, backend, handle, file
        self._arrays: dict[str, Any] = {}

    @property
    def attrs(self) -> dict:
        raw = self._h.attrs.get(ATTR_KEY)
        if isinstance(raw, (str, bytes)):
            try:
                raw = json.loads(raw)
            except ValueError:
                return {}  # not ours: callers then say "not a kdcache cache"
        return dict(raw) if isinstance(raw, dict) else {}

    def set_attrs(self, attrs: dict) -> None:
        if self.backend == "zarr":
            self._h.attrs[ATTR_KEY] = attrs
        else:
            self._h.attrs[ATTR_KEY] = json.dumps(attrs)

    def __getitem__(self, name: str) -> Any:
        """The array handle, looked up once (each lookup is a metadata request on remote stores)."""
        if name not in self._arrays:
            self._arrays[name] = self._h[name]
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        if name not in self._arrays:
            try:
                self[name]
            except KeyError:
                return False
        return True

    def close(self) -> None:
        if self.backend == "hdf5":
            self._h.close()
        if self._file is not None:
            self._file.close()


def _open_handle(path: str, backend: str, mode: str) -> Any:
    if backend == "zarr":
        import zarr

        if is_packed(path):
            if mode != "r":
                raise KDCacheError(f"{path} is a packed (read-only) cache: unpack it or dump to a .zarr path")
            if is_url(path):
                return zarr.open_group(f"zip::{path}", mode="r")
            from zarr.storage import ZipStore

            return zarr.open_group(ZipStore(path, mode="r"), mode="r")
        return zarr.open_group(path, mode=mode)
    import h5py

    if is_url(path):
        import fsspec

        if mode != "r":
            raise KDCacheError(f"cannot write HDF5 at a URL ({path}): write to a .zarr, or write HDF5 locally")
        f = fsspec.open(path, "rb").open()
        return h5py.File(f, "r", rdcc_nbytes=H5_CHUNK_CACHE_BYTES), f
    return h5py.File(path, mode, rdcc_nbytes=H5_CHUNK_CACHE_BYTES)


def open_store(path: str, mode: str = "r") -> Store:
    """Open an existing cache store ('r' or 'r+'), local or at an fsspec URL; a clear error when unreadable."""
    backend = backend_for(path)
    try:
        if not path_exists(path):
            if is_url(path):  # offline, an https:// host reads as "not there"
                raise KDCacheError(f"no cache at {path}: check the URL and that its host can be reached (create a "
                                   "cache with 'kdcache dump --out URL')")
            raise KDCacheError(f"no cache at {path}: check the path (create a cache with 'kdcache dump --out PATH')")
        handle = _open_handle(path, backend, mode)
        return Store(path, backend, *(handle if isinstance(handle, tuple) else (handle,)))
    except KDCacheError:
        raise
    except Exception as e:  # the libraries raise many types for a damaged or unreachable store
        raise KDCacheError(f"cannot open {path} as a {backend} cache ({type(e).__name__}: {e}); "
                           "run 'kdcache verify' on it or dump it again") from None


def read_attrs(path: str) -> dict:
    """The kdcache attributes at `path`, or {} when nothing readable as a cache is there."""
    try:
        store = open_store(path, "r")
    except KDCacheError:
        return {}
    try:
        return store.attrs
    except Exception:  # a foreign store's attributes may not even be JSON
        return {}
    finally:
        store.close()


def create_zarr(path: str, layout: Layout, compressor: str, attrs: dict) -> Store:
    """Create an empty Zarr v3 cache group with every array of `layout` (done all zero)."""
    import zarr

    codec = _zarr_codecs(compressor)
    g = zarr.open_group(path, mode="w")
    for name, (shape, dtype, chunks) in layout.arrays().items():
        small = name in BOOKKEEPING
        g.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                       compressors=None if small else codec)
    store = Store(path, "zarr", g)
    store.set_attrs(attrs)
    return store


def copy_arrays(src: Store, put: Any, layout: Layout) -> None:
    """Copy every array of `layout` from `src` into `put(name)` chunk by chunk (never a whole-array load)."""
    for name in layout.arrays():
        dst = put(name)
        if name in BOOKKEEPING:
            dst[...] = src[name][...]
            continue
        for c in range(layout.n_chunks):
            sl = layout.chunk_slice(c)
            dst[sl] = np.asarray(src[name][sl])


def write_hdf5(src: Store, dest: str, compressor: str, attrs: dict) -> None:
    """Copy every array of `src` into a new HDF5 file at `dest`, with `attrs` as its JSON attribute."""
    import h5py

    layout = Layout.from_attrs(attrs)
    opts = _h5_filter(compressor)
    with h5py.File(dest, "w") as f:
        for name, (shape, dtype, chunks) in layout.arrays().items():
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks,
                             **({} if name in BOOKKEEPING else opts))
        copy_arrays(src, f.__getitem__, layout)
        f.attrs[ATTR_KEY] = json.dumps(attrs)
