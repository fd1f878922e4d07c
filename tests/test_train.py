"""Stage 2: kdtrain end to end, no teacher in memory, cached-vs-online parity, resume, clean errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clitools import dump_args

from kdcache.io import open_cache
from kdcache.cli import kdcache_main, kdtrain_main
from kdcache.data.datasets import open_dataset
from kdcache.data.render import Preprocess, render
from kdcache.data.views import identity_views
from kdcache.models import build_model
from kdcache.train import losses
from kdcache.train.batches import to_target

FAST = ["--quiet", "--no-plots", "--batch-size", "256"]


def _run(main, args: list[str], ok: bool = True):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def _teacher_ckpt(tmp_path, name: str = "cnn_s", image_size: int = 16, **kw) -> str:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=(3, image_size, image_size), **kw)
    path = str(tmp_path / f"{name}.pt")
    torch.save({"model": model.state_dict(), "arch": name, "arch_args": kw}, path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cnn_s teacher (random weights) dumped full and top-3 over digits train and test at 16 px."""
    d = tmp_path_factory.mktemp("train")
    w = _teacher_ckpt(d)
    for split in ("train", "test"):
        for name, extra in (("full", []), ("top3", ["--topk", "3"])):
            _run(kdcache_main, dump_args(w, d / f"{split}-{name}.zarr", "--split", split, *extra, teacher="cnn_s",
                                         image_size=16))
    return d


def test_dump_then_kdtrain_vit_ti_as_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = _teacher_ckpt(tmp_path, "resnet18", image_size=16)
    _run(kdcache_main, dump_args(w, None, teacher="resnet18", image_size=16))  # no --out: logits.zarr
    r = _run(kdtrain_main, ["--cache", "logits.zarr", "--student", "vit_ti", "--epochs", "1",
                              "--student-arg", "patch_size=8", *FAST])
    m = json.load(open("runs/vit_ti/metrics.json"))
    assert m["student"] == "vit_ti" and m["image_size"] == 16 and len(m["history"]) == 1
    assert 0.0 <= m["final"]["test_top1"] <= 1.0 and np.isfinite(m["final"]["train_loss"])
    assert m["teachers"][0]["name"] == "resnet18"
    assert "test top-1" in r.output
    for f in ("best.pt", "last.pt", "log.csv"):
        assert os.path.exists(f"runs/vit_ti/{f}")


def test_no_teacher_is_built_or_loaded_during_kdtrain(cache_dir, tmp_path, monkeypatch):
    import kdcache.models.weights as weights
    import kdcache.train.recipe as loop

    built = []
    real = loop.build_model

    def spy(name, *a, **kw):
        built.append(name)
        return real(name, *a, **kw)

    def no_weights(*a, **k):
        raise AssertionError("kdtrain loaded teacher weights")

    monkeypatch.setattr(loop, "build_model", spy)
    monkeypatch.setattr(weights, "_read", no_weights)
    _run(kdtrain_main, ["--cache", str(cache_dir / "train-full.zarr"), "--student", "mlp", "--student-arg",
                        "hidden=(32,)", "--epochs", "1", "--out", str(tmp_path / "r"), *FAST])
    assert built == ["mlp"]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3)])
def test_cached_kd_equals_online_kd(tmp_path, dtype, tol):
    w = _teacher_ckpt(tmp_path)
    out = str(tmp_path / "c.zarr")
    _run(kdcache_main, dump_args(w, out, "--dtype", dtype, teacher="cnn_s", image_size=16))
    teacher = build_model("cnn_s", num_classes=10, input_shape=(3, 16, 16))
    teacher.load_state_dict(torch.load(w, weights_only=True)["model"])
    teacher.eval()
    ds = open_dataset("digits", "train")
    idx = np.arange(5, 69)
    images = torch.stack([ds[i][0] for i in idx])
    y = torch.from_numpy(ds.labels[idx])
    x = render(images, torch.from_numpy(identity_views(len(idx))[:, 0]), Preprocess(16))
    student = build_model("mlp", num_classes=10, input_shape=(3, 16, 16), hidden=(32,))

    def loss_and_grad(target):
        student.zero_grad()
        loss = losses.kd(student(x), y, target, T=4.0, alpha=0.3)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    with torch.no_grad():
        online = losses.SoftTarget(logits=teacher(x), num_classes=10)
    with open_cache(out) as cache:
        cached = to_target(cache.read(idx), 10, torch.device("cpu"))
    l_on, g_on = loss_and_grad(online)
    l_ca, g_ca = loss_and_grad(cached)
    torch.testing.assert_close(l_ca, l_on, atol=tol, rtol=tol)
    for a, b in zip(g_ca, g_on):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("args", [
    ["--loss", "kd", "--topk-loss", "renorm"],
    ["--loss", "hard"],
    ["--loss", "cwtm"],
    ["--loss", "dkpp"],
])
def test_each_loss_trains_from_a_topk_cache(cache_dir, tmp_path, args):
    out = tmp_path / "r"
    _run(kdtrain_main, ["--cache", str(cache_dir / "train-top3.zarr"),
                        "--test-cache", str(cache_dir / "test-full.zarr"),
                        "--student", "mlp", "--student-arg", "hidden=(64,)", "--epochs", "2", "--out", str(out),
                        *args, *FAST])
    m = json.load(open(out / "metrics.json"))
    assert m["config"]["loss"]["loss"] == args[1]
    assert all(np.isfinite(r["train_loss"]) for r in m["history"])
    assert 0.0 <= m["final"]["agreement"] <= 1.0


