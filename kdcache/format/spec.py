"""Cache layout: the one place in code that defines arrays, shapes, dtypes, versions and the checksum rule.

docs/FORMAT.md documents the same layout for people; tests/test_conformance.py reads
a cache with plain zarr/h5py to hold the two to each other.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from kdcache.data.views import VIEW_FIELDS
from kdcache.errors import KDCacheError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = "1.1"        # whole caches of images: readable by every 1.x reader
RANGE_FORMAT_VERSION = "2.0"  # range caches: row i is dataset sample rows.start + i, which 1.x readers would miss
TENSOR_FORMAT_VERSION = "3.0"  # tensor samples, token positions, q8 values: what 2.x readers would misread
READER_MAJOR = 3              # the newest major version this reader reads
ATTR_KEY = "kdcache"
# Arrays with a view axis, in checksum order; feature arrays (feat_0, feat_1, …) follow them in index order.
PER_VIEW = ("values", "top", "codes", "indices", "tail", "views", "sample_ids", "sample_counts")
FEATURE_PREFIX = "feat_"
BOOKKEEPING = ("done", "checksum")                  # one entry per chunk, never compressed
STATUS_PARTIAL = "partial"
STATUS_COMPLETE = "complete"
TAIL_DEFINITION = "logsumexp of the teacher logits not in the top-k, at T=1"
VALUE_DTYPES = ("float16", "float32", "q8")
Q8_STEP = 16  # q8 codes count 1/16 nat steps
Q8_DEFINITION = ("q8: top = the largest logit (float32); codes[j-1] = q_j - q_(j-1) (uint8, q_0 = 0) where "
                 "q_j = min(255, round(16 * (top - logit_j))), so logit_j = top - cumsum(codes)[j-1] / 16")
SAMPLING_DEFINITION = ("sample_ids/sample_counts: M draws per row from softmax(logits / temperature) by the inverse "
                       "CDF of counter-based uniforms (seed, stream, sample, view, slot); the distinct ids drawn, "
                       "ascending, and how often each was drawn (summing to M; unused slots 0/0)")
TARGET_CHUNK_BYTES = 1 << 20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 16384  # samples per chunk; a token cache's rows are sequences: at least 1
REQUIRED_ATTRS = (
    "format", "version", "status", "kind", "k", "num_classes", "n", "n_views", "chunk_rows",
    "value_dtype", "index_dtype", "teacher", "dataset", "views", "created", "tool", "command",
)
TYPED_ATTRS = (  # what readers rely on, with its type
    ("n", int), ("n_views", int), ("num_classes", int), ("chunk_rows", int), ("command", str), ("version", str),
    ("status", str), ("kind", str), ("value_dtype", str), ("teacher", dict), ("teacher.name", str),
    ("teacher.weights", dict), ("teacher.preprocess", dict), ("dataset", dict), ("dataset.spec", str),
    ("dataset.split", str), ("dataset.n", int), ("dataset.num_classes", int), ("dataset.class_names", list),
    ("dataset.fingerprint", str), ("views", dict), ("views.augment", str), ("views.seed", int),
)
MISSING, MISTYPED = "missing", "should be"
_ABSENT = object()


def index_dtype(num_classes: int, per_token: bool = False) -> str:
    """The dtype of top-k class ids: int16/int32 (the 1.x rule); token caches (3.0) use uint16 up to 65,536 ids,
    which covers vocabularies of 32k–64k tokens in half the bytes."""
    if per_token:
        return "uint16" if num_classes <= 1 << 16 else "int32"
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def default_chunk_rows(width: int, value_dtype: str, positions: int | None = None) -> int:
    """Samples per chunk so that one view's values chunk is about 1 MiB (a power of two, clamped); for a token
    cache a sample holds `positions` rows, so its chunks hold fewer samples (at least one)."""
    row_bytes = width * (1 if value_dtype == "q8" else np.dtype(value_dtype).itemsize) * (positions or 1)
    rows = TARGET_CHUNK_BYTES // max(row_bytes, 1)
    rows = 1 << int(np.floor(np.log2(max(rows, 1))))
    return int(min(max(rows, 1 if positions else MIN_CHUNK_ROWS), MAX_CHUNK_ROWS))


@dataclass(frozen=True)
class Layout:
    """Shapes of one cache: N samples × V views × (C classes or top-k)."""

    n: int
    n_views: int
    num_classes: int
    k: int | None
    value_dtype: str
    chunk_rows: int
    positions: int | None = None  # token caches: L rows (token positions) per sample; None: one row per sample
    logits: bool = True  # False: a cache of sampled soft labels only
    samples: int | None = None  # M draws per row from the teacher's distribution (sampled soft labels)
    features: tuple[tuple[int, ...], ...] = ()  # per-row shape of each cached teacher feature (feat_0, feat_1, …)

    def __post_init__(self) -> None:
        if not self.logits and not self.samples:
            raise KDCacheError("a cache holds logits, sampled soft labels (--sample M), or both")
        if self.samples is not None and not 1 <= self.samples <= 65535:
            raise KDCacheError(f"--sample {self.samples} must be between 1 and 65535 draws per row")
        if self.value_dtype not in VALUE_DTYPES:
            raise KDCacheError(f"unsupported dtype {self.value_dtype!r}: use one of {', '.join(VALUE_DTYPES)}")
        if self.value_dtype == "q8" and (self.k is None or self.k < 2):
            raise KDCacheError("--dtype q8 encodes top-k values (k >= 2): add --topk K, or use float16")
        if self.positions is not None and self.positions < 1:
            raise KDCacheError(f"a token cache needs at least one position per sample, got {self.positions}")
        if self.k is not None and not 0 < self.k < self.num_classes:
            raise KDCacheError(
                f"--topk {self.k} must be between 1 and {self.num_classes - 1} for {self.num_classes} classes; "
                "omit --topk to store full logits"
            )
        if self.n < 1 or self.n_views < 1 or self.chunk_rows < 1:
            raise KDCacheError(f"empty cache layout (n={self.n}, views={self.n_views}, chunk rows={self.chunk_rows})")

    @classmethod
    def for_dataset(cls, n: int, dataset_n: int, n_views: int, num_classes: int, k: int | None, value_dtype: str,
                    chunk_rows: int | None = None, positions: int | None = None, **extra: object) -> "Layout":
        """A layout of n samples chunked as a cache of the whole dataset would be (default ~1 MiB chunks), so that
        range caches, joins and merges of one dataset share chunk boundaries."""
        rows = chunk_rows or default_chunk_rows(k or num_classes, value_dtype, positions)
        return cls(n, n_views, num_classes, k, value_dtype, min(rows, dataset_n), positions, **extra)

    @property
    def kind(self) -> str:
        return "sampled" if not self.logits else "full" if self.k is None else "topk"

    @property
    def width(self) -> int:
        return self.num_classes if self.k is None else self.k

    @property
    def index_dtype(self) -> str:
        return index_dtype(self.num_classes, self.positions is not None)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_rows)

    def chunk_slice(self, c: int) -> slice:
        return slice(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n))

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
        """name -> (shape, dtype, chunk shape); chunked along samples, one view per chunk; token caches have a
        positions axis after the views axis (labels: after the samples axis)."""
        n, v, r, w = self.n, self.n_views, min(self.chunk_rows, self.n), self.width
        pos = (self.positions,) if self.positions else ()
        out: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]] = {}
        if not self.logits:
            pass
        elif self.value_dtype == "q8":
            out["top"] = ((n, v, *pos), "float32", (r, 1, *pos))
            out["codes"] = ((n, v, *pos, w - 1), "uint8", (r, 1, *pos, w - 1))
        else:
            out["values"] = ((n, v, *pos, w), self.value_dtype, (r, 1, *pos, w))
        out |= {
            "labels": ((n, *pos), "int64", (r, *pos)),
            "views": ((n, v, len(VIEW_FIELDS)), "float32", (r, 1, len(VIEW_FIELDS))),
            "done": ((self.n_chunks,), "uint8", (1,)),
            "checksum": ((self.n_chunks, v), "uint32", (1, v)),
        }
        if self.k is not None and self.logits:
            out["indices"] = ((n, v, *pos, w), self.index_dtype, (r, 1, *pos, w))
            out["tail"] = ((n, v, *pos), "float32", (r, 1, *pos))
        if self.samples:
            m = self.samples
            out["sample_ids"] = ((n, v, *pos, m), self.index_dtype, (r, 1, *pos, m))
            out["sample_counts"] = ((n, v, *pos, m), "uint8" if m <= 255 else "uint16", (r, 1, *pos, m))
        for i, shape in enumerate(self.features):
            out[f"{FEATURE_PREFIX}{i}"] = ((n, v, *pos, *shape), self.feature_dtype, (r, 1, *pos, *shape))
        return out

    @property
    def feature_dtype(self) -> str:
        """Cached features are float16, or float32 in a float32 cache."""
        return "float32" if self.value_dtype == "float32" else "float16"

    def per_view(self) -> tuple[str, ...]:
        """This cache's per-view arrays in checksum order."""
        names = [n for n in PER_VIEW if n in self.arrays()]
        return (*names, *(f"{FEATURE_PREFIX}{i}" for i in range(len(self.features))))

    def decoded(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of the per-sample arrays as readers return them: q8 values decoded to float32
        `values`, labels without a view axis."""
        out = {n: (s, d) for n, (s, d, _) in self.arrays().items() if n not in (*BOOKKEEPING, "top", "codes")}
        if self.value_dtype == "q8" and self.logits:
            out["values"] = (self.arrays()["indices"][0], "float32")
        return out

    def row_shape(self, name: str) -> tuple[int, ...]:
        """One sample's shape in decoded array `name` for one view (what a reader returns per sample)."""
        shape = self.decoded()[name][0]
        return shape[1:] if name == "labels" else shape[2:]

    def decoded_bytes(self) -> int:
        """Bytes of the per-view arrays once decoded into memory (all views; q8 values as float32)."""
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for n, (s, d) in self.decoded().items() if n != "labels")

    def to_attrs(self) -> dict:
        out = {
            "kind": self.kind, "k": self.k, "num_classes": self.num_classes, "n": self.n,
            "n_views": self.n_views, "chunk_rows": self.chunk_rows,
            "value_dtype": self.value_dtype, "index_dtype": self.index_dtype,
        }
        if self.positions is not None:
            out["positions"] = self.positions
        if self.samples:
            out["samples"] = self.samples
        if self.features:
            out["feature_shapes"] = [list(f) for f in self.features]
        return out

    @classmethod
    def from_attrs(cls, a: dict) -> "Layout":
        return cls(n=int(a["n"]), n_views=int(a["n_views"]), num_classes=int(a["num_classes"]),
                   k=None if a["k"] is None else int(a["k"]), value_dtype=a["value_dtype"],
                   chunk_rows=int(a["chunk_rows"]), positions=a.get("positions"), logits=a["kind"] != "sampled",
                   samples=a.get("samples"), features=tuple(tuple(f) for f in a.get("feature_shapes") or ()))


