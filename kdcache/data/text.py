"""Token sequences for language-model distillation: tokenizers, fixed-length windows over a flat token corpus, and
the ``text:PATH``, ``tokens:DIR`` and ``pydoc`` datasets.

**Windows and the position convention.**  A corpus is one flat array of token ids ``ids`` (in memory, or an
``np.memmap`` that is never read whole into memory).  With window length ``L`` (``--seq-len``) it is cut into
``N = (len(ids) - 1) // L`` non-overlapping windows: sample ``s`` is ``ids[s*L : s*L + L]`` and its labels are
``ids[s*L + 1 : s*L + L + 1]`` -- label ``j`` of sample ``s`` is the token that *follows* position ``j``, so the
last label of a window is the first token of the next window.  The trailing ``len(ids) - 1 - N*L`` ids that do not
fill a window are dropped.  ``labels`` is a zero-copy strided view over ``ids`` of shape ``(N, L)``.

**Tokenizers.**  The built-in tokenizer is byte-level: the UTF-8 bytes of the text are the token ids (vocabulary
size 256, nothing downloaded).  ``hf:DIR`` uses a Hugging Face tokenizer saved in a local folder through
:mod:`kdcache.data.hftok` (the ``hf`` extra).  A tokenizer has ``.vocab`` -- the vocabulary identity
``{"name", "size", "sha256"}`` that a cache records and checks -- and ``.encode(text) -> np.ndarray`` of ids.
The byte tokenizer's identity is ``{"name": "bytes", "size": 256, "sha256": sha256(bytes(range(256)))}``.

Datasets (``seq_len`` is required for all three):

``text:PATH``
    A UTF-8 text file, or a folder: every regular file under it (recursively, hidden files included), in the
    order of their paths relative to ``PATH`` (``/``-separated, sorted as strings), decoded and joined with one
    ``"\\n"``.  The text is tokenized once, whole.  **Split:** with ``n`` token ids and ``b = n - n // 10``,
    ``train`` is ``ids[:b]`` (the first 90 %) and ``test`` is ``ids[b:]`` (the last 10 %, rounded down); each is
    windowed separately, so no train label is a test token.  Both splits must hold at least ``L + 1`` ids.
``tokens:DIR``
    nanoGPT-style binary token files (as its ``prepare.py`` writes them): ``DIR/train.bin`` for ``train`` and
    ``DIR/val.bin`` (or ``DIR/test.bin``) for ``test``, flat little-endian unsigned ids read with ``np.memmap``.
    ``DIR/meta.json`` describes them: ``{"vocab_size": int, "dtype": "uint16" | "uint32" (default "uint16"),
    "tokenizer": optional name}``; other keys are allowed (e.g. nanoGPT's ``itos`` for a character vocabulary).
    nanoGPT's ``meta.pkl`` is never unpickled (a pickle can run code).  The vocabulary identity is
    ``{"name": meta["tokenizer"] or "tokens", "size": vocab_size, "sha256": sha256 of the canonical JSON of
    meta.json}`` where canonical JSON is ``json.dumps(meta, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` encoded as UTF-8, of the object exactly as written (defaults are not filled in), so
    put the vocabulary itself in meta.json when the hash should name it.
``pydoc``
    A real English corpus that ships with Python itself: the reference text of ``pydoc_data.topics.topics``
    (what ``help("if")`` shows; about 0.5 MB), its values joined in sorted key order with ``"\\n\\n"``, tokenized
    and split as ``text:``.  The text differs between Python versions; the dataset fingerprint records which.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from kdcache.data.sources import TENSOR, DatasetInfo, SourceDataset
from kdcache.errors import KDCacheError, printable

TEST_FRACTION_DIV = 10  # the test split is the last n // 10 token ids
TOKENS_DTYPES = ("uint16", "uint32")
BYTES_VOCAB = {"name": "bytes", "size": 256, "sha256": hashlib.sha256(bytes(range(256))).hexdigest()}
_CHECK_BLOCK = 1 << 24  # ids checked against the vocabulary this many at a time (bounded memory on a memmap)


# --------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab: dict

    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary size 256)."""

    vocab = BYTES_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Any) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


BYTE_TOKENIZER = ByteTokenizer()


