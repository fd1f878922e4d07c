"""The `kdcache` attribute dict: one builder for every command that writes a cache, and the identity checks that
join, merge and training make before they combine caches or train from one.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from kdcache import __version__
from kdcache.errors import KDCacheError
from kdcache.format.spec import FORMAT_NAME, Q8_DEFINITION, STATUS_PARTIAL, TAIL_DEFINITION, Layout, version_for

# What "the same dataset" means: recorded at dump time, compared before any two caches meet or a student trains.
DATASET_IDENTITY = ("n", "num_classes", "class_names", "fingerprint", "labels_sha256", "vocab")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cache_attrs(layout: Layout, *, teacher: dict, dataset: dict, views: dict, dump: dict, command: str,
                rows: dict | None = None, **extra: object) -> dict:
    """The whole attribute dict of a new (partial) cache; `extra` adds optional sections such as `merge` or `join`.

    `compressor` and, at the end, `stats` and `status: complete` are set by the output that writes the cache.
    """
    attrs = {
        "format": FORMAT_NAME, "version": None, "status": STATUS_PARTIAL, **layout.to_attrs(),
        "tail": TAIL_DEFINITION if layout.k else None,
        **({"q8": Q8_DEFINITION} if layout.value_dtype == "q8" else {}),
        "teacher": teacher, "dataset": dataset, "rows": rows, "views": views, "dump": dump, **extra,
        "created": now(), "tool": f"kdcache {__version__}", "command": command,
    }
    return attrs | {"version": version_for(attrs)}


def _identity(attrs: dict, parts: Iterable[str]) -> dict[str, object]:
    """The named parts of a cache's identity as flat `name -> value` pairs (names as error messages show them)."""
    out: dict[str, object] = {}
    for part in parts:
        match part:
            case "dataset":
                d = attrs["dataset"]
                out |= {f"dataset {k}": d.get(k) for k in ("spec", "split", *DATASET_IDENTITY)}
            case "data":  # the samples alone: what a student must be trained on
                d = attrs["dataset"]
                out |= {f"dataset {k}": d.get(k) for k in DATASET_IDENTITY}
            case "views":
                out |= {"n_views": attrs["n_views"], "augment": attrs["views"]["augment"],
                        "seed": attrs["views"]["seed"]}
            case "rows":
                out["rows"] = attrs.get("rows")
            case "teacher":
                t = attrs["teacher"]
                out |= {"teacher": t["name"], "teacher weights": t["weights"].get("sha256"),
                        "teacher arch_args": t.get("arch_args"), "preprocess": t["preprocess"],
                        "merge": attrs.get("merge")}
            case "layout":
                out |= {k: attrs[k] for k in ("kind", "k", "num_classes", "value_dtype")}
                out["positions"] = attrs.get("positions")
    return out


def identity(path: str, attrs: dict, parts: Sequence[str], verb: str) -> dict[str, object]:
    """`_identity`, with damaged attributes reported as one line naming the cache."""
    try:
        return _identity(attrs, parts)
    except (KeyError, TypeError, AttributeError) as e:
        raise KDCacheError(f"cannot {verb} {path}: its attributes are damaged ({type(e).__name__}: {e}); "
                           f"run 'kdcache verify {path}'") from None


def check_compatible(members: Sequence[tuple[str, dict]], parts: Sequence[str], verb: str, hint: str) -> None:
    """Refuse, naming the first differing field and both values, unless every member shares the `parts`."""
    (first, a), *rest = members
    want = identity(first, a, parts, verb)
    for path, attrs in rest:
        for key, value in identity(path, attrs, parts, verb).items():
            if value != want[key]:
                raise KDCacheError(f"cannot {verb} {first} and {path}: {key} differs ({_short(want[key])} vs "
                                   f"{_short(value)}); {hint}")


def check_dataset(path: str, attrs: dict, dataset_identity: dict, where: str) -> None:
    """Refuse a cache whose recorded dataset is not `dataset_identity` (as data.identity computes it)."""
    recorded = identity(path, attrs, ["data"], "train from")
    for key, value in dataset_identity.items():
        if recorded.get(f"dataset {key}") != value:
            raise KDCacheError(f"cache {path} does not match {where}: {key} is {_short(recorded.get(f'dataset {key}'))} "
                               f"in the cache but {_short(value)} in the dataset; train on the dataset the cache was "
                               "dumped from")


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "…"
