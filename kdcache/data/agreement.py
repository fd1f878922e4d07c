"""The built-in ``agreement`` dataset: synthetic subject-verb number agreement (Linzen et al. 2016), the task on
which Abnar et al. ("Distilling Inductive Biases") distil an LSTM's recurrent bias into a Transformer.

A sample is the word-id sequence of a sentence *up to its main verb* (the verb itself is not shown); the label is
the number the verb must take: 0 = singular ("is"), 1 = plural ("are") -- the number of the sentence's subject,
the first noun.  Nouns between the subject and the verb whose number differs from the subject's are *attractors*;
they are what makes the task hard for a model that guesses from the most recent noun.  ``ds.attractors[i]`` is
their count (0..4), so training code can report accuracy by number of attractors.

**Grammar** (every word of the prefix; ``( )`` optional with probability 1/2, ``|`` a uniform choice)::

    PREFIX   -> NP(subject) MOD^m                 m = 0..4 intervening nouns, one per modifier
    NP       -> DET (ADJ) NOUN                    NOUN singular or plural as the generator decides
    MOD      -> PREP NP                           "near the old cabinets"
              | "that" NP VERB_PAST               object relative clause: "that the boys saw"
              | "that" VERB_PAST NP               subject relative clause: "that saw the boys"

Each modifier attaches to the noun before it (right-branching), so "the key near the cabinets that the men saw"
has m = 2 intervening nouns.  Determiners (the, my, their, ...) and the past-tense verbs inside relative clauses
carry no number, so the nouns are the only number cues and the subject is the only one that decides the label.
Of the m intervening nouns, exactly ``a`` (the attractor count) have the opposite number to the subject, the
other ``m - a`` the subject's own; ``m`` is drawn uniformly from ``a..4`` and the attractor positions uniformly
among the m.  Every word is drawn uniformly from its class: 7 determiners, 32 adjectives, 60 nouns (each singular
and plural, a few irregular: man/men, child/children, mouse/mice, person/people), 12 prepositions, "that" and 20
past-tense verbs -- 193 words with ``<pad>``.  The longest prefix is 3 + 5 * 4 = 23 words (:data:`SEQ_LEN`).

**Encoding.** Word ids index :data:`WORDS` (id 0 = ``<pad>``); a sample is an int64 tensor of :data:`SEQ_LEN`
ids, **left-padded** with 0 so that the last position is always the word just before the verb (a causal model or
an RNN classifies from its final state).  ``ds.lengths`` holds the unpadded lengths.  The vocabulary identity is
``{"name": "agreement-v1", "size": len(WORDS), "sha256": sha256("\\n".join(WORDS) as UTF-8)}``.

**Splits** (fixed, deterministic): each split is drawn from its own ``random.Random`` seed (train 0, test 1),
using only ``random()``, whose stream Python keeps fixed across versions.  ``train``: 10 000 sentences with
attractor counts 0..4 in the proportions 45/25/15/10/5 % (4500, 2500, 1500, 1000, 500 -- skewed toward few
attractors, as in natural text); ``test``: 3000 sentences, 600 at each attractor count (stratified).  Within every
attractor count exactly half the subjects are plural, so labels are balanced overall and per stratum.  Sample
order is a seeded shuffle.  A test sentence never repeats a train sentence or an earlier test sentence (it is
redrawn); train sentences may repeat one another.
"""

from __future__ import annotations

import functools
import hashlib
import random

import numpy as np
import torch

from kdcache.data.sources import TENSOR, ArrayDataset, DatasetInfo
from kdcache.errors import KDCacheError

PAD = 0
MAX_NOUNS = 4  # intervening nouns (and so attractors) per sentence: 0..4
SEQ_LEN = 3 + 5 * MAX_NOUNS  # subject NP (<= 3 words) + up to 4 modifiers of <= 5 words
CLASS_NAMES = ("singular", "plural")
SEEDS = {"train": 0, "test": 1}
TRAIN_COUNTS = (4500, 2500, 1500, 1000, 500)  # samples with 0, 1, 2, 3, 4 attractors
TEST_COUNTS = (600, 600, 600, 600, 600)

