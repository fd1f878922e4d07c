"""WebDataset tar shards (``wds:PATTERN``) as a map-style :class:`~kdcache.data.sources.SourceDataset` of base
images.

Images decode as ``imagefolder:`` decodes files (:func:`kdcache.data.sources.decode_image`). The dataset is
picklable for DataLoader workers and holds no lock: file handles are opened lazily in each process, and local shards
are read with ``os.pread`` (no shared file offset, so a forked worker may share a handle).

``PATTERN`` names tar shards, local paths or fsspec URLs (``s3://``, ``gs://``, ``https://``…):
brace ranges and lists (``train-{000000..000099}.tar``, ``{a,b}``) are expanded in order, and ``*``/``?`` globs are
listed (sorted) where the filesystem can list (local, s3, gs; not plain HTTP). The literal ``{split}`` is replaced by
the split (``train``, ``test``; for ``test``, ``val`` when no ``test`` shard exists), so one spec names both splits:
``wds:/data/imagenet-{split}-*.tar``. A pattern without ``{split}`` serves both splits with the same shards (as
``imagefolder:`` does without split folders). A sample is the run of consecutive members sharing a key (the member
path up to the first ``.`` of its file name, as WebDataset groups them): its image is the first member with
extension ``jpg``/``jpeg``/``png``/``webp`` (or ``bmp``/``ppm``), its label the ``cls`` member (an integer as text) or
the ``json`` member (an integer, or an object with ``label``/``cls``/``class``/``target``); a sample without an image
is skipped, one without a label is unlabelled (-1). Class names come from a ``classes.txt`` (one name per line)
beside the first shard if there is one, else ``0 … max label``. Order: shards in pattern order, samples in tar order.

*Index.* Opening reads every shard's tar headers once (tarfile: each header, a seek over the member's data, and the
few bytes of each label member) into a per-sample ``(shard, data offset, size, label)`` index, so ``ds[i]`` is one
positioned read (``os.pread`` locally, one ranged request remotely), never a re-scan. Each shard's index is kept in
``$KDCACHE_INDEX_DIR`` (default ``~/.cache/kdcache/shards``) under the hash of the shard's URL, size and
modification time (or ETag), so a later open — kdtrain reopening the cache's dataset — reads no shard at all.
Shards must be uncompressed tars (WebDataset's own format; ``.tar.gz`` cannot be read at an offset).

Why not the ``webdataset`` package: its loaders are iterable-style (streams of samples, shuffled by buffers), while a
dump needs map-style batches of chosen rows (chunk-aligned, resumable, sharded by chunk across ranks); the tar
format itself needs only the standard library, so plain :mod:`tarfile` reads it, with fsspec (already a
dependency) for remote shards.

*Fingerprints.* ``raw_bytes(i)`` is the image's stored bytes (one read), so a fingerprint (N, every label, 64 probed
images: :func:`kdcache.data.datasets.fingerprint`) costs 64 reads, not a pass over the data.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from kdcache.data.sources import DatasetInfo, SourceDataset, decode_image
from kdcache.errors import KDCacheError, printable

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
LABEL_KEYS = ("label", "cls", "class", "target")
SPLIT_FIELD = "{split}"
INDEX_VERSION = 1


# --------------------------------------------------------------------------- patterns

_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``{000..012}`` (numeric, zero-padded to the bounds' width when they are written padded) and ``{a,b,c}``
    expanded left to right, in order; any other ``{...}`` is kept as text."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = _RANGE.fullmatch(m.group(0))
    if r is not None:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") or len(r.group(1)) == len(r.group(2)) else 0
        step = 1 if hi >= lo else -1
        options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression: keep it and go on after it
        head, rest = pattern[:m.end()], pattern[m.end():]
        return [head + tail for tail in expand_braces(rest)]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + o + t for o in options for t in expand_braces(tail)]


def is_url(path: str) -> bool:
    return "://" in path


def fs_of(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _glob(item: str) -> list[str]:
    if not any(c in item for c in "*?["):
        return [item]
    if not is_url(item):
        return sorted(globlib.glob(os.path.expanduser(item)))
    fs, path = fs_of(item)
    protocol = item.split("://", 1)[0]
    return [p if "://" in p else f"{protocol}://{p}" for p in sorted(fs.glob(path))]


def shard_list(spec: str, pattern: str, split: str) -> list[str]:
    """The shards ``pattern`` names for ``split`` (see the module docstring), in order."""
    if not pattern:
        raise KDCacheError("wds: needs a shard pattern: use e.g. 'wds:/data/train-{000000..000099}.tar'")
    names = (split,) if split == "train" else ("test", "val")
    tried = []
    for name in names if SPLIT_FIELD in pattern else (None,):
        filled = pattern if name is None else pattern.replace(SPLIT_FIELD, name)
        shards = [s for item in expand_braces(filled) for s in _glob(item)]
        shards = [os.path.expanduser(s) if not is_url(s) else s for s in shards]
        if shards and (name is None or len(names) == 1 or exists(shards[0])):
            return shards
        tried.append(filled)
    raise KDCacheError(f"{spec}: no shards match {' or '.join(printable(t) for t in tried)}: check the pattern "
                       "(brace ranges like {000000..000099}, globs, {split} for the split)")


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    try:
        fs, p = fs_of(path)
        return bool(fs.exists(p))
    except Exception:  # noqa: BLE001 - an unreachable store: let the open say so
        return False


# --------------------------------------------------------------------------- tar index


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the path up to the first '.' of the file name, and the rest (lower case)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _parse_label(ext: str, data: bytes) -> int | None:
    text = data.decode("utf-8", "replace").strip()
    if ext == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if isinstance(obj, dict):
            obj = next((obj[k] for k in LABEL_KEYS if k in obj), None)
        return int(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == int(obj) else None
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def _stat_key(shard: str) -> str:
    """What identifies a shard's bytes without reading them: path, size and mtime (or ETag)."""
    if not is_url(shard):
        st = os.stat(shard)
        return json.dumps([os.path.realpath(shard), st.st_size, st.st_mtime_ns])
    fs, path = fs_of(shard)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return json.dumps([shard, info.get("size"), str(tag)])