def version_for(attrs: dict) -> str:
    """The lowest format version that describes this cache, so that every older reader that could read it does,
    and every one that could not refuses it."""
    inputs = attrs.get("dataset", {}).get("input") or {}
    if (inputs.get("kind", "image") != "image" or attrs.get("positions") or attrs.get("value_dtype") == "q8"
            or attrs.get("samples") or attrs.get("feature_shapes")):
        return TENSOR_FORMAT_VERSION
    return FORMAT_VERSION if attrs.get("rows") is None else RANGE_FORMAT_VERSION


def row_range(attrs: dict) -> tuple[int, int]:
    """The dataset rows [start, stop) a cache holds: its `rows` (a range cache), else all N."""
    r = attrs.get("rows")
    if r is None:
        return 0, int(attrs["n"])
    if not (isinstance(r, dict) and type(r.get("start")) is int and type(r.get("stop")) is int):
        raise KDCacheError(f"the cache's rows attribute is damaged ({str(r)[:60]}): expected null or "
                           "{start, stop}; run 'kdcache verify' on it")
    return r["start"], r["stop"]


def parse_rows(text: str | None, n: int) -> tuple[int, int]:
    """`--rows START:STOP` (either end may be omitted) as a checked [start, stop) range of an n-sample dataset."""
    if text is None:
        return 0, n
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, stop = int(a) if a.strip() else 0, int(b) if b.strip() else n
    except ValueError:
        raise KDCacheError(f"--rows takes START:STOP (e.g. 0:50000), got {text!r}") from None
    if not 0 <= start < stop <= n:
        raise KDCacheError(f"--rows {text} is empty or outside the dataset's {n} samples: "
                           f"use START:STOP with 0 <= START < STOP <= {n}")
    return start, stop