def tokenizer_for(spec: Any = None) -> Tokenizer:
    """The tokenizer a ``--tokenizer`` value names: ``None``/``"bytes"`` the built-in byte tokenizer, ``"hf:DIR"``
    a Hugging Face tokenizer saved in DIR (:class:`kdcache.data.hftok.HFTokenizer`).  An object that already has
    ``.vocab`` and ``.encode`` is returned as is."""
    if spec is None:
        return BYTE_TOKENIZER
    if not isinstance(spec, str):
        if hasattr(spec, "encode") and isinstance(getattr(spec, "vocab", None), dict):
            return spec
        raise KDCacheError(f"tokenizer {type(spec).__name__} has no .vocab and .encode: pass bytes or hf:DIR")
    text = spec.strip()
    if text.lower() == "bytes":
        return BYTE_TOKENIZER
    if text.lower().startswith("hf:"):
        path = text[3:]
        if not path:
            raise KDCacheError("hf: needs a folder: use --tokenizer hf:/path/to/saved/tokenizer")
        try:
            hftok = importlib.import_module("kdcache.data.hftok")
            return hftok.HFTokenizer(path)
        except ImportError as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise KDCacheError(f"tokenizer {printable(spec)!r} needs Hugging Face transformers ({printable(why)}): "
                               "pip install 'kdcache[hf]'") from None
    raise KDCacheError(f"unknown tokenizer {printable(spec)!r}: use bytes (the default) or hf:DIR")


# --------------------------------------------------------------------------- windows


def _check_ids(ids: np.ndarray, size: int, where: str) -> None:
    """Every id in [0, size): one vectorised pass, in blocks so that a memmap is never copied whole."""
    info = np.iinfo(ids.dtype)
    if info.min >= 0 and info.max < size:
        return  # the dtype cannot hold a bad id
    for s in range(0, len(ids), _CHECK_BLOCK):
        block = np.asarray(ids[s:s + _CHECK_BLOCK])
        if len(block) and (block.max() >= size or block.min() < 0):
            k = int(np.flatnonzero((block >= size) | (block < 0))[0])
            v = int(block[k])
            what = "is negative" if v < 0 else f"is not below the vocabulary size {size}"
            raise KDCacheError(f"{where}: token id {v} at position {s + k} {what}: check the vocabulary size "
                               "(meta.json's vocab_size) or the tokenizer the ids came from")


class TokenWindows(SourceDataset):
    """A flat array of token ids cut into non-overlapping windows of ``seq_len`` for next-token prediction.

    ``ds[s]`` is ``(ids[s*L:s*L+L], ids[s*L+1:s*L+L+1], s)`` as int64 tensors (see the module docstring for the
    position convention).  ``ids`` may be any integer dtype, in memory or an ``np.memmap``; ``labels`` is a
    zero-copy read-only strided view over it.  ``raw_bytes(s)`` is the window's ids as stored plus the next one.
    """

    def __init__(self, spec: str, split: str, ids: np.ndarray, seq_len: int, vocab: dict):
        where = f"{printable(spec)} ({split})"
        if not isinstance(ids, np.ndarray):
            ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise KDCacheError(f"{where}: token ids must be a flat integer array, got {ids.dtype} of shape "
                               f"{ids.shape}")
        seq_len = check_seq_len(where, seq_len)
        if len(ids) < seq_len + 1:
            raise KDCacheError(f"{where}: {len(ids)} token ids; --seq-len {seq_len} needs at least {seq_len + 1}: "
                               "use a longer corpus or a smaller --seq-len")
        size = int(vocab["size"])
        _check_ids(ids, size, where)
        self.ids, self.seq_len, self.vocab = ids, seq_len, dict(vocab)
        self.labels = self._label_view()
        self.info = DatasetInfo(spec, split, size, (), (seq_len,), TENSOR, "int64", (seq_len,), self.vocab)

    def _label_view(self) -> np.ndarray:
        ids, L = self.ids, self.seq_len
        n = (len(ids) - 1) // L
        tail = ids[1:]
        st = ids.strides[0]
        return np.lib.stride_tricks.as_strided(tail, shape=(n, L), strides=(L * st, st), writeable=False)

    @property
    def num_tokens(self) -> int:
        """Token positions served: N * L."""
        return len(self) * self.seq_len

    def _sample(self, i: int) -> Tensor:
        a = i * self.seq_len
        return torch.from_numpy(np.array(self.ids[a:a + self.seq_len], dtype=np.int64))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        i = self._index(i)
        return self._sample(i), torch.from_numpy(np.array(self.labels[i], dtype=np.int64)), i

    def raw_bytes(self, i: int) -> bytes:
        a = self._index(i) * self.seq_len
        return np.ascontiguousarray(self.ids[a:a + self.seq_len + 1]).tobytes()

    # A memmap pickles as its whole contents: a whole-file memmap travels (to DataLoader workers) as its file.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("labels", None)
        ids = self.ids
        if isinstance(ids, np.memmap) and isinstance(ids.base, mmap.mmap) and getattr(ids, "filename", None):
            state["ids"] = ("memmap", ids.filename, ids.dtype.str, int(ids.offset), int(len(ids)))
        return state

    def __setstate__(self, state: dict) -> None:
        ids = state["ids"]
        if isinstance(ids, tuple) and ids and ids[0] == "memmap":
            _, fn, dt, off, n = ids
            state["ids"] = np.memmap(fn, dtype=np.dtype(dt), mode="r", offset=off, shape=(n,))
        self.__dict__.update(state)
        self.labels = self._label_view()


