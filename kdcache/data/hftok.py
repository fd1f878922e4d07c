"""Hugging Face tokenizers from a local directory (``hf:PATH``), through the optional ``hf`` extra.

``HFTokenizer(path)`` loads the *fast* tokenizer saved in ``path`` (``tokenizer.json`` + ``tokenizer_config.json``,
as ``save_pretrained`` writes them) without touching the network, and gives:

- ``.vocab``: the vocabulary's identity, ``{"name", "size", "sha256"}`` — the form `DatasetInfo.vocab` records.
  ``size`` is ``len(tokenizer)``, the true vocabulary *including added tokens*, not a model's padded embedding size;
  ``sha256`` hashes the canonical JSON of the sorted ``(token, id)`` pairs of ``get_vocab()`` (:func:`vocab_sha256`),
  so two directories with the same id → token mapping agree wherever they live, and renaming or renumbering one
  entry changes it. (It is the identity of the ids, not of the tokenisation rules: merges and normalisers are
  not hashed — the token ids a dataset yields are fingerprinted by the dataset itself.)
- ``.encode(text)``: int64 token ids, no special tokens added.

transformers/tokenizers are imported lazily, so this module costs nothing when the extra is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from kdcache.errors import KDCacheError, printable

INSTALL_HINT = "pip install 'kdcache[hf]'"


def _transformers() -> Any:
    """The transformers module, offline; a one-line KDCacheError when the extra is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # kdcache never downloads: a local directory or nothing
    try:
        import transformers
    except ImportError as e:
        raise KDCacheError(f"Hugging Face tokenizers need transformers ({e}): {INSTALL_HINT}") from None
    return transformers


def _first_line(e: BaseException) -> str:
    return printable((str(e).strip().splitlines() or [type(e).__name__])[0])


def vocab_sha256(vocab: dict[str, int]) -> str:
    """sha256 of the canonical JSON (UTF-8, no spaces) of the sorted ``[token, id]`` pairs of a vocabulary."""
    pairs = sorted((str(t), int(i)) for t, i in vocab.items())
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HFTokenizer:
    """The fast Hugging Face tokenizer saved in directory ``path`` (offline; ``local_files_only``)."""

    def __init__(self, path: str) -> None:
        path = os.fspath(path)
        if not os.path.isdir(path):
            what = "is a file, not a directory" if os.path.exists(path) else "not found"
            raise KDCacheError(f"tokenizer directory {printable(path)} {what}: pass hf:PATH to a directory written "
                               "by a tokenizer's save_pretrained (tokenizer.json, tokenizer_config.json)")
        transformers = _transformers()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True,
                                                             trust_remote_code=False)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a bad directory
            raise KDCacheError(f"{printable(path)} is not a Hugging Face tokenizer directory ({type(e).__name__}: "
                               f"{_first_line(e)}); save one there with tokenizer.save_pretrained") from None
        if not getattr(tok, "is_fast", False):
            raise KDCacheError(f"the tokenizer in {printable(path)} is a slow (Python) tokenizer "
                               f"({type(tok).__name__}): save a fast one (with tokenizer.json) there")
        self.path = path
        self.tokenizer = tok
        vocab = tok.get_vocab()
        name = os.path.basename(os.path.normpath(path)) or str(getattr(tok, "name_or_path", "") or path)
        self.vocab: dict[str, Any] = {"name": name, "size": int(len(tok)), "sha256": vocab_sha256(vocab)}
        top = max(vocab.values(), default=-1)
        if top >= self.vocab["size"]:  # ids must index 0..size-1, or a label would fall outside the classes
            raise KDCacheError(f"the tokenizer in {printable(path)} has token ids up to {top} but a size of "
                               f"{self.vocab['size']} (len(tokenizer)): fix its added tokens and re-save it")

    def __len__(self) -> int:
        return int(self.vocab["size"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, size={self.vocab['size']})"

    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text`` (int64, shape (n,)), with no special tokens (BOS/EOS) added."""
        if not isinstance(text, str):
            raise KDCacheError(f"HFTokenizer.encode takes text (str), not {type(text).__name__}: decode bytes first")
        # verbose=False: a corpus is longer than model_max_length by design; kdcache cuts it into --seq-len pieces
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64).reshape(-1)


def check_model_vocab(model: str, vocab: dict | None) -> None:
    """Refuse an `hf:DIR` model whose own saved tokenizer is not the vocabulary the data's ids index: its logits
    would be over other tokens (a teacher's cache, a student's loss, silently wrong)."""
    if not model.startswith("hf:") or vocab is None:
        return
    path = model[3:]
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return  # the folder holds a model only: nothing to compare against
    own = HFTokenizer(path).vocab
    if own["sha256"] != vocab.get("sha256") or own["size"] != vocab.get("size"):
        raise KDCacheError(f"{model} was saved with the tokenizer {own['name']} ({own['size']} tokens), but the data's "
                           f"ids index {vocab.get('name')} ({vocab.get('size')} tokens): tokenize the text with "
                           f"--tokenizer {model}")