def view_checksum(rows: dict[str, np.ndarray]) -> int:
    """CRC-32 of one chunk of one view: the C-order little-endian bytes of its per-view arrays in PER_VIEW order
    (values — or top and codes —, indices, tail, views, sample_ids, sample_counts), then features in index order."""
    crc = 0
    feats = sorted((n for n in rows if n.startswith(FEATURE_PREFIX)), key=lambda n: int(n[len(FEATURE_PREFIX):]))
    for name in (*PER_VIEW, *feats):
        if name in rows:
            a = np.ascontiguousarray(rows[name])
            crc = zlib.crc32(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(), crc)
    return crc


def check_version(attrs: dict, where: str) -> None:
    """Refuse what is not a kdcache cache or a major version newer than this reader."""
    if attrs.get("format") != FORMAT_NAME:
        raise KDCacheError(f"{where} is not a kdcache cache (no '{ATTR_KEY}' attributes with format 'kdcache')")
    version = str(attrs.get("version", ""))
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise KDCacheError(f"{where} has a damaged format version {version[:20]} (expected MAJOR.MINOR); "
                           f"run 'kdcache verify {where}'")
    if int(major) > READER_MAJOR:
        raise KDCacheError(
            f"{where} has format version {version}, newer than this kdcache reads "
            f"(up to {READER_MAJOR}.x); upgrade kdcache"
        )