def test_two_teachers_with_distillation_tokens(cache_dir, tmp_path):
    out = tmp_path / "r"
    _run(kdtrain_main, ["--cache", str(cache_dir / "train-full.zarr"), "--cache", str(cache_dir / "train-top3.zarr"),
                        "--student", "vit_nano", "--distill-tokens", "--head-mode", "mean",
                        "--lambdas", "0.3,0.2", "--taus", "2,4", "--epochs", "1", "--out", str(out), *FAST])
    m = json.load(open(out / "metrics.json"))
    assert len(m["teachers"]) == 2 and m["config"]["loss"]["lambdas"] == [0.3, 0.2]
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["model"]["tokens"].shape[1] == 3  # class token + one per teacher
    assert ck["arch_args"] == {"distill_tokens": 2, "head_mode": "mean"}  # as built, so it can be rebuilt
    _run(kdcache_main, dump_args(out / "last.pt", tmp_path / "from-student.zarr", teacher="vit_nano", image_size=16))


def test_resume_continues_to_the_same_result(cache_dir, tmp_path):
    base = ["--cache", str(cache_dir / "train-full.zarr"), "--student", "mlp", "--student-arg", "hidden=(32,)",
            "--seed", "3", *FAST]
    _run(kdtrain_main, [*base, "--epochs", "2", "--out", str(tmp_path / "a")])
    _run(kdtrain_main, [*base, "--epochs", "1", "--out", str(tmp_path / "b")])
    _run(kdtrain_main, [*base, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume"])
    a = json.load(open(tmp_path / "a" / "metrics.json"))["history"]
    b = json.load(open(tmp_path / "b" / "metrics.json"))["history"]
    assert len(b) == 2
    assert a[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], rel=1e-5)
    assert a[-1]["test_top1"] == pytest.approx(b[-1]["test_top1"])


def test_plain_supervised_checkpoint_dumps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(kdtrain_main, ["--student", "mlp", "--student-arg", "hidden=(16,)", "--image-size", "16", "--epochs", "1",
                        "--out", "teacher", *FAST])
    _run(kdcache_main, dump_args("teacher/best.pt", None, teacher="mlp", image_size=16))  # no --out: logits.zarr
    with open_cache("logits.zarr") as c:
        assert c.attrs["teacher"]["arch_args"] == {"hidden": [16]}


def _error(main, args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_kdtrain_errors_are_one_clean_line(cache_dir, tmp_path):
    o = ["--out", str(tmp_path / "r"), *FAST]
    msg = _error(kdtrain_main, ["--cache", str(cache_dir / "test-full.zarr"), "--epochs", "1", *o])
    assert "does not match" in msg and "360" in msg and "1437" in msg
    msg = _error(kdtrain_main, ["--cache", str(cache_dir / "train-full.zarr"), "--student", "nope", *o])
    assert "unknown model 'nope'" in msg
    msg = _error(kdtrain_main, ["--cache", str(cache_dir / "train-full.zarr"), "--student", "cnn_s",
                                "--distill-tokens", *o])
    assert "--distill-tokens" in msg
    msg = _error(kdtrain_main, ["--cache", str(tmp_path / "missing.zarr"), *o])
    assert "no cache at" in msg
    msg = _error(kdtrain_main, ["--loss", "kd", *o])
    assert "needs a teacher" in msg
    msg = _error(kdtrain_main, ["--cache", str(cache_dir / "train-full.zarr"), "--augment", "flip", *o])
    assert "--augment applies only without a cache" in msg


def test_kdtrain_refuses_a_partial_cache(cache_dir, tmp_path):
    import shutil

    import zarr

    p = tmp_path / "partial.zarr"
    shutil.copytree(cache_dir / "train-full.zarr", p)
    g = zarr.open_group(str(p), mode="r+")
    attrs = dict(g.attrs["kdcache"])
    attrs["status"] = "partial"
    g.attrs["kdcache"] = attrs
    msg = _error(kdtrain_main, ["--cache", str(p), "--out", str(tmp_path / "r"), *FAST])
    assert "partial" in msg and "--resume" in msg


def test_mixup_loss_trains_toward_the_mixed_soft_targets():
    from kdcache.config import LossConfig
    from kdcache.train.objective import Objective, mixup_loss

    torch.manual_seed(0)
    s = torch.randn(6, 5, requires_grad=True)
    t = losses.SoftTarget(logits=torch.randn(6, 5) * 3, num_classes=5)
    perm, lam, T = torch.tensor([3, 0, 5, 1, 2, 4]), 0.3, 2.0
    obj = Objective(LossConfig("kd", alpha=0.0, temperature=T).resolve(1))
    mixup_loss(obj, s[:, None], torch.full((6,), -1), [t], perm, lam).backward()
    p = (t.logits / T).softmax(-1)
    mixed = lam * p + (1 - lam) * p[perm]
    q = (s.detach() / T).softmax(-1)
    # d/ds of T²·batch-mean CE(mixed, softmax(s/T)) = T·(q − mixed)/B
    torch.testing.assert_close(s.grad, T * (q - mixed) / 6, atol=1e-6, rtol=1e-5)


def test_mixup_run(cache_dir, tmp_path):
    out = tmp_path / "r"
    _run(kdtrain_main, ["--cache", str(cache_dir / "train-top3.zarr"), "--student", "mlp", "--student-arg",
                        "hidden=(32,)", "--mixup", "0.4", "--epochs", "1", "--out", str(out), *FAST])
    assert json.load(open(out / "metrics.json"))["config"]["mixup"] == 0.4