def index_dir() -> Path:
    env = os.environ.get("KDCACHE_INDEX_DIR")
    return Path(os.path.expanduser(env or "~/.cache/kdcache/shards"))


def _scan(shard: str, where: str) -> np.ndarray:
    """Rows (data offset, size, label) of one shard's samples, in tar order."""
    rows: list[tuple[int, int, int]] = []
    try:
        f = open(shard, "rb") if not is_url(shard) else fs_of(shard)[0].open(fs_of(shard)[1], "rb")
    except OSError as e:
        raise KDCacheError(f"{where}: cannot open shard {printable(shard)} ({e}): check the path or URL") from None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            raise KDCacheError(f"{where}: {printable(shard)} is not an uncompressed tar ({e}): WebDataset shards "
                               "are plain .tar files") from None
        key, image, label = None, None, -1
        best = len(IMAGE_EXTS)

        def flush() -> None:
            if key is not None and image is not None:
                rows.append((image[0], image[1], label))

        try:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_key(m.name)
                if k != key:
                    flush()
                    key, image, label, best = k, None, -1, len(IMAGE_EXTS)
                last = ext.rsplit(".", 1)[-1]
                if last in IMAGE_EXTS and IMAGE_EXTS.index(last) < best:
                    image, best = (m.offset_data, m.size), IMAGE_EXTS.index(last)
                elif ext in ("cls", "json", "cls.txt", "label"):
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    parsed = _parse_label(ext, data)
                    if parsed is not None:
                        label = parsed if parsed >= 0 else -1
            flush()
        except (tarfile.TarError, OSError) as e:
            raise KDCacheError(f"{where}: shard {printable(shard)} is damaged ({e}): re-write it") from None
        tar.members = []
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def shard_index(shard: str, where: str) -> np.ndarray:
    """One shard's ``(offset, size, label)`` rows, from the index cache when the shard is unchanged."""
    try:
        key = hashlib.sha256(f"kdcache-wds-index-v{INDEX_VERSION}\0{_stat_key(shard)}".encode()).hexdigest()
    except (OSError, FileNotFoundError) as e:
        raise KDCacheError(f"{where}: cannot open shard {printable(shard)} ({e}): check the path or URL") from None
    cached = index_dir() / f"{key}.npy"
    try:
        rows = np.load(cached, allow_pickle=False)
        if rows.ndim == 2 and rows.shape[1] == 3 and rows.dtype == np.int64:
            return rows
    except (OSError, ValueError):
        pass
    rows = _scan(shard, where)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, rows, allow_pickle=False)
        os.replace(tmp, cached)
    except OSError:  # a read-only home: index again next time
        pass
    return rows