def schema_problems(attrs: dict) -> list[str]:
    """What is missing or mistyped in a cache's attributes (empty when readers can rely on them)."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        return [f"attributes: {MISSING} {', '.join(missing)}"]
    problems = []
    for key, typ in TYPED_ATTRS:
        parent, _, name = key.rpartition(".")
        if parent and not isinstance(attrs.get(parent), dict):  # reported once, as the parent's problem
            continue
        value = (attrs[parent] if parent else attrs).get(name, _ABSENT)
        if value is _ABSENT:
            problems.append(f"attributes: {MISSING} {key}")
        elif not isinstance(value, typ) or isinstance(value, bool):
            problems.append(f"attributes: {key} {MISTYPED} {typ.__name__}, found {type(value).__name__}")
    if attrs["k"] is not None and (not isinstance(attrs["k"], int) or isinstance(attrs["k"], bool)):
        problems.append(f"attributes: k {MISTYPED} int or null, found {type(attrs['k']).__name__}")
    if problems:
        return problems
    kinds = ("sampled", "full") if attrs["k"] is None else ("topk",)
    if attrs["kind"] not in kinds or attrs["value_dtype"] not in VALUE_DTYPES:
        return [f"attributes: kind {attrs['kind']!r}, k {attrs['k']!r} and value_dtype {attrs['value_dtype']!r} "
                f"{MISTYPED} full/null, sampled/null or topk/int, and one of {', '.join(VALUE_DTYPES)}"]
    if attrs.get("rows") is None:
        if isinstance(attrs.get("dataset"), dict) and attrs["dataset"].get("n") != attrs["n"]:
            problems.append(f"attributes: dataset.n {attrs['dataset'].get('n')} differs from n {attrs['n']}")
        return problems
    try:
        start, stop = row_range(attrs)
    except KDCacheError:
        return problems + ["attributes: rows should be null or an object with int start and stop"]
    total = attrs["dataset"].get("n")
    if not (0 <= start and stop - start == attrs["n"] and type(total) is int and stop <= total):
        problems.append(f"attributes: rows {start}:{stop} do not hold n={attrs['n']} samples of a dataset of {total}")
    return problems


def is_structural(problem: str) -> bool:
    """A schema problem that leaves the attributes unusable (as opposed to inconsistent)."""
    return MISSING in problem or MISTYPED in problem