# --------------------------------------------------------------------------- datasets


def check_seq_len(spec: str, seq_len: Any) -> int:
    if seq_len is None:
        raise KDCacheError(f"{printable(spec)} needs --seq-len L (token positions per sample), e.g. --seq-len 128")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or int(seq_len) < 1:
        raise KDCacheError(f"--seq-len {printable(seq_len)} is not a positive integer: use e.g. --seq-len 128")
    return int(seq_len)


def _compact(ids: np.ndarray, size: int) -> np.ndarray:
    """Ids in the smallest unsigned dtype holding the vocabulary (memory; and labels never alias an int64 array)."""
    dt = np.uint8 if size <= 1 << 8 else np.uint16 if size <= 1 << 16 else np.uint32
    ids = np.asarray(ids)
    if ids.dtype == dt:
        return ids
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        return ids  # TokenWindows names the bad id
    return ids.astype(dt)


def text_split(ids: np.ndarray, split: str) -> np.ndarray:
    """``train``: the first ``n - n // 10`` ids; ``test``: the last ``n // 10``."""
    b = len(ids) - len(ids) // TEST_FRACTION_DIV
    return ids[:b] if split == "train" else ids[b:]


def _windows_from_text(spec: str, split: str, text: str, seq_len: int, tokenizer: Any, what: str) -> TokenWindows:
    tok = tokenizer_for(tokenizer)
    size = int(tok.vocab["size"])
    ids = _compact(tok.encode(text), size)
    n = len(ids)
    if n == 0:
        raise KDCacheError(f"{printable(spec)}: the corpus is empty ({what}): point it at non-empty UTF-8 text")
    for name in ("train", "test"):
        part = len(text_split(ids, name))
        if part < seq_len + 1:
            raise KDCacheError(f"{printable(spec)}: the {name} split has {part} token ids (of {n}; test is the last "
                               f"10%); --seq-len {seq_len} needs at least {seq_len + 1} in each: use a longer "
                               "corpus or a smaller --seq-len")
    return TokenWindows(spec, split, text_split(ids, split), seq_len, tok.vocab)


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        p = printable(path)
        raise KDCacheError(f"{p} is not UTF-8 text: byte offset {e.start} (0x{data[e.start]:02x}) is not valid "
                           f"UTF-8: convert it, e.g. iconv -f LATIN1 -t UTF-8 {p} > {p}.utf8, or remove it") from None


