"""Hugging Face causal LMs and tokenizers from a local directory (the `hf` extra), offline.

A tiny GPT-2 (one layer, 32 wide, 64 positions) and a small byte-level BPE tokenizer trained here on a few sentences
are saved with save_pretrained into a temporary directory: nothing is downloaded. The module is skipped when
transformers is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers (huggingface_hub reads it at import)
transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'kdcache[hf]'")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdcache.data.hftok import HFTokenizer, vocab_sha256  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.models.hf import HFCausalLM, build_hf, hf_identity, weight_files  # noqa: E402
from kdcache.models.registry import param_count  # noqa: E402

CONTEXT = 64
PAD = 20  # extra output rows in the padded model (as Qwen2 pads 151936 tokens to 152064)
TEXTS = [
    "the keys to the cabinet are on the table",
    "the key to the cabinets is on the table",
    "the authors that the guard likes write books",
    "a cat sat on the mat and the dogs ran in the park",
    "Born-again networks distil a model into itself, generation after generation.",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


def _save_model(path, vocab_size: int, seed: int, eos: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab_size, n_positions=CONTEXT,
                                     bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(config).eval()
    with _no_progress():
        model.save_pretrained(path)
    return model


class _no_progress:
    def __enter__(self):
        self.was = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.was:
            transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """dirs: 'tiny' (tokenizer + model of exactly its vocabulary), 'padded' (the same tokenizer, PAD more output
    rows), 'tok' (the tokenizer only); the reference models; V = the tokenizer's size."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    v = len(tok)
    dirs = {name: root / name for name in ("tiny", "padded", "tok")}
    for d in dirs.values():
        tok.save_pretrained(d)
    ref = _save_model(dirs["tiny"], v, seed=0, eos=tok.eos_token_id)
    padded = _save_model(dirs["padded"], v + PAD, seed=1, eos=tok.eos_token_id)
    return {"root": root, "dirs": {k: str(d) for k, d in dirs.items()}, "tok": tok, "V": v, "ref": ref,
            "padded": padded}


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def _ids(hf, batch=2, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf["V"], (batch, length), generator=g)


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_tokenizer_identity_is_the_vocabulary(hf, tmp_path):
    t = HFTokenizer(hf["dirs"]["tiny"])
    pairs = sorted(hf["tok"].get_vocab().items())
    expect = hashlib.sha256(json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
    assert t.vocab == {"name": "tiny", "size": hf["V"], "sha256": expect}
    assert len(t) == hf["V"] == len(hf["tok"].get_vocab())
    json.dumps(t.vocab)  # recorded in cache attributes as it is
    # stable across loads and places: another load, and a copy elsewhere under the same name
    assert HFTokenizer(hf["dirs"]["tiny"]).vocab == t.vocab
    copy = shutil.copytree(hf["dirs"]["tok"], tmp_path / "tiny")
    assert HFTokenizer(str(copy)).vocab == t.vocab
    assert HFTokenizer(hf["dirs"]["tok"]).vocab["sha256"] == t.vocab["sha256"]


def test_tokenizer_identity_changes_with_one_vocabulary_entry(hf, tmp_path):
    before = HFTokenizer(hf["dirs"]["tok"]).vocab
    changed = shutil.copytree(hf["dirs"]["tok"], tmp_path / "tok")
    spec = json.loads((changed / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"  # two byte tokens trade ids: same size, same tokens, other ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (changed / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    after = HFTokenizer(str(changed)).vocab
    assert after["size"] == before["size"] and after["sha256"] != before["sha256"]
    # an added token changes size and hash
    tok = transformers.AutoTokenizer.from_pretrained(hf["dirs"]["tok"], local_files_only=True)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(tmp_path / "added")
    added = HFTokenizer(str(tmp_path / "added")).vocab
    assert added["size"] == before["size"] + 1 and added["sha256"] != before["sha256"]
    assert vocab_sha256({"x": 0, "y": 1}) != vocab_sha256({"x": 1, "y": 0})


def test_encode_matches_the_tokenizer_without_special_tokens(hf):
    t = HFTokenizer(hf["dirs"]["tiny"])
    for text in [*TEXTS, "", "unseen wörds ✓ and\nnew lines", " ".join(TEXTS) * 20]:
        ids = t.encode(text)
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert ids.tolist() == hf["tok"](text, add_special_tokens=False)["input_ids"]
        assert hf["tok"].decode(ids.tolist()) == text
    assert hf["tok"].eos_token_id not in t.encode(TEXTS[0]).tolist()
    assert int(t.encode(" ".join(TEXTS)).max()) < t.vocab["size"]


def test_tokenizer_errors_are_one_line(hf, tmp_path, monkeypatch):
    with pytest.raises(KDCacheError, match="not found") as e:
        HFTokenizer(str(tmp_path / "nowhere"))
    _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDCacheError, match="not a Hugging Face tokenizer directory") as e:
        HFTokenizer(str(tmp_path / "empty"))
    _one_line(e)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KDCacheError, match="not a directory") as e:
        HFTokenizer(str(tmp_path / "file"))
    _one_line(e)
    with pytest.raises(KDCacheError, match="takes text"):
        HFTokenizer(hf["dirs"]["tok"]).encode(b"bytes")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(KDCacheError, match=r"pip install 'kdcache\[hf\]'") as e:
        HFTokenizer(hf["dirs"]["tok"])
    _one_line(e)


# --- models ------------------------------------------------------------------------------------------------------


def test_build_hf_gives_the_models_own_logits(hf):
    v = hf["V"]
    model = build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(CONTEXT,), vocab_size=v)
    assert isinstance(model, torch.nn.Module) and isinstance(model, HFCausalLM)
    assert model.num_classes == v and model.context == CONTEXT and model.output_size == v
    assert not model.training
    ids = _ids(hf)
    with torch.no_grad():
        got = model(ids)
        want = hf["ref"](ids).logits
    assert got.shape == (2, 16, v) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():  # the whole context fits
        assert model(_ids(hf, 1, CONTEXT)).shape == (1, CONTEXT, v)
    assert param_count(model) == param_count(hf["ref"])


