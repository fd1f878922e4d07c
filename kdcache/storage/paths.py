"""Cache locations: local paths or fsspec URLs, the backend a suffix names, and the staging path of a dump."""

from __future__ import annotations

import os
import shutil

from kdcache.errors import KDCacheError

ZARR_SUFFIXES = (".zarr", ".zip")
HDF5_SUFFIXES = (".h5", ".hdf5")


def backend_for(path: str) -> str:
    """'zarr' or 'hdf5', chosen by the path's suffix."""
    p = path.rstrip("/").lower()
    if p.endswith(ZARR_SUFFIXES):
        return "zarr"
    if p.endswith(HDF5_SUFFIXES):
        return "hdf5"
    raise KDCacheError(
        f"cannot tell the cache format of {path!r} from its suffix: end it in .zarr (Zarr directory) "
        "or .h5/.hdf5 (HDF5 file), or .zip (a packed Zarr cache, read-only)"
    )


def is_packed(path: str) -> bool:
    """A .zip: a packed Zarr cache, read-only."""
    return path.rstrip("/").lower().endswith(".zip")


def is_url(path: str) -> bool:
    """An fsspec URL (s3://, gs://, https://, …) rather than a local path."""
    return "://" in path


def path_exists(path: str) -> bool:
    if not is_url(path):
        return os.path.lexists(path)
    import fsspec

    # Static hosts answer 404 for a directory URL: a Zarr group is there when its zarr.json is.
    zarr_dir = backend_for(path) == "zarr" and not is_packed(path)
    try:
        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p) or (zarr_dir and fs.exists(p.rstrip("/") + "/zarr.json"))
    except Exception as e:  # an unknown protocol, its package missing, no credentials, an unreachable service
        reason = (str(e).splitlines() or [""])[0]
        raise KDCacheError(f"cannot reach {path} ({type(e).__name__}: {reason}): check the URL, the network, and "
                           "the filesystem's package and credentials (e.g. s3fs and AWS_* for s3://)") from None


def ensure_parent(path: str) -> None:
    """Create the local directory an output goes into (URLs need none)."""
    if is_url(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise KDCacheError(f"cannot create the output folder {parent} ({e.strerror or e}): "
                           "choose an --out in a folder you can write") from None


def remove_tree(path: str) -> None:
    """Delete a local or remote cache directory or file (callers check first that it is a cache)."""
    if not is_url(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        return
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    fs.rm(p, recursive=True)


def same_path(a: str, b: str) -> bool:
    """True when two cache paths name the same place (local paths resolved; URLs compared as written)."""
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def staging_path(path: str) -> str:
    """Where a cache is built: the path itself for Zarr; a Zarr beside it for HDF5.

    An HDF5 file cannot survive a kill mid-write, so HDF5 caches are built as Zarr and
    converted only once complete: an HDF5 cache on disk is always a complete one.
    """
    return path if backend_for(path) == "zarr" else path.rstrip("/") + ".partial.zarr"
