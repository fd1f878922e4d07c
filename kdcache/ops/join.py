"""`kdcache join`: one cache from caches of one dump over disjoint, adjacent `--rows` ranges.

Members must agree on the teacher, weights, dataset identity, layout and views (batch size and
chunk rows may differ); their ranges must not overlap or leave gaps, and each member's labels must
match its own hash. Rows are copied exactly (every member chunk is checksum-verified as it is read)
and rechunked to the first range's chunk rows; the output keeps the members' compressor when they
share one. The result is a whole cache when the ranges cover the dataset, else a range cache over
their union.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import numpy as np

from kdcache.data.datasets import labels_sha256
from kdcache.errors import KDCacheError
from kdcache.format.attrs import cache_attrs, check_compatible
from kdcache.format.spec import Layout, row_range
from kdcache.io.output import check_target, derived_cache
from kdcache.io.reader import Cache, open_cache
from kdcache.io.writer import ChunkWriter, Rows


def _check_members(caches: list[Cache]) -> None:
    """Same identity (all but the rows), and ranges (in row order) that neither overlap nor leave a gap."""
    check_compatible([(c.path, c.attrs) for c in caches], ["dataset", "teacher", "layout", "views"], "join",
                     "join the range caches of one dump command (same settings, other --rows)")
    for c in caches:
        c.check_labels()
    for a, b in zip(caches, caches[1:]):
        (a0, a1), (b0, b1) = row_range(a.attrs), row_range(b.attrs)
        if b0 < a1:
            raise KDCacheError(f"cannot join {a.path} and {b.path}: their rows {a0}:{a1} and {b0}:{b1} overlap; "
                               "join caches of disjoint --rows ranges")
        if b0 > a1:
            raise KDCacheError(f"cannot join: rows {a1}:{b0} are in none of the caches; dump them with "
                               f"'kdcache dump ... --rows {a1}:{b0}' and join again")


def _common(caches: list[Cache], get) -> object:
    """The value every member has, or None when they differ."""
    values = [get(c.attrs) for c in caches]
    return values[0] if all(v == values[0] for v in values) else None


def _attrs(caches: list[Cache], layout: Layout, rows: tuple[int, int], command: str) -> dict:
    first = caches[0].attrs
    whole = rows == (0, first["dataset"]["n"])
    span = None if whole else {"start": rows[0], "stop": rows[1],
                               "labels_sha256": labels_sha256(np.concatenate([c.labels for c in caches]))}
    batch_size = _common(caches, lambda a: a.get("dump", {}).get("batch_size"))  # null: the members differ
    extra = {"merge": first["merge"]} if first.get("merge") else {}
    return cache_attrs(
        layout, teacher=first["teacher"], dataset=first["dataset"], views=first["views"],
        dump=first.get("dump", {}) | {"rows": None if whole else list(rows), "chunk_rows": layout.chunk_rows,
                                      "batch_size": batch_size},
        rows=span, command=command, **extra,
        join={"members": [{"path": c.path, "rows": list(row_range(c.attrs)), "created": c.attrs["created"],
                           "command": c.attrs["command"]} for c in caches]})


def _put(writer: ChunkWriter, chunk_rows: int, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Queue consecutive rows starting at output row `start`, split at the output's chunk boundaries."""
    n, i = len(arrays["labels"]), 0
    while i < n:
        end = min(n, ((start + i) // chunk_rows + 1) * chunk_rows - start)
        writer.put(Rows(start=start + i, arrays={k: a[i:end] for k, a in arrays.items()}))
        i = end


def join(paths: list[str], out: str, overwrite: bool = False, command: str = "") -> tuple[int, int, int]:
    """Join range caches into `out`; returns (start, stop, dataset n) of the rows it holds."""
    if len(paths) < 2:
        raise KDCacheError("join needs at least two caches")
    check_target(out, paths, "join")
    with ExitStack() as stack:
        caches = sorted((stack.enter_context(open_cache(p)) for p in paths), key=lambda c: row_range(c.attrs))
        _check_members(caches)
        rows = row_range(caches[0].attrs)[0], row_range(caches[-1].attrs)[1]
        n_total = caches[0].attrs["dataset"]["n"]
        layout = dataclasses.replace(caches[0].layout, n=rows[1] - rows[0])
        compressor = _common(caches, lambda a: a.get("compressor"))
        with derived_cache(out, layout, _attrs(caches, layout, rows, command), overwrite, "join", paths,
                           compressor) as writer:
            for cache in caches:
                offset = row_range(cache.attrs)[0] - rows[0]
                for c in range(cache.layout.n_chunks):
                    sl = cache.layout.chunk_slice(c)
                    per_view = [cache.read_chunk(c, v) for v in range(layout.n_views)]
                    arrays = {k: np.stack([pv[k] for pv in per_view], 1) for k in per_view[0] if k != "labels"}
                    _put(writer, layout.chunk_rows, offset + sl.start, arrays | {"labels": per_view[0]["labels"]})
    return rows[0], rows[1], n_total
