"""Beyond top-k logits: cached teacher features for FitNets hints, and sampled soft labels.

- Cached features are the teacher layer's output pooled one agreed way, and a hint loss on them equals (loss and
  gradients) the hint computed with the teacher run online.
- Sampled soft labels are M draws per row from the teacher's distribution; their loss's gradient is unbiased for
  the full-distribution KD gradient (the mean over many draws approaches it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from clitools import assert_same_arrays, error_line, kd, kt, ok, read_plain

TRAIN = ["--student", "mlp", "--student-arg", "hidden=(8,)", "--epochs", "1", "--device", "cpu", "--quiet",
         "--no-plots"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, save_teacher):
    """make(name, *extra) -> path of a digits cache of a random 8 px mlp teacher (memoised)."""
    root = tmp_path_factory.mktemp("feat")
    weights = save_teacher(root / "t.pt", image_size=8, hidden=(16,))
    made: dict[tuple, str] = {}

    def make(name: str, *extra) -> str:
        key = (name, *map(str, extra))
        if key not in made:
            ok(kd("dump", "--teacher", "mlp", "--weights", weights, "--image-size", 8, "--device", "cpu", "--quiet",
                  "--chunk-rows", 256, "--out", root / name, *extra))
            made[key] = str(root / name)
        return made[key]

    make.weights = weights
    return make


def _teacher(weights: str):
    from kdcache.models import build_model, load_weights

    model = build_model("mlp", 10, (3, 8, 8), hidden=(16,)).eval()
    load_weights(model, weights, "mlp")
    return model


def _inputs(n: int | None = None) -> torch.Tensor:
    from kdcache.data.datasets import open_dataset
    from kdcache.data.render import Preprocess

    ds = open_dataset("digits", "train")
    images = torch.stack([ds[i][0] for i in range(n or len(ds))])
    return Preprocess(8)(images, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))


def test_cached_features_are_the_teachers_layer_output_pooled(cache):
    arrays, attrs = read_plain(cache("f32.zarr", "--dtype", "float32", "--features", "net.2", "--features", "net.0"))
    assert attrs["features"] == [{"layer": "net.2", "pool": "gap", "shape": [16], "array": "feat_0"},
                                 {"layer": "net.0", "pool": "gap", "shape": [192], "array": "feat_1"}]
    assert attrs["version"] == "3.0" and attrs["feature_shapes"] == [[16], [192]]
    model, x = _teacher(cache.weights), _inputs()
    with torch.no_grad():
        hidden = model.net[2](model.net[1](model.net[0](x)))
    np.testing.assert_allclose(arrays["feat_0"][:, 0], hidden.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["feat_1"][:, 0], x.flatten(1).numpy(), rtol=0, atol=1e-6)


def test_cached_hints_give_the_loss_and_gradients_of_online_hints(cache):
    """HintLoss on features read from a float32 cache equals HintLoss on the teacher's features computed online."""
    from kdcache.io import open_cache
    from kdcache.models import build_model
    from kdcache.models.taps import pool, tap
    from kdcache.train.batches import to_target
    from kdcache.train.hints import HintLoss, probe_shape, student_layer
    from kdcache.train.losses import SoftTarget

    path = cache("f32.zarr", "--dtype", "float32", "--features", "net.2", "--features", "net.0")
    idx = np.arange(0, 1437, 7)
    with open_cache(path) as c:
        cached = to_target(c.read(idx), 10, torch.device("cpu"))
        spec = c.attrs["features"][0]
    teacher, x = _teacher(cache.weights), _inputs()[idx]
    with tap(teacher, ["net.2"], "teacher") as seen, torch.no_grad():
        teacher(x)
        online = SoftTarget(logits=torch.zeros(len(idx), 10), features={"net.2": pool(seen["net.2"], "gap")})
    torch.manual_seed(0)
    student = build_model("mlp", 10, (3, 8, 8), hidden=(8,))
    layer, use_input = student_layer(student, None)
    assert (layer, use_input) == ("net.4", True)  # the head: Flatten, Linear, ReLU, Dropout, Linear
    with tap(student, [layer], "student", inputs=True) as seen:
        shape = probe_shape(student, seen, layer, x[:1], spec, False)
        hint = HintLoss(layer, spec, shape, False, 0.7, seen)
        results = []
        for target in (cached, online):
            student.zero_grad()
            hint.zero_grad()
            student(x)
            loss = hint(torch.zeros(len(idx), dtype=torch.long), target)
            loss.backward()
            results.append((loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                          for p in (*student.parameters(), *hint.parameters())]))
    (l1, g1), (l2, g2) = results
    assert abs(l1 - l2) < 1e-6 and l1 > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(g1, g2))


def test_training_with_a_hint(cache, tmp_path):
    path = cache("f16.zarr", "--topk", 3, "--features", "net.2")
    ok(kt("--cache", path, *TRAIN, "--hint", "net.2", "--hint-weight", "2", "--out", tmp_path / "r"))
    ok(kt("--cache", path, *TRAIN, "--hint", "net.2", "--hint-weight", "2", "--epochs", "2", "--resume",
          "--out", tmp_path / "r"))  # the regressor resumes with the student
    line = error_line(kt("--cache", path, *TRAIN, "--hint", "net.0", "--out", tmp_path / "x"))
    assert "holds no feature of that layer (it holds net.2)" in line
    assert "--hint with --mixup" in error_line(kt("--cache", path, *TRAIN, "--hint", "net.2", "--mixup", "0.2",
                                                  "--out", tmp_path / "y"))
    assert "has no module 'nope'" in error_line(kt("--cache", path, *TRAIN, "--hint", "net.2", "--hint-student",
                                                   "nope", "--out", tmp_path / "z"))