DETERMINERS = ("the", "my", "your", "his", "her", "our", "their")
ADJECTIVES = (
    "old", "young", "tall", "small", "large", "famous", "quiet", "busy", "new", "red", "green", "blue", "happy",
    "angry", "clever", "strange", "friendly", "lonely", "brave", "polite", "rich", "poor", "tired", "noisy",
    "local", "foreign", "ancient", "modern", "broken", "beautiful", "careful", "curious",
)
NOUNS = (  # (singular, plural)
    ("author", "authors"), ("boy", "boys"), ("girl", "girls"), ("man", "men"), ("woman", "women"),
    ("child", "children"), ("teacher", "teachers"), ("student", "students"), ("doctor", "doctors"),
    ("farmer", "farmers"), ("pilot", "pilots"), ("senator", "senators"), ("lawyer", "lawyers"),
    ("driver", "drivers"), ("dancer", "dancers"), ("painter", "painters"), ("singer", "singers"),
    ("officer", "officers"), ("manager", "managers"), ("neighbour", "neighbours"), ("friend", "friends"),
    ("parent", "parents"), ("customer", "customers"), ("guest", "guests"), ("king", "kings"),
    ("queen", "queens"), ("person", "people"), ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"),
    ("bird", "birds"), ("mouse", "mice"), ("key", "keys"), ("book", "books"), ("table", "tables"),
    ("cabinet", "cabinets"), ("box", "boxes"), ("house", "houses"), ("car", "cars"), ("tree", "trees"),
    ("letter", "letters"), ("picture", "pictures"), ("report", "reports"), ("song", "songs"),
    ("city", "cities"), ("village", "villages"), ("church", "churches"), ("bridge", "bridges"),
    ("garden", "gardens"), ("window", "windows"), ("door", "doors"), ("road", "roads"),
    ("company", "companies"), ("committee", "committees"), ("story", "stories"), ("idea", "ideas"),
    ("machine", "machines"), ("computer", "computers"), ("bottle", "bottles"), ("lamp", "lamps"),
)
PREPOSITIONS = ("near", "behind", "beside", "with", "of", "from", "above", "below", "without", "like", "under",
                "around")
RELATIVE = "that"
VERBS_PAST = (
    "saw", "liked", "met", "praised", "visited", "admired", "helped", "found", "chose", "knew", "called",
    "painted", "watched", "followed", "remembered", "described", "ignored", "blamed", "trusted", "feared",
)

WORDS: tuple[str, ...] = ("<pad>", *DETERMINERS, *ADJECTIVES, *(s for s, _ in NOUNS), *(p for _, p in NOUNS),
                          *PREPOSITIONS, RELATIVE, *VERBS_PAST)
VOCAB = {"name": "agreement-v1", "size": len(WORDS),
         "sha256": hashlib.sha256("\n".join(WORDS).encode("utf-8")).hexdigest()}
_ID = {w: i for i, w in enumerate(WORDS)}
_DET = np.array([_ID[w] for w in DETERMINERS])
_ADJ = np.array([_ID[w] for w in ADJECTIVES])
_NOUN = np.array([[_ID[s] for s, _ in NOUNS], [_ID[p] for _, p in NOUNS]])  # [number, k]
_PREP = np.array([_ID[w] for w in PREPOSITIONS])
_VERB = np.array([_ID[w] for w in VERBS_PAST])
_THAT = _ID[RELATIVE]
NOUN_NUMBER = np.full(len(WORDS), -1, dtype=np.int64)  # per word id: 0 singular noun, 1 plural noun, -1 not a noun
NOUN_NUMBER[_NOUN[0]] = 0
NOUN_NUMBER[_NOUN[1]] = 1
assert len(set(WORDS)) == len(WORDS)


def encode(words: str | list[str]) -> np.ndarray:
    """Word ids of a space-separated prefix (or a list of words), unpadded."""
    ws = words.split() if isinstance(words, str) else list(words)
    try:
        return np.array([_ID[w] for w in ws], dtype=np.int64)
    except KeyError as e:
        raise KDCacheError(f"word {e.args[0]!r} is not in the agreement vocabulary: use words from "
                           "kdcache.data.agreement.WORDS") from None


def decode(ids) -> str:
    """The words of a sample (padding dropped), space-separated."""
    return " ".join(WORDS[int(i)] for i in np.asarray(ids).ravel() if int(i) != PAD)


def count_attractors(ids) -> tuple[int, int]:
    """``(subject number, attractors)`` of a prefix, read back from its words: the subject is the first noun, an
    attractor any later noun of the other number."""
    nums = NOUN_NUMBER[np.asarray(ids, dtype=np.int64).ravel()]
    nums = nums[nums >= 0]
    if not len(nums):
        raise ValueError("the prefix has no noun")
    return int(nums[0]), int((nums[1:] != nums[0]).sum())


