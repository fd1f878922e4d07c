"""The built-in subject-verb agreement dataset (kdcache.data.agreement)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from kdcache.data import agreement as ag
from kdcache.data.datasets import dataset_names, fingerprint, identity, open_dataset
from kdcache.errors import KDCacheError


@pytest.fixture(scope="module")
def splits():
    return open_dataset("agreement", "train"), open_dataset("agreement", "test")


def _hash(ds) -> str:
    h = hashlib.sha256()
    for a in (ds.data, ds.labels, ds.attractors):
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def test_info_items_and_registration(splits):
    tr, te = splits
    assert "agreement" in dataset_names()
    assert len(tr) == 10_000 and len(te) == 3_000
    for ds in splits:
        info = ds.info
        assert info.kind == "tensor" and info.dtype == "int64" and info.sample_shape == (ag.SEQ_LEN,) == (23,)
        assert info.label_shape == () and not info.per_token
        assert info.num_classes == 2 and info.class_names == ("singular", "plural")
        assert info.vocab == ag.VOCAB
        x, y, i = ds[5]
        assert x.dtype == torch.int64 and x.shape == (23,) and isinstance(y, int) and i == 5
        assert y == int(ds.labels[5]) and np.array_equal(x.numpy(), ds.data[5])
        assert ds.raw_bytes(5) == ds.data[5].tobytes()
        assert ds.attractors.shape == ds.nouns.shape == ds.lengths.shape == (len(ds),)
    assert identity(te)["vocab"] == ag.VOCAB


def test_deterministic_and_pinned(splits):
    tr, te = splits
    ag._arrays.cache_clear()
    again = open_dataset("agreement", "test")
    assert np.array_equal(again.data, te.data) and np.array_equal(again.labels, te.labels)
    assert fingerprint(again) == fingerprint(te) != fingerprint(tr)
    # the generated data is part of a cache's identity: changing the grammar or the generator changes these
    assert _hash(te) == "588d0c8316cfa1df61c5a8c16beeca9bc332d95484f65de7db486992d4336227"
    assert _hash(tr) == "91e6203a852c0699d5dc1a11ac4e68f3021fd7e95c0aacad397ad5d27179aa6e"


def test_vocab_identity_is_stable():
    assert ag.WORDS[0] == "<pad>" and ag.PAD == 0 and len(set(ag.WORDS)) == len(ag.WORDS)
    assert ag.VOCAB == {"name": "agreement-v1", "size": 193,
                        "sha256": hashlib.sha256("\n".join(ag.WORDS).encode()).hexdigest()}
    assert ag.VOCAB["sha256"] == "d98875ecef8f01f3514478359ca0eb5f1670181da8fb95cd0dbc8afb3a26a1d4"


def test_labels_balanced_and_attractor_strata(splits):
    tr, te = splits
    for ds in splits:
        assert abs(ds.labels.mean() - 0.5) < 0.02
        for a in range(5):
            assert abs(ds.labels[ds.attractors == a].mean() - 0.5) < 0.02  # balanced within each stratum
    assert np.bincount(te.attractors, minlength=5).tolist() == [600] * 5
    assert np.bincount(tr.attractors, minlength=5).tolist() == [4500, 2500, 1500, 1000, 500]
    assert set(te.attractors.tolist()) == {0, 1, 2, 3, 4}
    assert (te.nouns >= te.attractors).all() and te.nouns.max() == 4


def test_attractor_counts_match_the_words(splits):
    for ds in splits:
        for i in range(len(ds)):
            subject, attractors = ag.count_attractors(ds.data[i])
            assert subject == ds.labels[i] and attractors == ds.attractors[i]
            assert int((ag.NOUN_NUMBER[ds.data[i]] >= 0).sum()) == ds.nouns[i] + 1


@pytest.mark.parametrize("i,sentence,attractors", [
    # checked by hand: the subject is the first noun; attractors are later nouns of the other number
    (0, "her poor bridge above my green cities [is]", 1),  # cities
    (1, "my broken cabinets [are]", 0),
    (6, "his birds like our tree below their strange women that liked my red painters that our red officers "
        "liked [are]", 1),  # tree
    (8, "his modern trees with her busy officers that called my blue song beside their old driver [are]", 2),
    (9, "her happy painter that your modern song trusted below our roads [is]", 1),  # roads
    (11, "their parent that his queens found that painted the tired stories that met the young box beside her "
         "picture [is]", 2),  # queens, stories
])
def test_hand_checked_sentences(splits, i, sentence, attractors):
    te = splits[1]
    assert te.sentence(i) == sentence and te.attractors[i] == attractors
    words = sentence.rsplit(" [", 1)[0]
    assert ag.count_attractors(ag.encode(words)) == (te.labels[i], attractors)


def test_left_padding_and_round_trip(splits):
    tr, _ = splits
    assert tr.lengths.max() == ag.SEQ_LEN and tr.lengths.min() >= 2
    for i in range(200):
        n = tr.lengths[i]
        row = tr.data[i]
        assert (row[:ag.SEQ_LEN - n] == ag.PAD).all() and (row[ag.SEQ_LEN - n:] != ag.PAD).all()
        assert np.array_equal(ag.encode(ag.decode(row)), row[ag.SEQ_LEN - n:])
    with pytest.raises(KDCacheError, match="not in the agreement vocabulary"):
        ag.encode("the zebra")


def test_test_sentences_are_not_training_sentences(splits):
    tr, te = splits
    seen = {r.tobytes() for r in tr.data}
    test_rows = [r.tobytes() for r in te.data]
    assert not seen.intersection(test_rows) and len(set(test_rows)) == len(test_rows)


def test_agreement_refuses_seq_len_and_tokenizer():
    with pytest.raises(KDCacheError, match="--seq-len applies"):
        open_dataset("agreement", "test", seq_len=23)
    with pytest.raises(KDCacheError, match="--tokenizer applies"):
        open_dataset("agreement", "test", tokenizer="bytes")
