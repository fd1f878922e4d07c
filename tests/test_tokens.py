"""Token caches: one row per token position, the position convention, q8 values, and the per-token loss.

The dataset and teachers are plug-ins knowing nothing of kdcache (tests/tokenplug.py): sequences that count up,
a fixed "successor" teacher that predicts token + 1, and a learnable bigram student.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from clitools import assert_same_arrays, error_line, kd, kt, ok, read_plain

import tokenplug

DATA = "tokenplug:counting"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "successor.pt"
    torch.save(tokenplug.successor(tokenplug.VOCAB, (tokenplug.LENGTH,), tokenplug.VOCAB).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def dump(weights, tmp_path_factory):
    """dump(name, *extra) -> path of a token cache of the counting data by the successor teacher (memoised)."""
    root = tmp_path_factory.mktemp("tokcaches")
    made: dict[tuple, str] = {}

    def make(name: str, *extra) -> str:
        key = (name, *map(str, extra))
        if key not in made:
            out = root / name
            ok(kd("dump", "--teacher", "tokenplug:successor", "--weights", weights, "--dataset", DATA, "--device",
                  "cpu", "--quiet", "--out", out, *extra))
            made[key] = str(out)
        return made[key]

    return make


def _teacher_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = tokenplug.Counting("train")
    model = tokenplug.successor(tokenplug.VOCAB, (tokenplug.LENGTH,), tokenplug.VOCAB)
    with torch.no_grad():
        return model(ds.x), ds.x, ds.y


@pytest.mark.parametrize("dtype", ["float32", "float16", "q8"])
def test_stored_topk_is_the_teachers_at_every_position(dump, dtype):
    arrays, attrs = read_plain(dump(f"t-{dtype}.zarr", "--topk", 8, "--dtype", dtype))
    logits, x, y = _teacher_logits()
    vals, idx = logits.topk(8, dim=-1)
    tail = logits.scatter(-1, idx, float("-inf")).logsumexp(-1)
    assert attrs["positions"] == tokenplug.LENGTH and attrs["version"] == "3.0"
    assert arrays["indices"].shape == (len(x), 1, tokenplug.LENGTH, 8) and arrays["indices"].dtype == np.uint16
    assert np.array_equal(arrays["indices"][:, 0], idx.numpy())
    np.testing.assert_allclose(arrays["tail"][:, 0], tail.numpy(), rtol=0, atol=1e-6)
    if dtype == "q8":
        top, codes = arrays["top"][:, 0], arrays["codes"][:, 0]
        got = np.concatenate([top[..., None], top[..., None] - np.cumsum(codes, -1, dtype=np.int32) / 16], -1)
        assert np.array_equal(top, vals[..., 0].numpy())  # the top logit is exact
        np.testing.assert_allclose(got, vals.numpy(), rtol=0, atol=1 / 32 + 1e-6)  # half a step
    else:
        np.testing.assert_allclose(arrays["values"][:, 0], vals.numpy(), rtol=1e-3 if dtype == "float16" else 0,
                                   atol=1e-2 if dtype == "float16" else 0)
    assert np.array_equal(arrays["labels"], y.numpy())


def test_row_j_is_the_distribution_over_the_token_after_position_j(dump):
    """The successor teacher is sure of token x[j] + 1 at position j: a cache shifted by one position either way
    would put x[j] or x[j] + 2 first."""
    arrays, _ = read_plain(dump("t-q8.zarr", "--topk", 8, "--dtype", "q8"))
    _, x, y = _teacher_logits()
    first = arrays["indices"][:, 0, :, 0].astype(np.int64)
    assert np.array_equal(first, ((x + 1) % tokenplug.VOCAB).numpy())
    valid = y.numpy() >= 0
    assert np.array_equal(first[valid], y.numpy()[valid])  # label j is the token that follows position j
    assert not np.array_equal(first[:, 1:], first[:, :-1])


def test_dtype_auto_is_q8_for_token_topk_and_float16_otherwise(dump):
    assert read_plain(dump("auto-top.zarr", "--topk", 8))[1]["value_dtype"] == "q8"
    assert read_plain(dump("auto-full.zarr"))[1]["value_dtype"] == "float16"


def test_padding_positions_carry_no_loss_and_no_statistics(dump):
    from kdcache.config import LossConfig
    from kdcache.train.objective import Objective
    from kdcache.train.losses import SoftTarget

    logits, x, y = _teacher_logits()
    heads = torch.randn(len(x), 1, tokenplug.LENGTH, tokenplug.VOCAB, requires_grad=True)
    target = SoftTarget(logits=logits, num_classes=tokenplug.VOCAB)
    obj = Objective(LossConfig("kd", 0.3, 2.0).resolve(1))
    loss = obj(heads, y, [target])
    loss.backward()
    g = heads.grad[:, 0]
    assert g[y < 0].abs().max() == 0 and g[y >= 0].abs().max() > 0
    attrs = read_plain(dump("t-q8.zarr", "--topk", 8, "--dtype", "q8"))[1]
    assert attrs["stats"]["teacher_top1"] == 1.0  # padding excluded from the count


def test_cached_per_token_kd_equals_online_kd(dump):
    """A float32 full-logit cache gives the loss and gradients of the teacher run online (within 1e-6)."""
    from kdcache.config import LossConfig
    from kdcache.io import open_cache
    from kdcache.train.batches import to_target
    from kdcache.train.losses import SoftTarget
    from kdcache.train.objective import Objective

    logits, x, y = _teacher_logits()
    idx = np.arange(0, 96, 3)
    with open_cache(dump("full32.zarr", "--dtype", "float32")) as cache:
        cached = to_target(cache.read(idx), tokenplug.VOCAB, torch.device("cpu"))
    online = SoftTarget(logits=logits[idx], num_classes=tokenplug.VOCAB)
    torch.manual_seed(0)
    student = torch.randn(len(idx), 1, tokenplug.LENGTH, tokenplug.VOCAB)
    obj = Objective(LossConfig("kd", 0.5, 4.0).resolve(1))
    grads, losses = [], []
    for target in (cached, online):
        h = student.clone().requires_grad_(True)
        loss = obj(h, y[idx], [target])
        loss.backward()
        grads.append(h.grad)
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-6
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=0)


def test_student_trains_from_a_token_cache_and_reports_perplexity(dump, tmp_path):
    import json

    cache = dump("t-q8.zarr", "--topk", 8, "--dtype", "q8")
    ok(kt("--cache", cache, "--dataset", DATA, "--student", "tokenplug:bigram", "--epochs", 20, "--lr", "0.05",
          "--batch-size", 32, "--device", "cpu", "--quiet", "--no-plots", "--out", tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    first, last = m["history"][0], m["final"]
    assert last["test_ppl"] < first["test_ppl"] and last["test_top1"] > 0.5  # next-token accuracy
    assert m["input"] == {"kind": "tensor", "shape": [tokenplug.LENGTH], "dtype": "int64"}


def test_token_caches_convert_pack_join_merge_verify(dump, tmp_path):
    whole = dump("t-q8-c16.zarr", "--topk", 8, "--dtype", "q8", "--chunk-rows", 16)
    ok(kd("convert", whole, tmp_path / "t.h5"))
    ok(kd("pack", tmp_path / "t.h5", tmp_path / "t.zip"))
    assert_same_arrays(read_plain(str(tmp_path / "t.zip"))[0], read_plain(whole)[0])
    parts = [dump(f"r{a}.zarr", "--topk", 8, "--dtype", "q8", "--chunk-rows", 16, "--rows", f"{a}:{b}")
             for a, b in ((0, 32), (32, 96))]
    ok(kd("join", *parts, "--out", tmp_path / "j.zarr"))
    assert_same_arrays(read_plain(str(tmp_path / "j.zarr"))[0], read_plain(whole)[0])
    ok(kd("merge", whole, dump("full16.zarr"), "--out", tmp_path / "m.zarr"))
    merged, attrs = read_plain(str(tmp_path / "m.zarr"))
    assert attrs["positions"] == tokenplug.LENGTH and merged["indices"].shape[2] == tokenplug.LENGTH
    for path in (whole, tmp_path / "t.h5", tmp_path / "j.zarr", tmp_path / "m.zarr"):
        assert "verified" in ok(kd("verify", path))
    assert "B/token" in ok(kd("info", whole))


def test_corrupt_q8_codes_are_caught(dump, tmp_path):
    import shutil

    path = shutil.copytree(dump("t-q8.zarr", "--topk", 8, "--dtype", "q8"), tmp_path / "bad.zarr")
    g = zarr.open_group(str(path), mode="r+")
    codes = g["codes"][...]
    codes[3, 0, 2, 1] ^= 7
    g["codes"][...] = codes
    r = kd("verify", path)
    assert r.exit_code == 1 and "checksum mismatch" in r.stderr


def test_another_vocabulary_is_refused(dump, tmp_path, monkeypatch):
    cache = dump("t-q8.zarr", "--topk", 8, "--dtype", "q8")
    monkeypatch.setattr(tokenplug.Counting, "vocab_size", 64)
    line = error_line(kt("--cache", cache, "--dataset", DATA, "--student", "tokenplug:bigram", "--epochs", 1,
                         "--device", "cpu", "--quiet", "--out", tmp_path / "r"))
    assert "does not match" in line and ("vocab" in line or "num_classes" in line)


def test_token_caches_hold_draws_per_position(dump, tmp_path):
    arrays, attrs = read_plain(dump("s.zarr", "--topk", 8, "--sample", 6))
    assert arrays["sample_ids"].shape == (96, 1, tokenplug.LENGTH, 6)
    assert (arrays["sample_counts"].sum(-1) == 6).all()
    _, x, _ = _teacher_logits()
    most = np.take_along_axis(arrays["sample_ids"][:, 0], arrays["sample_counts"][:, 0].argmax(-1)[..., None], -1)
    assert (most[..., 0] == ((x + 1) % tokenplug.VOCAB).numpy()).mean() > 0.9  # the successor is drawn most
    ok(kt("--cache", dump("s.zarr", "--topk", 8, "--sample", 6), "--dataset", DATA, "--student", "tokenplug:bigram",
          "--soft-labels", "samples", "-T", "1", "--epochs", 1, "--device", "cpu", "--quiet", "--no-plots",
          "--out", tmp_path / "r"))
