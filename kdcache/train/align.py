"""Check, before the first step, that caches belong to the dataset being trained on and to each other."""

from __future__ import annotations

from kdcache.cache.format import labels_sha256, row_range
from kdcache.cache.reader import Cache
from kdcache.data.datasets import SourceDataset, fingerprint
from kdcache.errors import KDCacheError


def dataset_identity(ds: SourceDataset) -> dict:
    """The fields a cache records about its dataset, computed from the dataset itself."""
    return {"n": len(ds), "num_classes": ds.info.num_classes, "class_names": list(ds.info.class_names),
            "fingerprint": fingerprint(ds), "labels_sha256": labels_sha256(ds.labels)}


def check_alignment(caches: list[Cache], ds: SourceDataset) -> None:
    """Refuse, naming the field and both values, when any cache does not match `ds` or the others."""
    ident = dataset_identity(ds)
    where = f"dataset {ds.info.spec} [{ds.info.split}]"
    for cache in caches:
        if not cache.complete:
            done = int(cache.done_map().sum())
            raise KDCacheError(f"{cache.path} is a partial cache ({done} of {cache.layout.n_chunks} chunks): "
                               "finish it with 'kdcache dump ... --resume' before training from it")
        if cache.attrs.get("rows"):
            start, stop = row_range(cache.attrs)
            raise KDCacheError(f"{cache.path} holds only rows {start}:{stop} of the {cache.attrs['dataset']['n']} "
                               "samples (a range cache): join the ranges into one cache with 'kdcache join' "
                               "before training from it")
        recorded = cache.attrs["dataset"]
        for key, value in ident.items():
            if recorded.get(key) != value:
                a, b = _short(recorded.get(key)), _short(value)
                raise KDCacheError(f"cache {cache.path} does not match {where}: {key} is {a} in the cache but {b} "
                                   "in the dataset; train on the dataset the cache was dumped from")
    first = caches[0] if caches else None
    for other in caches[1:]:
        for key in ("n_views",):
            if other.attrs[key] != first.attrs[key]:
                raise KDCacheError(f"caches {first.path} and {other.path} differ in {key} "
                                   f"({first.attrs[key]} vs {other.attrs[key]}): dump them with the same settings")
        if other.attrs["views"]["augment"] != first.attrs["views"]["augment"] or \
                other.attrs["views"]["seed"] != first.attrs["views"]["seed"]:
            raise KDCacheError(f"caches {first.path} and {other.path} stored different views "
                               "(augment/seed differ): dump every teacher with the same --views/--augment/--seed")


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "…"