@pytest.mark.parametrize("flags, words", [(["--features", "net.2:sideways"], "--features takes LAYER[:POOL]"),
                                          (["--features", "layer9"], "the teacher has no module 'layer9'"),
                                          (["--sample", "0"], "--sample must be between 1 and 65535")])
def test_bad_feature_and_sample_options(cache, tmp_path, flags, words):
    line = error_line(kd("dump", "--teacher", "mlp", "--weights", cache.weights, "--image-size", 8, "--device",
                         "cpu", "--quiet", "--out", tmp_path / "x.zarr", *flags))
    assert words in line


def test_draws_are_counted_ids_from_the_teachers_distribution(cache):
    arrays, attrs = read_plain(cache("s64.zarr", "--sample", 64, "--topk", 3))
    ids, counts = arrays["sample_ids"][:, 0].astype(np.int64), arrays["sample_counts"][:, 0].astype(np.int64)
    assert (counts.sum(1) == 64).all()
    used = counts > 0
    assert all((np.diff(row[u]) > 0).all() for row, u in zip(ids, used))  # distinct, ascending
    assert attrs["sampling"]["m"] == 64 and attrs["kind"] == "topk"
    with torch.no_grad():
        p = _teacher(cache.weights)(_inputs()).softmax(1).numpy()
    freq = np.zeros_like(p)
    np.add.at(freq, (np.arange(len(p))[:, None].repeat(64, 1)[used], ids[used]), counts[used] / 64)
    assert np.abs(freq.mean(0) - p.mean(0)).max() < 0.01  # 92k draws: the class frequencies match


def test_sampled_gradient_is_unbiased_for_the_kd_gradient():
    """The mean over independent draws of the sampled loss's gradient approaches the full KD gradient."""
    from kdcache.data.views import counter_uniforms
    from kdcache.format.topk import draw_samples
    from kdcache.train.losses import SoftTarget, kl_soft

    torch.manual_seed(0)
    teacher = torch.randn(16, 10) * 2
    student = torch.randn(16, 10, requires_grad=True)
    T, m = 2.0, 8
    kl_soft(student, SoftTarget(logits=teacher), T).backward()
    full = student.grad.clone()

    def sampled_grad(seed: int) -> torch.Tensor:
        u = counter_uniforms(seed, np.arange(16), 1, np.arange(m), 1)[:, 0]
        s = draw_samples(teacher, m, T, torch.from_numpy(u))
        student.grad = None
        kl_soft(student, SoftTarget(sample_ids=s["sample_ids"].long(), sample_counts=s["sample_counts"],
                                    num_classes=10), T).backward()
        return student.grad.clone()

    grads = torch.stack([sampled_grad(seed) for seed in range(400)])
    one = (grads[0] - full).abs().mean()
    mean = (grads.mean(0) - full).abs().mean()
    assert mean < one / 8  # ~1/sqrt(400) of a single draw's error, with room
    assert torch.allclose(grads.mean(0), full, atol=0.01)


def test_training_from_sampled_soft_labels(cache, tmp_path):
    both = cache("s12.zarr", "--sample", 12, "--topk", 3)
    alone = cache("s12-alone.zarr", "--sample", 12)
    arrays, attrs = read_plain(alone)
    assert attrs["kind"] == "sampled" and "values" not in arrays and attrs["stats"]["topk_mass"] is None
    ok(kt("--cache", alone, *TRAIN, "-T", "1", "--out", tmp_path / "a"))
    ok(kt("--cache", both, *TRAIN, "--soft-labels", "samples", "-T", "1", "--out", tmp_path / "b"))
    assert "drawn at temperature 1.0: train with -T 1.0" in error_line(kt("--cache", alone, *TRAIN,
                                                                           "--out", tmp_path / "c"))
    line = error_line(kt("--cache", cache("plain.zarr", "--topk", 3), *TRAIN, "--soft-labels", "samples",
                         "--out", tmp_path / "d"))
    assert "holds no sampled soft labels" in line


def test_features_and_samples_resume_identically_and_convert(cache, tmp_path):
    import shutil

    whole = cache("fs.zarr", "--topk", 3, "--features", "net.2", "--sample", 10)
    path = str(shutil.copytree(whole, tmp_path / "p.zarr"))
    g = zarr.open_group(path, mode="r+")
    g["done"][2] = 0
    g["feat_0"][600:700] = 0
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {"status": "partial"}
    ok(kd("dump", "--teacher", "mlp", "--weights", cache.weights, "--image-size", 8, "--device", "cpu", "--quiet",
          "--chunk-rows", 256, "--out", path, "--topk", 3, "--features", "net.2", "--sample", 10, "--resume"))
    assert_same_arrays(read_plain(path)[0], read_plain(whole)[0])
    ok(kd("convert", whole, tmp_path / "fs.h5"))
    assert_same_arrays(read_plain(str(tmp_path / "fs.h5"))[0], read_plain(whole)[0])
    assert "features: net.2 (gap, 16)" in ok(kd("info", whole))