def _below(rng: random.Random, n: int) -> int:
    """A uniform int in [0, n) from ``rng.random()`` alone -- the one method whose stream Python keeps fixed across
    versions (``randrange``/``shuffle`` may change)."""
    return min(int(rng.random() * n), n - 1)


def _permutation(rng: random.Random, n: int) -> list[int]:
    """Fisher-Yates on :func:`_below`."""
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _below(rng, i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def _np(rng: random.Random, number: int) -> list[int]:
    out = [int(_DET[_below(rng, len(_DET))])]
    if _below(rng, 2):
        out.append(int(_ADJ[_below(rng, len(_ADJ))]))
    out.append(int(_NOUN[number, _below(rng, _NOUN.shape[1])]))
    return out


def _sentence(rng: random.Random, subject: int, attractors: int) -> tuple[list[int], int]:
    m = attractors + _below(rng, MAX_NOUNS - attractors + 1)
    opposite = set(_permutation(rng, m)[:attractors])
    words = _np(rng, subject)
    for k in range(m):
        number = 1 - subject if k in opposite else subject
        kind = _below(rng, 3)
        noun_phrase = _np(rng, number)
        if kind == 0:
            words += [int(_PREP[_below(rng, len(_PREP))]), *noun_phrase]
        elif kind == 1:
            words += [_THAT, *noun_phrase, int(_VERB[_below(rng, len(_VERB))])]
        else:
            words += [_THAT, int(_VERB[_below(rng, len(_VERB))]), *noun_phrase]
    return words, m


def _generate(split: str, counts: tuple[int, ...], avoid: frozenset) -> dict:
    rng = random.Random(SEEDS[split])
    plan = [(a, label) for a, c in enumerate(counts) for label in (0, 1) for _ in range(c // 2)]
    plan = [plan[k] for k in _permutation(rng, len(plan))]
    n = len(plan)
    data = np.zeros((n, SEQ_LEN), dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    attractors = np.empty(n, dtype=np.int64)
    nouns = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    seen = set(avoid)
    for i, (a, label) in enumerate(plan):
        while True:
            words, m = _sentence(rng, label, a)
            key = tuple(words)
            if key not in seen:
                break
        if split != "train":
            seen.add(key)
        data[i, SEQ_LEN - len(words):] = words  # left padding
        labels[i], attractors[i], nouns[i], lengths[i] = label, a, m, len(words)
    out = {"data": data, "labels": labels, "attractors": attractors, "nouns": nouns, "lengths": lengths}
    for v in out.values():
        v.setflags(write=False)
    return out


@functools.lru_cache(maxsize=2)
def _arrays(split: str) -> dict:
    if split == "train":
        return _generate("train", TRAIN_COUNTS, frozenset())
    train = _arrays("train")
    avoid = frozenset(tuple(int(w) for w in row[SEQ_LEN - n:]) for row, n in zip(train["data"], train["lengths"]))
    return _generate("test", TEST_COUNTS, avoid)


class AgreementDataset(ArrayDataset):
    """The agreement split: ``(ids, verb number, i)`` plus ``attractors``, ``nouns`` (intervening nouns) and
    ``lengths`` (unpadded) per sample."""

    def __init__(self, spec: str, split: str):
        a = _arrays(split)
        info = DatasetInfo(spec, split, 2, CLASS_NAMES, (SEQ_LEN,), TENSOR, "int64", (), dict(VOCAB))
        super().__init__(info, a["data"], a["labels"], "N")
        self.attractors, self.nouns, self.lengths = a["attractors"], a["nouns"], a["lengths"]

    def _sample(self, i: int):
        return torch.from_numpy(self.data[i].copy())  # the shared arrays are read-only

    @property
    def groups(self) -> tuple[str, np.ndarray]:
        """What evaluation reports accuracy by: the number of attractors of each sample."""
        return "attractors", self.attractors

    def sentence(self, i: int) -> str:
        """The prefix with its verb: e.g. 'the keys near the cabinet [are]'."""
        i = self._index(i)
        return f"{decode(self.data[i])} [{('is', 'are')[int(self.labels[i])]}]"


def open_agreement(spec: str, split: str) -> AgreementDataset:
    return AgreementDataset(spec, split)
