"""One output lifecycle for every command that writes a cache (dump, merge, join, convert).

Check the target → lock it → create (or, for a dump, resume) a staging Zarr marked `partial` → fill it chunk by
chunk → finalise (stats, `status: complete`; HDF5 converted into place atomically) → remove the staging store.
An existing target is replaced only when asked (`--overwrite`) and never when it is not a kdcache cache; a failure
at any step leaves at most a partial staging store, never a complete-looking cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.format.spec import FORMAT_NAME, STATUS_COMPLETE, STATUS_PARTIAL, Layout, version_for
from kdcache.format.topk import chunk_stats, q8_decode
from kdcache.io.writer import ChunkWriter
from kdcache.storage.backends import (
    Store,
    check_compressor,
    create_zarr,
    default_compressor,
    open_store,
    read_attrs,
    write_hdf5,
)
from kdcache.storage.lock import WriteLock
from kdcache.storage.paths import (
    backend_for,
    ensure_parent,
    is_packed,
    is_url,
    path_exists,
    remove_tree,
    same_path,
    staging_path,
)


def refuse_foreign(path: str) -> None:
    """Refuse to touch what is at `path` unless it is a kdcache cache (never deleted, even with --overwrite)."""
    if read_attrs(path).get("format") != FORMAT_NAME:
        raise KDCacheError(f"{path} exists and is not a kdcache cache: refusing to touch it; choose another output")


def check_target(out: str, inputs: Sequence[str], verb: str) -> None:
    """Refuse an output that cannot be written, or that is one of the inputs (it would be destroyed)."""
    backend = backend_for(out)
    if is_packed(out):
        raise KDCacheError(f"cannot {verb} into a .zip ({out}): {verb} to a .zarr, then 'kdcache pack' it")
    if is_url(out) and backend != "zarr":
        raise KDCacheError(f"cannot write HDF5 at a URL ({out}): write to a .zarr, or write HDF5 locally")
    for p in inputs:
        if same_path(out, p):
            raise KDCacheError(f"the output {out} is one of the caches being read: write the result to another path")


def claim(path: str, overwrite: bool, stack: ExitStack) -> None:
    """Lock `path` (local outputs) and check that it may be replaced: nothing there, or a kdcache cache and
    `overwrite`. The caller then writes beside it and renames into place."""
    ensure_parent(path)
    if not is_url(path):
        stack.enter_context(WriteLock(path))
    if path_exists(path):
        if not overwrite:
            raise KDCacheError(f"{path} already exists: pass --overwrite to replace it, or choose another output")
        refuse_foreign(path)


def cache_stats(store: Store, layout: Layout) -> dict:
    """Teacher top-1 against the stored labels, mean entropy and mean top-k mass, read chunk by chunk; a cache of
    sampled soft labels only has top-1 alone (its most drawn id)."""
    if not layout.logits:
        return _sampled_stats(store, layout)
    acc = {"correct": 0.0, "labelled": 0.0, "rows": 0.0, "entropy": 0.0, "mass": 0.0}
    topk = layout.k is not None
    for c in range(layout.n_chunks):
        sl = layout.chunk_slice(c)
        values = q8_decode(store["top"][sl], store["codes"][sl]) if layout.value_dtype == "q8" else store["values"][sl]
        s = chunk_stats(values, store["indices"][sl] if topk else None,
                        store["tail"][sl] if topk else None, store["labels"][sl], layout.num_classes)
        for k in acc:
            acc[k] += s[k]
    return {
        "teacher_top1": acc["correct"] / acc["labelled"] if acc["labelled"] else None,
        "mean_entropy": acc["entropy"] / acc["rows"],
        "topk_mass": acc["mass"] / acc["rows"] if topk else 1.0,
    }


def _sampled_stats(store: Store, layout: Layout) -> dict:
    correct = labelled = 0
    for c in range(layout.n_chunks):
        sl = layout.chunk_slice(c)
        ids, counts = np.asarray(store["sample_ids"][sl]), np.asarray(store["sample_counts"][sl])
        pred = np.take_along_axis(ids, counts.argmax(-1)[..., None], -1)[..., 0]
        labels = np.expand_dims(np.asarray(store["labels"][sl]), 1)
        correct += int(((pred == labels) & (labels >= 0)).sum())
        labelled += int((labels >= 0).sum()) * layout.n_views
    return {"teacher_top1": correct / labelled if labelled else None, "mean_entropy": None, "topk_mass": None}


class Output:
    """A cache being written at `path`. Single-process commands use `derived_cache`; a dump drives the steps
    itself because under torchrun only rank 0 prepares and finalises while every rank writes."""

    def __init__(self, path: str, verb: str, inputs: Sequence[str] = (), compressor: str | None = None,
                 fallback_compressor: bool = False) -> None:
        """`compressor` None takes the backend's default; with `fallback_compressor` one the backend lacks
        (e.g. blosc for an .h5 made from Zarr caches) falls back to the default instead of being an error."""
        check_target(path, inputs, verb)
        self.path, self.stage = path, staging_path(path)
        self.backend = backend_for(path)
        self.chosen = compressor is not None  # a resumed dump keeps the stored compressor unless one is named
        compressor = compressor or default_compressor(self.backend)
        try:
            check_compressor(self.backend, compressor)
        except KDCacheError:
            if not fallback_compressor:
                raise
            compressor = default_compressor(self.backend)
        self.compressor = compressor

    def prepare(self, layout: Layout, attrs: dict, stack: ExitStack, overwrite: bool = False,
                resume: bool = False, resume_keys: Sequence[str] = ()) -> None:
        """Lock the output (for the life of `stack`) and create the staging store, or resume it.

        Outputs that can be resumed (dumps) name `resume_keys`; with `resume`, a partial staging store whose `dump`
        settings match on those keys is reopened instead of refused.
        """
        ensure_parent(self.path)
        if not is_url(self.path):
            stack.enter_context(WriteLock(self.path))
        for p in dict.fromkeys((self.path, self.stage)):
            if path_exists(p):
                refuse_foreign(p)
        if resume and self._resumable(attrs, resume_keys):
            return
        existing = [p for p in dict.fromkeys((self.path, self.stage)) if path_exists(p)]
        if existing and not overwrite:
            old = read_attrs(existing[-1])
            if old.get("status") == STATUS_PARTIAL and resume_keys:
                raise KDCacheError(f"{existing[-1]} already holds a partial dump: pass --resume to finish it "
                                   "(same command) or --overwrite to start over")
            what = "already holds a complete cache" if old.get("status") == STATUS_COMPLETE else "already exists"
            raise KDCacheError(f"{existing[-1]} {what}: pass --overwrite to replace it, or choose another output")
        for p in existing:
            remove_tree(p)
        # HDF5 output is staged uncompressed and compressed once, when it is converted at the end.
        staged = self.compressor if self.backend == "zarr" else "none"
        attrs = attrs | {"status": STATUS_PARTIAL, "compressor": self.compressor}
        create_zarr(self.stage, layout, staged, attrs).close()

    def _resumable(self, attrs: dict, keys: Sequence[str]) -> bool:
        old = read_attrs(self.stage) if path_exists(self.stage) else {}
        if old.get("status") != STATUS_PARTIAL:
            return False
        settings = old.get("dump")
        if not isinstance(settings, dict):
            raise KDCacheError(f"cannot resume {self.stage}: its dump settings are missing or damaged; start over "
                               "with --overwrite")
        for key in keys:
            if settings.get(key) != attrs["dump"].get(key):
                raise KDCacheError(
                    f"cannot resume {self.stage}: it was dumped with {key}={settings.get(key)!r}, this command has "
                    f"{attrs['dump'].get(key)!r}; rerun the original command with --resume, or use --overwrite"
                )
        if not self.chosen:
            self.compressor = old.get("compressor", self.compressor)
        elif old.get("compressor") != self.compressor:
            raise KDCacheError(f"cannot resume {self.stage}: it is compressed with {old.get('compressor')}, this "
                               f"command asks for {self.compressor}; resume with --compressor {old.get('compressor')}")
        return True

    def open(self) -> Store:
        return open_store(self.stage, "r+")

    def finalize(self, store: Store, carry: dict | None = None) -> None:
        """Mark a fully written staging store complete; for HDF5 output, convert it atomically into place.

        `carry` keeps a source cache's `stats` and `version` (convert); otherwise they are computed here.
        """
        layout = Layout.from_attrs(store.attrs)
        done = np.asarray(store["done"][...], dtype=bool)
        if not done.all():
            missing = np.nonzero(~done)[0]
            raise KDCacheError(f"{len(missing)} chunks of {store.path} are still missing (first: {missing[0]}); "
                               "rerun with --resume")
        attrs = store.attrs
        attrs["stats"] = cache_stats(store, layout) if carry is None else carry.get("stats")
        attrs["status"] = STATUS_COMPLETE
        attrs["version"] = version_for(attrs)  # a range dump begun as 1.1 and resumed ends as 2.0
        attrs["compressor"] = self.compressor
        attrs |= {k: v for k, v in (carry or {}).items() if k == "version"}
        if self.backend == "zarr":
            store.set_attrs(attrs)
            return
        tmp = self.path + ".tmp"
        try:
            write_hdf5(store, tmp, self.compressor, attrs)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def cleanup(self) -> None:
        """Remove the staging store of a finished HDF5 output."""
        if self.stage != self.path:
            remove_tree(self.stage)


@contextmanager
def derived_cache(out: str, layout: Layout, attrs: dict, overwrite: bool, verb: str, inputs: Sequence[str],
                  compressor: str | None = None) -> Iterator[ChunkWriter]:
    """A writer for a new cache at `out` made from `inputs`; finalised when the block ends cleanly."""
    output = Output(out, verb, inputs, compressor, fallback_compressor=True)
    with ExitStack() as stack:
        output.prepare(layout, attrs, stack, overwrite)
        store = output.open()
        writer = ChunkWriter(store, layout)
        try:
            yield writer
        finally:
            writer.close()
        output.finalize(store)
        store.close()
    output.cleanup()