def test_a_padded_output_layer_is_sliced_to_the_tokenizer(hf):
    v = hf["V"]
    model = build_hf(hf["dirs"]["padded"], num_classes=v, input_shape=(32,), vocab_size=v)
    assert model.output_size == v + PAD
    ids = _ids(hf, 3, 20, seed=1)
    with torch.no_grad():
        got = model(ids)
        full = hf["padded"](ids).logits
    assert full.shape[-1] == v + PAD
    assert got.shape == (3, 20, v) and got.is_contiguous()
    torch.testing.assert_close(got, full[..., :v], rtol=0, atol=1e-6)


def test_context_overflow_is_one_line(hf):
    v = hf["V"]
    with pytest.raises(KDCacheError, match=f"longer than the context.*{CONTEXT} positions") as e:
        build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(CONTEXT + 1,), vocab_size=v)
    _one_line(e)
    model = build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(8,), vocab_size=v)
    with pytest.raises(KDCacheError, match="longer than the context") as e, torch.no_grad():
        model(_ids(hf, 1, CONTEXT + 1))
    _one_line(e)
    with pytest.raises(KDCacheError, match=r"inputs of shape \(L,\)") as e:
        build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(3, 8, 8), vocab_size=v)
    _one_line(e)


def test_a_model_smaller_than_the_vocabulary_is_refused(hf):
    v = hf["V"]
    with pytest.raises(KDCacheError, match=f"outputs {v} logits per token but the vocabulary has {v + 1}") as e:
        build_hf(hf["dirs"]["tiny"], num_classes=v + 1, input_shape=(8,), vocab_size=v)
    _one_line(e)
    with pytest.raises(KDCacheError, match=f"embeds {v} token ids but the data's vocabulary has {v + 5}") as e:
        build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(8,), vocab_size=v + 5)
    _one_line(e)


def test_model_directory_errors_are_one_line(hf, tmp_path, monkeypatch):
    v = hf["V"]
    cases = {"nowhere": "not found", "tok": "no config.json"}
    for name, pattern in cases.items():
        path = hf["dirs"].get(name, str(tmp_path / name))
        with pytest.raises(KDCacheError, match=pattern) as e:
            build_hf(path, num_classes=v, input_shape=(8,), vocab_size=v)
        _one_line(e)
    no_weights = shutil.copytree(hf["dirs"]["tiny"], tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(KDCacheError, match="holds no weights") as e:
        build_hf(str(no_weights), num_classes=v, input_shape=(8,), vocab_size=v)
    _one_line(e)
    lfs = shutil.copytree(hf["dirs"]["tiny"], tmp_path / "lfs")
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(KDCacheError, match="Git LFS pointer") as e:
        build_hf(str(lfs), num_classes=v, input_shape=(8,), vocab_size=v)
    _one_line(e)
    alien = shutil.copytree(hf["dirs"]["tiny"], tmp_path / "alien")
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-model", "auto_map": {}}))
    with pytest.raises(KDCacheError, match="cannot read the config") as e:
        build_hf(str(alien), num_classes=v, input_shape=(8,), vocab_size=v)
    _one_line(e)
    with pytest.raises(KDCacheError, match="dtype") as e:
        build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(8,), vocab_size=v, dtype="float8")
    _one_line(e)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(KDCacheError, match=r"pip install 'kdcache\[hf\]'") as e:
        build_hf(hf["dirs"]["tiny"], num_classes=v, input_shape=(8,), vocab_size=v)
    _one_line(e)