def _class_names(shards: list[str], labels: np.ndarray) -> tuple[str, ...]:
    first = shards[0]
    sep = first.rfind("/")
    beside = (first[:sep + 1] if sep >= 0 else "") + "classes.txt"
    try:
        if is_url(beside):
            fs, p = fs_of(beside)
            text = fs.cat_file(p).decode("utf-8") if fs.exists(p) else None
        else:
            text = Path(beside).read_text("utf-8") if os.path.isfile(beside) else None
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None:
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
        if names:
            return names
    top = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    return tuple(str(i) for i in range(top))


class WebDatasetShards(SourceDataset):
    """WebDataset tar shards as a map-style dataset: ``ds[i]`` reads one image at its indexed offset."""

    def __init__(self, info: DatasetInfo, shards: list[str], index: np.ndarray, size: int):
        self.info, self.shards, self.size = info, list(shards), int(size)
        self.shard_of = np.ascontiguousarray(index[:, 0], dtype=np.int32)
        self.offsets = np.ascontiguousarray(index[:, 1], dtype=np.int64)
        self.sizes = np.ascontiguousarray(index[:, 2], dtype=np.int64)
        self.labels = np.ascontiguousarray(index[:, 3], dtype=np.int64)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _read(self, i: int) -> bytes:
        s, off, n = int(self.shard_of[i]), int(self.offsets[i]), int(self.sizes[i])
        shard = self.shards[s]
        if os.getpid() != self._pid:  # a forked worker: remote clients are not fork-safe (local fds are, with pread)
            self._handles = {k: v for k, v in self._handles.items() if isinstance(v, int)}
            self._pid = os.getpid()
        try:
            if not is_url(shard):
                fd = self._handles.get(s)
                if fd is None:
                    if len(self._handles) >= 64:
                        os.close(self._handles.pop(next(iter(self._handles))))
                    fd = self._handles[s] = os.open(shard, os.O_RDONLY)
                data = os.pread(fd, n, off)
            else:  # one ranged request; the filesystem (per process) and its path of each shard are kept
                key = -1 - s
                if key not in self._handles:
                    self._handles[key] = fs_of(shard)
                fs, path = self._handles[key]
                data = fs.cat_file(path, start=off, end=off + n)
        except OSError as e:
            raise KDCacheError(f"{self.info.spec}: cannot read sample {i} from {printable(shard)} ({e}): check the "
                               "shard") from None
        if len(data) != n:
            raise KDCacheError(f"{self.info.spec}: shard {printable(shard)} changed since it was indexed (sample {i} "
                               "is cut short): open the dataset again")
        return data

    def _sample(self, i: int) -> Tensor:
        return decode_image(self._read(i), self.size, f"sample {i} of {printable(self.shards[self.shard_of[i]])}")

    def raw_bytes(self, i: int) -> bytes:
        return self._read(self._index(i))

    def __del__(self) -> None:
        for h in getattr(self, "_handles", {}).values():
            if isinstance(h, int):
                try:
                    os.close(h)
                except OSError:
                    pass


def open_wds(spec: str, pattern: str, split: str, size: int) -> WebDatasetShards:
    """``wds:PATTERN``'s ``split`` (see the module docstring)."""
    shards = shard_list(spec, pattern, split)
    parts = []
    for s, shard in enumerate(shards):
        rows = shard_index(shard, spec)
        parts.append(np.concatenate([np.full((len(rows), 1), s, np.int64), rows], axis=1))
    index = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    if not len(index):
        raise KDCacheError(f"{spec} ({split}): the shards hold no images: samples are members sharing a key, with "
                           f"an image ({', '.join(IMAGE_EXTS)}) and a .cls or .json label")
    labels = index[:, 3]
    names = _class_names(shards, labels)
    if not names:
        raise KDCacheError(f"{spec} ({split}): no sample has a label (.cls or .json) and there is no classes.txt "
                           "beside the shards: label the samples")
    if labels.max() >= len(names):
        raise KDCacheError(f"{spec} ({split}): label {int(labels.max())} but classes.txt names {len(names)} classes: "
                           "fix classes.txt or the labels")
    info = DatasetInfo(spec, split, len(names), names, (3, size, size))
    return WebDatasetShards(info, shards, index, size)
