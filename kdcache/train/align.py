"""Check, before the first step, that caches belong to the dataset being trained on and to each other."""

from __future__ import annotations

from kdcache.data.datasets import identity
from kdcache.data.sources import SourceDataset
from kdcache.errors import KDCacheError
from kdcache.format.attrs import check_compatible, check_dataset
from kdcache.format.spec import row_range
from kdcache.io.reader import Cache


def check_alignment(caches: list[Cache], ds: SourceDataset) -> None:
    """Refuse, naming the field and both values, when any cache does not match `ds` or the others."""
    ident = identity(ds) if caches else {}
    where = f"dataset {ds.info.spec} [{ds.info.split}]"
    for cache in caches:
        if cache.attrs.get("rows"):
            start, stop = row_range(cache.attrs)
            raise KDCacheError(f"{cache.path} holds only rows {start}:{stop} of the {cache.attrs['dataset']['n']} "
                               "samples (a range cache): join the ranges into one cache with 'kdcache join' "
                               "before training from it")
        done = cache.done_map()
        if not done.all():
            raise KDCacheError(f"{cache.path} says it is complete but {int((~done).sum())} of its chunks are not marked "
                               f"written: it is damaged; run 'kdcache verify {cache.path}', and dump or fetch it again")
        check_dataset(cache.path, cache.attrs, ident, where)
        cache.check_labels()
    if len(caches) > 1:
        check_compatible([(c.path, c.attrs) for c in caches], ["views"], "train from",
                         "dump every teacher with the same --views/--augment/--seed")
