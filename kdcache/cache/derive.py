"""Write a cache made from other caches (merge, join): checked target, lock, staging, finalisation.

The output is built like a dump's: a locked staging Zarr with status `partial`, filled chunk by chunk
through a ChunkWriter, and marked complete (or converted to HDF5) only when every chunk is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from kdcache.cache import finalize
from kdcache.cache.format import FORMAT_NAME, STATUS_PARTIAL, Layout
from kdcache.cache.lock import WriteLock
from kdcache.cache.store import (
    backend_for,
    check_compressor,
    create_zarr,
    default_compressor,
    ensure_parent,
    is_url,
    path_exists,
    read_attrs,
    remove_tree,
    same_path,
    staging_path,
)
from kdcache.cache.writer import ChunkWriter
from kdcache.errors import KDCacheError


def refuse_foreign(path: str) -> None:
    """Refuse to touch what is at `path` unless it is a kdcache cache (never deleted, even with --overwrite)."""
    if read_attrs(path).get("format") != FORMAT_NAME:
        raise KDCacheError(f"{path} exists and is not a kdcache cache: refusing to touch it; choose another --out")


def check_target(out: str, inputs: list[str], verb: str) -> None:
    """Refuse an output that cannot be written, or that is one of the inputs (it would be destroyed)."""
    backend = backend_for(out)
    if out.lower().endswith(".zip"):
        raise KDCacheError(f"cannot {verb} into a .zip ({out}): {verb} to a .zarr, then 'kdcache pack' it")
    if is_url(out) and backend != "zarr":
        raise KDCacheError(f"cannot write HDF5 at a URL ({out}): {verb} to a .zarr, or write HDF5 locally")
    for p in inputs:
        if same_path(out, p):
            raise KDCacheError(f"--out {out} is one of the caches being read: write the result to another path")


@contextmanager
def derived_cache(out: str, layout: Layout, attrs: dict, overwrite: bool,
                  compressor: str | None = None) -> Iterator[ChunkWriter]:
    """A writer for a new cache at `out` (call check_target first); finalised when the block ends cleanly.

    `compressor` is used when the output's backend offers it, else the backend's default.

    An existing output is replaced only with `overwrite`, and never when it is not a kdcache cache.
    If the block fails, what was written stays a `partial` staging store, never a complete-looking cache.
    """
    backend = backend_for(out)
    stage = staging_path(out)
    try:
        check_compressor(backend, compressor or "")
    except KDCacheError:
        compressor = default_compressor(backend)
    ensure_parent(out)
    with ExitStack() as stack:
        if not is_url(out):
            stack.enter_context(WriteLock(out))
        for p in dict.fromkeys((out, stage)):
            if not path_exists(p):
                continue
            if not overwrite:
                raise KDCacheError(f"{p} already exists: pass --overwrite to replace it, or choose another --out")
            refuse_foreign(p)
            remove_tree(p)
        attrs = attrs | {"status": STATUS_PARTIAL, "compressor": compressor}
        store = create_zarr(stage, layout, compressor if backend == "zarr" else "none", attrs)
        writer = ChunkWriter(store, layout)
        try:
            yield writer
        finally:
            writer.close()
        finalize.finalize(store, out, compressor)
    if stage != out:
        remove_tree(stage)