def test_partial_weights_are_refused_not_initialised_at_random(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = shutil.copytree(hf["dirs"]["tiny"], tmp_path / "partial")
    state = load_file(partial / "model.safetensors")
    dropped = sorted(k for k in state if k.endswith("mlp.c_fc.weight"))
    assert dropped
    save_file({k: t for k, t in state.items() if k not in dropped}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(KDCacheError, match="lack 1 of the model's tensors") as e:
        build_hf(str(partial), num_classes=hf["V"], input_shape=(8,), vocab_size=hf["V"])
    _one_line(e)


def test_hf_identity_hashes_the_weight_files(hf, tmp_path):
    tiny = hf["dirs"]["tiny"]
    ident = hf_identity(tiny)
    weights = os.path.join(tiny, "model.safetensors")
    assert ident == {"source": "hf", "path": tiny, "sha256": hashlib.sha256(open(weights, "rb").read()).hexdigest(),
                     "params": param_count(hf["ref"]), "files": ["model.safetensors"]}
    json.dumps(ident)
    built = build_hf(tiny, num_classes=hf["V"], input_shape=(8,), vocab_size=hf["V"])
    assert hf_identity(tiny, built)["params"] == ident["params"]
    # a copy is the same weights; other weights (another seed) are not; the tokenizer files do not count
    copy = shutil.copytree(tiny, tmp_path / "copy")
    assert hf_identity(str(copy))["sha256"] == ident["sha256"]
    (copy / "tokenizer_config.json").write_text("{}")
    assert hf_identity(str(copy))["sha256"] == ident["sha256"]
    other = shutil.copytree(tiny, tmp_path / "other")
    _save_model(other, hf["V"], seed=7, eos=hf["tok"].eos_token_id)
    assert hf_identity(str(other))["sha256"] != ident["sha256"]
    with pytest.raises(KDCacheError, match="not found"):
        hf_identity(str(tmp_path / "nowhere"))


def test_hf_identity_of_shards_and_torch_bin(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(hf["dirs"]["tiny"], "model.safetensors"))
    keys = sorted(state)
    shards, legacy = tmp_path / "shards", tmp_path / "bin"
    for d in (shards, legacy):
        d.mkdir()
        shutil.copy(os.path.join(hf["dirs"]["tiny"], "config.json"), d)
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, shards / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    ident = hf_identity(str(shards))
    assert ident["files"] == sorted(parts) and ident["params"] == param_count(hf["ref"])
    manifest = "".join(f"{hashlib.sha256((shards / n).read_bytes()).hexdigest()}  {n}\n" for n in sorted(parts))
    assert ident["sha256"] == hashlib.sha256(manifest.encode()).hexdigest()
    torch.save(dict(state), legacy / "pytorch_model.bin")
    bin_ident = hf_identity(str(legacy))
    assert bin_ident["files"] == ["pytorch_model.bin"] and bin_ident["params"] == param_count(hf["ref"])
    # the files hashed are the files transformers loads: both give the reference model's logits
    ids = _ids(hf, 1, 8)
    with torch.no_grad():
        want = hf["ref"](ids).logits
        for d in (shards, legacy):
            got = build_hf(str(d), num_classes=hf["V"], input_shape=(8,), vocab_size=hf["V"])(ids)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    os.remove(shards / "model-00002-of-00002.safetensors")
    with pytest.raises(KDCacheError, match="is missing"):
        weight_files(str(shards))


def test_hf_teacher_dump_and_gpt_nano_student_end_to_end(hf, tmp_path):
    """text tokenized by the hf tokenizer → an hf:DIR teacher's per-token top-k cache → a gpt_nano student."""
    import json

    from clitools import error_line, kd, kt, ok

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 40))
    teacher = f"hf:{hf['dirs']['tiny']}"
    base = ["--dataset", f"text:{corpus}", "--seq-len", "16", "--device", "cpu", "--quiet"]
    ok(kd("dump", "--teacher", teacher, "--tokenizer", teacher, *base, "--topk", "8", "--out", tmp_path / "t.zarr"))
    attrs = json.loads((tmp_path / "t.zarr" / "zarr.json").read_text())["attributes"]["kdcache"]
    assert attrs["teacher"]["weights"]["source"] == "hf" and attrs["dataset"]["vocab"]["size"] == hf["V"]
    assert attrs["positions"] == 16 and attrs["value_dtype"] == "q8"
    ok(kt("--cache", tmp_path / "t.zarr", "--dataset", f"text:{corpus}", "--student", "gpt_nano", "--student-arg",
          "dim=32", "--student-arg", "depth=1", "--epochs", "1", *base[4:], "--no-plots", "--out", tmp_path / "s"))
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["final"]["test_ppl"] > 1 and m["teachers"][0]["name"] == teacher
    line = error_line(kd("dump", "--teacher", teacher, *base, "--out", tmp_path / "bytes.zarr"))  # byte-tokenized
    assert "was saved with the tokenizer" in line and f"--tokenizer {teacher}" in line
