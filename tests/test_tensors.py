"""Samples that are not images: a plug-in dataset of float signals and a plug-in 1-D CNN, through every stage.

The dataset is a plain torch Dataset knowing nothing of kdcache; its float tensors must reach teacher and student
exactly as given (no quantisation, resizing or normalisation), and image-only options must be refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clitools import error_line, kd, kt, ok, read_plain

import signalplug

DATA = "signalplug:signals"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Teacher trained from labels, its cache dumped, a student trained from the cache."""
    d = tmp_path_factory.mktemp("signals")
    ok(kt("--student", "signalplug:cnn1d", "--dataset", DATA, "--epochs", 3, "--batch-size", 32, "--device", "cpu",
          "--quiet", "--no-plots", "--out", d / "teacher"))
    ok(kd("dump", "--teacher", "signalplug:cnn1d", "--weights", d / "teacher" / "best.pt", "--dataset", DATA,
          "--device", "cpu", "--quiet", "--out", d / "s.zarr"))
    ok(kt("--cache", d / "s.zarr", "--dataset", DATA, "--student", "mlp", "--student-arg", "hidden=(32,)",
          "--epochs", 3, "--batch-size", 32, "--device", "cpu", "--quiet", "--no-plots", "--out", d / "student"))
    return d


def test_cached_logits_are_the_teacher_on_the_raw_floats(pipeline):
    from kdcache.models import build_model, load_weights

    arrays, attrs = read_plain(str(pipeline / "s.zarr"))
    model = build_model("signalplug:cnn1d", num_classes=4, input_shape=(1, 40)).eval()
    load_weights(model, str(pipeline / "teacher" / "best.pt"), "signalplug:cnn1d")
    ds = signalplug.Signals("train")
    with torch.no_grad():
        want = model(ds.x).numpy()
    got = arrays["values"][:, 0].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 rounding of |logits| < ~10
    assert np.array_equal(want.astype(np.float16), arrays["values"][:, 0])
    assert attrs["dataset"]["input"] == {"kind": "tensor", "shape": [1, 40], "dtype": "float32"}
    assert attrs["teacher"]["preprocess"] == {"kind": "tensor"} and attrs["version"] == "3.0"


def test_student_trained_from_the_cache(pipeline):
    import json

    m = json.loads((pipeline / "student" / "metrics.json").read_text())
    assert m["input"] == {"kind": "tensor", "shape": [1, 40], "dtype": "float32"}
    assert m["final"]["test_top1"] > 0.4  # 4 classes: far above chance after 3 epochs
    assert m["teachers"][0]["name"] == "signalplug:cnn1d"


def test_info_and_verify_describe_a_tensor_cache(pipeline):
    out = ok(kd("info", pipeline / "s.zarr"))
    assert "tensors 1×40 float32" in out and "px" not in out.split("teacher:")[1].splitlines()[0]
    assert "verified" in ok(kd("verify", pipeline / "s.zarr"))


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "32"], "--image-size applies to images"),
    (["--views", "2", "--augment", "flip"], "--views applies to images"),
    (["--augment", "flip"], "--augment applies to images"),
])
def test_image_options_are_refused_for_tensors(pipeline, tmp_path, flags, words):
    line = error_line(kd("dump", "--teacher", "signalplug:cnn1d", "--weights", pipeline / "teacher" / "best.pt",
                         "--dataset", DATA, "--device", "cpu", "--quiet", "--out", tmp_path / "x.zarr", *flags))
    assert words in line and "tensors of shape (1, 40) float32" in line
    assert not (tmp_path / "x.zarr").exists()


def test_kdtrain_refuses_image_options_for_tensors(tmp_path):
    base = ["--dataset", DATA, "--student", "mlp", "--epochs", 1, "--device", "cpu", "--quiet", "--out", tmp_path]
    assert "--augment applies to images" in error_line(kt(*base, "--augment", "flip"))
    assert "--image-size applies to images" in error_line(kt(*base, "--image-size", 16))


def test_image_model_on_signals_is_one_line(tmp_path):
    line = error_line(kt("--dataset", DATA, "--student", "cnn_s", "--epochs", 1, "--device", "cpu", "--quiet",
                         "--out", tmp_path))
    assert "model 'cnn_s' takes images (C, H, W), but the inputs have shape (1, 40)" in line
