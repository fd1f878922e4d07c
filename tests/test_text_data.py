"""Token-sequence datasets: text:PATH, tokens:DIR, pydoc, TokenWindows and tokenizers (kdcache.data.text)."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from kdcache.data.datasets import dataset_names, fingerprint, identity, open_dataset
from kdcache.data.text import BYTES_VOCAB, TokenWindows, canonical_json, pydoc_text, tokenizer_for
from kdcache.errors import KDCacheError

VOCAB16 = {"name": "t", "size": 1000, "sha256": "0" * 64}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _corpus(tmp_path, text="hello world, this is a small corpus of text. " * 20, name="c.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_windows_shapes_and_position_convention(dtype):
    ids = (np.arange(103) % 251).astype(dtype)
    ds = TokenWindows("x", "train", ids, 10, {"name": "n", "size": 256, "sha256": "0" * 64})
    assert len(ds) == (103 - 1) // 10 == 10 and ds.num_tokens == 100
    assert ds.labels.shape == (10, 10)
    info = ds.info
    assert info.kind == "tensor" and info.sample_shape == (10,) and info.dtype == "int64"
    assert info.label_shape == (10,) and info.per_token and info.num_classes == 256 and info.class_names == ()
    samples = np.stack([ds[s][0].numpy() for s in range(len(ds))])
    for s in range(len(ds)):
        x, y, i = ds[s]
        assert i == s and x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == y.shape == (10,)
        assert np.array_equal(x.numpy(), ids[s * 10:s * 10 + 10])
        assert np.array_equal(y.numpy(), ds.labels[s])
        # label j is the token that follows position j
        assert np.array_equal(ds.labels[s, :-1], samples[s, 1:])
        if s + 1 < len(ds):
            assert ds.labels[s, -1] == samples[s + 1, 0]
        else:
            assert ds.labels[s, -1] == ids[len(ds) * 10]
        assert ds.raw_bytes(s) == np.ascontiguousarray(ids[s * 10:s * 10 + 11]).tobytes()
    assert not ds.labels.flags.writeable


def test_windows_labels_are_a_zero_copy_view_of_a_memmap(tmp_path):
    path = tmp_path / "t.bin"
    (np.arange(5001) % 997).astype(np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    ds = TokenWindows("x", "train", mm, 50, VOCAB16)
    assert np.shares_memory(ds.labels, mm) and ds.ids is mm
    assert ds.labels.shape == (100, 50) and ds.labels[99, 49] == mm[5000]
    # pickled (for DataLoader workers) as the file, not its contents; reopened identical
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    ds2 = pickle.loads(blob)
    assert isinstance(ds2.ids, np.memmap) and np.shares_memory(ds2.labels, ds2.ids)
    assert np.array_equal(ds2.labels, ds.labels) and fingerprint(ds2) == fingerprint(ds)


def test_windows_reject_ids_outside_the_vocabulary():
    ids = np.zeros(40, dtype=np.int64)
    ids[17] = 300
    with pytest.raises(KDCacheError, match="token id 300 at position 17 is not below the vocabulary size 256") as e:
        TokenWindows("x", "train", ids, 8, BYTES_VOCAB)
    _one_line(e)
    ids[17] = -2
    with pytest.raises(KDCacheError, match="token id -2 at position 17 is negative"):
        TokenWindows("x", "train", ids, 8, BYTES_VOCAB)
    with pytest.raises(KDCacheError, match="needs at least 9"):
        TokenWindows("x", "train", np.zeros(8, np.uint8), 8, BYTES_VOCAB)


# --------------------------------------------------------------------------- text:PATH


def test_text_file_split_and_determinism(tmp_path):
    text = "".join(f"line {k}: the quick brown fox jumps over the lazy dog\n" for k in range(50))
    p = _corpus(tmp_path, text)
    data = text.encode()
    n = len(data)
    b = n - n // 10
    tr = open_dataset(f"text:{p}", "train", seq_len=32)
    te = open_dataset(f"text:{p}", "test", seq_len=32)
    assert len(tr) == (b - 1) // 32 and len(te) == (n - b - 1) // 32
    assert tr.info.vocab == BYTES_VOCAB == {"name": "bytes", "size": 256,
                                            "sha256": hashlib.sha256(bytes(range(256))).hexdigest()}
    assert bytes(tr.ids) == data[:b] and bytes(te.ids) == data[b:]
    assert bytes(tr[0][0].numpy().astype(np.uint8)) == data[:32]
    assert bytes(te[0][1].numpy().astype(np.uint8)) == data[b + 1:b + 33]
    again = open_dataset(f"text:{p}", "train", seq_len=32)
    assert fingerprint(again) == fingerprint(tr) != fingerprint(te)
    assert identity(tr)["vocab"] == BYTES_VOCAB
    assert fingerprint(open_dataset(f"text:{p}", "train", seq_len=16)) != fingerprint(tr)
    assert fingerprint(open_dataset(f"text:{p}", "train", seq_len=32, tokenizer="bytes")) == fingerprint(tr)


def test_text_folder_joins_sorted_files_with_newlines(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "x.txt").write_text("second " * 40)
    (d / "a.txt").write_text("first " * 40)
    (d / "c.md").write_text("third é " * 40)
    ds = open_dataset(f"text:{d}", "train", seq_len=8)
    whole = ("first " * 40 + "\n" + "second " * 40 + "\n" + "third é " * 40).encode()
    assert bytes(ds.ids) == whole[:len(whole) - len(whole) // 10]


def test_text_not_utf8_names_the_file_and_byte_offset(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("fine text " * 10)
    (d / "b.txt").write_bytes(b"caf\xc3\xa9 ok, then latin-1: caf\xe9 here")
    with pytest.raises(KDCacheError) as e:
        open_dataset(f"text:{d}", "train", seq_len=4)
    msg = _one_line(e)
    assert "b.txt" in msg and "byte offset 27" in msg and "0xe9" in msg and "iconv" in msg


def test_text_errors(tmp_path):
    with pytest.raises(KDCacheError, match="does not exist") as e:
        open_dataset(f"text:{tmp_path / 'nope.txt'}", "train", seq_len=4)
    _one_line(e)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(KDCacheError, match="corpus is empty") as e:
        open_dataset(f"text:{empty}", "train", seq_len=4)
    _one_line(e)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(KDCacheError, match="corpus is empty"):
        open_dataset(f"text:{tmp_path / 'emptydir'}", "test", seq_len=4)
    short = _corpus(tmp_path, "x" * 200, "short.txt")  # test split: 20 ids
    assert len(open_dataset(f"text:{short}", "test", seq_len=19)) == 1
    with pytest.raises(KDCacheError, match=r"test split has 20 token ids .*--seq-len 20 needs at least 21") as e:
        open_dataset(f"text:{short}", "train", seq_len=20)  # the test split is checked for train too
    _one_line(e)
    with pytest.raises(KDCacheError, match="needs --seq-len"):
        open_dataset(f"text:{short}", "train")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(KDCacheError, match="not a positive integer"):
            open_dataset(f"text:{short}", "train", seq_len=bad)
    with pytest.raises(KDCacheError, match="needs a path"):
        open_dataset("text:", "train", seq_len=4)
    with pytest.raises(KDCacheError, match="unknown tokenizer"):
        open_dataset(f"text:{short}", "train", seq_len=4, tokenizer="sentencepiece")


def test_tokenizers():
    tok = tokenizer_for(None)
    assert tokenizer_for("bytes") is tok and tokenizer_for(tok) is tok
    ids = tok.encode("héllo")
    assert ids.dtype == np.uint8 and ids.tolist() == list("héllo".encode()) and tok.decode(ids) == "héllo"
    assert tok.vocab == BYTES_VOCAB


def test_hf_tokenizer_missing_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kdcache.data.hftok", None)  # importing it now raises ImportError
    with pytest.raises(KDCacheError, match=r"pip install 'kdcache\[hf\]'") as e:
        tokenizer_for("hf:/some/dir")
    _one_line(e)
    with pytest.raises(KDCacheError, match="needs a folder"):
        tokenizer_for("hf:")


# --------------------------------------------------------------------------- tokens:DIR


def _tokens_dir(tmp_path, dtype="uint16", vocab_size=1000, n_train=4001, n_val=801, meta=True, val_name="val.bin"):
    d = tmp_path / f"tok_{dtype}"
    d.mkdir()
    rng = np.random.RandomState(0)
    rng.randint(0, vocab_size, n_train).astype(dtype).tofile(d / "train.bin")
    rng.randint(0, vocab_size, n_val).astype(dtype).tofile(d / val_name)
    if meta:
        m = {"vocab_size": vocab_size, "dtype": dtype} if meta is True else meta
        (d / "meta.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize("dtype,vocab_size", [("uint16", 1000), ("uint32", 70000)])
def test_tokens_dir(tmp_path, dtype, vocab_size):
    d = _tokens_dir(tmp_path, dtype, vocab_size)
    tr = open_dataset(f"tokens:{d}", "train", seq_len=64)
    te = open_dataset(f"tokens:{d}", "test", seq_len=64)
    raw = np.fromfile(d / "train.bin", dtype=dtype)
    assert isinstance(tr.ids, np.memmap) and tr.ids.dtype == np.dtype(dtype)
    assert np.shares_memory(tr.labels, tr.ids)
    assert len(tr) == 4000 // 64 and len(te) == 800 // 64
    x, y, _ = tr[3]
    assert np.array_equal(x.numpy(), raw[192:256]) and np.array_equal(y.numpy(), raw[193:257])
    meta = json.loads((d / "meta.json").read_text())
    assert tr.info.vocab == {"name": "tokens", "size": vocab_size,
                             "sha256": hashlib.sha256(canonical_json(meta)).hexdigest()}
    assert tr.info.num_classes == vocab_size and tr.info.class_names == ()
    assert fingerprint(open_dataset(f"tokens:{d}", "train", seq_len=64)) == fingerprint(tr)


def test_tokens_dir_meta_and_test_bin(tmp_path):
    d = _tokens_dir(tmp_path, meta={"vocab_size": 50257, "tokenizer": "gpt2"}, val_name="test.bin")
    te = open_dataset(f"tokens:{d}", "test", seq_len=16)
    assert te.info.vocab["name"] == "gpt2" and te.ids.dtype == np.uint16  # dtype defaults to uint16
    assert te.info.vocab["sha256"] == hashlib.sha256(b'{"tokenizer":"gpt2","vocab_size":50257}').hexdigest()


def test_tokens_dir_errors(tmp_path):
    d = _tokens_dir(tmp_path, meta=False)
    (d / "meta.pkl").write_bytes(b"\x80\x04not really")
    with pytest.raises(KDCacheError, match="no meta.json") as e:
        open_dataset(f"tokens:{d}", "train", seq_len=8)
    msg = _one_line(e)
    assert "meta.pkl is never unpickled" in msg and "vocab_size" in msg
    (d / "meta.json").write_text('{"vocab_size": 10}')
    with pytest.raises(KDCacheError, match=r"token id \d+ at position \d+ is not below the vocabulary size 10") as e:
        open_dataset(f"tokens:{d}", "train", seq_len=8)
    _one_line(e)
    (d / "meta.json").write_text('{"vocab_size": 1000, "dtype": "int8"}')
    with pytest.raises(KDCacheError, match="dtype"):
        open_dataset(f"tokens:{d}", "train", seq_len=8)
    (d / "meta.json").write_text('{"vocab_size": 100000}')
    with pytest.raises(KDCacheError, match="does not fit uint16"):
        open_dataset(f"tokens:{d}", "train", seq_len=8)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(KDCacheError, match="not valid JSON"):
        open_dataset(f"tokens:{d}", "train", seq_len=8)
    (d / "meta.json").write_text('{"vocab_size": 1000}')
    with pytest.raises(KDCacheError, match="needs at least 1001"):
        open_dataset(f"tokens:{d}", "test", seq_len=1000)
    (d / "val.bin").unlink()
    with pytest.raises(KDCacheError, match="no val.bin or test.bin"):
        open_dataset(f"tokens:{d}", "test", seq_len=8)
    (d / "train.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(KDCacheError, match="not a whole number of uint16"):
        open_dataset(f"tokens:{d}", "train", seq_len=1)
    with pytest.raises(KDCacheError, match="does not exist"):
        open_dataset(f"tokens:{tmp_path / 'missing'}", "train", seq_len=8)
    with pytest.raises(KDCacheError, match="--tokenizer applies to text"):
        open_dataset(f"tokens:{d}", "train", seq_len=8, tokenizer="bytes")


# --------------------------------------------------------------------------- pydoc and registration


def test_pydoc_loads_offline_and_is_nontrivial():
    text = pydoc_text()
    assert len(text.encode()) > 100_000
    tr = open_dataset("pydoc", "train", seq_len=256)
    te = open_dataset("pydoc", "test", seq_len=256)
    n = len(text.encode())
    assert len(tr.ids) == n - n // 10 and len(te.ids) == n // 10
    assert len(tr) > 300 and len(te) > 30 and tr.info.vocab == BYTES_VOCAB
    assert "pydoc" in dataset_names()


def test_seq_len_and_tokenizer_are_refused_where_they_do_not_apply():
    with pytest.raises(KDCacheError, match="--seq-len applies to text/tokens datasets") as e:
        open_dataset("digits", "train", seq_len=8)
    _one_line(e)
    with pytest.raises(KDCacheError, match="--seq-len applies to text/tokens datasets"):
        open_dataset("agreement", "train", None, False, 8)
    with pytest.raises(KDCacheError, match="--tokenizer applies to text"):
        open_dataset("digits", "train", tokenizer="bytes")
    with pytest.raises(KDCacheError, match="needs --seq-len"):
        open_dataset("pydoc", "train")
    assert len(open_dataset("digits", "train", None, False, None, None)) == 1437  # positional, as before
