"""Sequence models, timm-style tiny tests: shapes, causality, padding invariance, the context limit, vocabulary
plumbing, and that each can fit a tiny batch."""

from __future__ import annotations

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.models import build_model, param_count

V, L = 40, 10


def _ids(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gpt_nano", "lstm_lm"])
def test_language_models_are_causal(name):
    torch.manual_seed(0)
    model = build_model(name, V, (L,), vocab_size=V, dim=32, **({"depth": 2, "heads": 2} if name == "gpt_nano" else {}))
    model.eval()
    x = _ids()
    out = model(x)
    assert out.shape == (3, L, V)
    y = x.clone()
    y[:, 6] = (y[:, 6] % (V - 1)) + 1  # change token 6
    out2 = model(y)
    assert torch.allclose(out[:, :6], out2[:, :6], atol=1e-6)  # earlier positions never see it
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


@pytest.mark.parametrize("name", ["lstm_cls", "transformer_cls"])
def test_classifiers_ignore_padding_on_either_side(name):
    torch.manual_seed(0)
    model = build_model(name, 2, (L,), vocab_size=V, dim=32).eval()
    real = _ids(4)[:, :6]
    left = torch.cat([torch.zeros(4, L - 6, dtype=torch.long), real], 1)
    right = torch.cat([real, torch.zeros(4, L - 6, dtype=torch.long)], 1)
    out_l, out_r = model(left), model(right)
    assert out_l.shape == (4, 2)
    assert torch.allclose(out_l, out_r, atol=1e-5)
    shorter = torch.cat([torch.zeros(4, L - 5, dtype=torch.long), real[:, 1:]], 1)
    assert not torch.allclose(model(shorter), out_l)  # the tokens themselves do matter


def test_context_and_vocabulary_errors():
    with pytest.raises(KDCacheError, match="--seq-len 10 exceeds gpt_nano's context of 8"):
        build_model("gpt_nano", V, (L,), vocab_size=V, context=8)
    with pytest.raises(KDCacheError, match="declares no vocabulary"):
        build_model("lstm_cls", 2, (L,))
    with pytest.raises(KDCacheError, match="vocab_size is set by kdcache"):
        build_model("gpt_nano", V, (L,), {"vocab_size": 5}, vocab_size=V)
    with pytest.raises(KDCacheError, match=r"takes sequences of token ids \(inputs of shape \(L,\)\)"):
        build_model("gpt_nano", 10, (3, 8, 8))
    model = build_model("gpt_nano", V, (L,), vocab_size=V, context=16)
    with pytest.raises(KDCacheError, match="exceeds the model's context of 16"):
        model(torch.zeros(1, 20, dtype=torch.long))


def test_default_sizes_stay_small():
    assert param_count(build_model("gpt_nano", 256, (128,), vocab_size=256)) < 1_500_000
    assert param_count(build_model("lstm_lm", 256, (128,), vocab_size=256)) < 800_000
    assert param_count(build_model("transformer_cls", 2, (23,), vocab_size=200)) < 500_000
    gpt = build_model("gpt_nano", 256, (64,), vocab_size=256)
    assert gpt.head.weight is gpt.tok.weight  # tied when the outputs are the vocabulary


@pytest.mark.parametrize("name, classes", [("gpt_nano", V), ("lstm_lm", V), ("lstm_cls", 2), ("transformer_cls", 2)])
def test_each_model_fits_a_tiny_batch(name, classes):
    torch.manual_seed(0)
    model = build_model(name, classes, (L,), vocab_size=V, dim=32)
    x = _ids(8, seed=1)
    y = torch.randint(0, classes, (8, L) if classes == V else (8,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, classes), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_an_all_padding_row_gives_finite_logits_and_leaves_the_others_alone():
    torch.manual_seed(0)
    model = build_model("transformer_cls", 2, (L,), vocab_size=V, dim=32).eval()
    x = _ids(3)
    out = model(x)
    x2 = torch.cat([x, torch.zeros(1, L, dtype=torch.long)])
    out2 = model(x2)
    assert torch.isfinite(out2).all() and torch.allclose(out2[:3], out, atol=1e-5)


def test_a_factory_is_given_the_vocabulary_size(tmp_path, monkeypatch):
    (tmp_path / "vocabfac.py").write_text(
        "from torch import nn\n"
        "def emb(num_classes, vocab_size):\n"
        "    return nn.Sequential(nn.Embedding(vocab_size, 4), nn.Flatten(), nn.Linear(4 * 10, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("vocabfac:emb", 3, (L,), vocab_size=V)
    assert model[0].num_embeddings == V
    with pytest.raises(KDCacheError, match="declares no vocabulary"):
        build_model("vocabfac:emb", 3, (L,))