def read_text(spec: str, path_text: str) -> tuple[str, str]:
    """The text ``text:PATH`` names (a file, or a folder's files joined with "\\n") and a description of it."""
    if not path_text:
        raise KDCacheError("text: needs a path: use text:/path/to/corpus.txt or text:/path/to/folder")
    path = Path(os.path.expanduser(path_text))
    if path.is_file():
        files = [path]
    elif path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file()]
        files = sorted(found, key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise KDCacheError(f"{printable(spec)}: the corpus is empty (folder {printable(path)} holds no files): "
                               "put UTF-8 text files in it")
    else:
        raise KDCacheError(f"{printable(spec)}: {printable(path)} does not exist: pass a UTF-8 text file or a folder "
                           "of them")
    parts = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise KDCacheError(f"{printable(spec)}: cannot read {printable(f)} ({e.strerror}): fix its permissions "
                               "or remove it") from None
        parts.append(_decode_utf8(data, f))
    text = "\n".join(parts)
    what = f"0 bytes in {len(files)} file{'s' if len(files) != 1 else ''}"
    return text, what


def open_text(spec: str, path_text: str, split: str, seq_len: Any, tokenizer: Any = None) -> TokenWindows:
    seq_len = check_seq_len(spec, seq_len)
    text, what = read_text(spec, path_text)
    return _windows_from_text(spec, split, text, seq_len, tokenizer, what)


def pydoc_text() -> str:
    """The ``pydoc`` corpus: pydoc_data.topics.topics' values in sorted key order, joined with two newlines."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise KDCacheError("pydoc: this Python has no pydoc_data module (some distributions strip it): use "
                           "--dataset text:PATH with a text corpus of your own") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def open_pydoc(spec: str, split: str, seq_len: Any, tokenizer: Any = None) -> TokenWindows:
    seq_len = check_seq_len(spec, seq_len)
    return _windows_from_text(spec, split, pydoc_text(), seq_len, tokenizer, "pydoc_data.topics is empty")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_tokens_meta(spec: str, folder: Path) -> tuple[dict, dict]:
    """``(meta, vocab identity)`` from ``folder/meta.json``."""
    mj = folder / "meta.json"
    example = '{"vocab_size": N, "dtype": "uint16"}'
    if not mj.is_file():
        pkl = " (its meta.pkl is never unpickled: a pickle can run code)" if (folder / "meta.pkl").exists() else ""
        raise KDCacheError(f"{printable(spec)}: no meta.json in {printable(folder)}{pkl}: write "
                           f"{printable(mj)} with {example} (vocab_size 50257 for GPT-2 BPE ids; dtype uint32 when "
                           "vocab_size > 65536)")
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KDCacheError(f"{printable(mj)} is not valid JSON ({printable(str(e).splitlines()[0])}): write it as "
                           f"{example}") from None
    if not isinstance(meta, dict):
        raise KDCacheError(f"{printable(mj)} is not a JSON object: write it as {example}")
    size = meta.get("vocab_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KDCacheError(f"{printable(mj)}: vocab_size {printable(size)} is not a positive integer: write it as "
                           f"{example}")
    dtype = meta.get("dtype", "uint16")
    if dtype not in TOKENS_DTYPES:
        raise KDCacheError(f"{printable(mj)}: dtype {printable(dtype)} is not one of {', '.join(TOKENS_DTYPES)}: "
                           "give the dtype the .bin files were written with")
    if size > np.iinfo(np.dtype(dtype)).max + 1:
        raise KDCacheError(f"{printable(mj)}: vocab_size {size} does not fit {dtype}: set \"dtype\": \"uint32\" "
                           "(and write the .bin files as uint32)")
    name = meta.get("tokenizer")
    if name is not None and (not isinstance(name, str) or not name):
        raise KDCacheError(f"{printable(mj)}: tokenizer {printable(name)} is not a name: make it a string such as "
                           "\"gpt2\", or leave it out")
    vocab = {"name": name or "tokens", "size": size, "sha256": hashlib.sha256(canonical_json(meta)).hexdigest()}
    return meta, vocab


def open_tokens(spec: str, dir_text: str, split: str, seq_len: Any) -> TokenWindows:
    seq_len = check_seq_len(spec, seq_len)
    if not dir_text:
        raise KDCacheError("tokens: needs a folder: use tokens:/path/to/dir holding train.bin, val.bin, meta.json")
    folder = Path(os.path.expanduser(dir_text))
    if not folder.is_dir():
        raise KDCacheError(f"{printable(spec)}: folder {printable(folder)} does not exist: pass the folder holding "
                           "train.bin, val.bin and meta.json")
    meta, vocab = read_tokens_meta(spec, folder)
    names = ("train.bin",) if split == "train" else ("val.bin", "test.bin")
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is None:
        raise KDCacheError(f"{printable(spec)}: no {' or '.join(names)} in {printable(folder)} for the {split} "
                           "split: write it (flat token ids, as nanoGPT's prepare.py does)")
    dtype = np.dtype(meta.get("dtype", "uint16")).newbyteorder("<")
    nbytes = path.stat().st_size
    if nbytes % dtype.itemsize:
        raise KDCacheError(f"{printable(path)}: {nbytes} bytes is not a whole number of {dtype.name} ids: check "
                           "meta.json's dtype")
    n = nbytes // dtype.itemsize
    if n < seq_len + 1:
        raise KDCacheError(f"{printable(spec)}: {printable(path.name)} has {n} token ids; --seq-len {seq_len} needs "
                           f"at least {seq_len + 1}: use a longer corpus or a smaller --seq-len")
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    return TokenWindows(spec, split, ids, seq_len, vocab)
