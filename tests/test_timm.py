"""timm models (`timm:NAME`, the `timm` extra): built without pretrained weights, their own preprocessing recorded
in the cache, DEFAULT weights from timm's cache offline and a one-line error when they cannot be had, and a timm
teacher -> dump -> kdtrain student run end to end offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clitools import error_line, kd, kt, ok, read_plain

timm = pytest.importorskip("timm")

from kdcache.data.render import IMAGENET_MEAN, IMAGENET_STD, Preprocess, central_box, render  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.models import build_model, load_weights  # noqa: E402
from kdcache.models import timm_models  # noqa: E402

VIT, CNN = "timm:test_vit", "timm:test_resnet"  # timm's own tiny test models (~0.3M parameters)


def test_build_sizes_vits_and_passes_options():
    vit = build_model(VIT, 10, (3, 32, 32))
    assert isinstance(vit, timm.models.VisionTransformer) and vit.num_classes == 10
    assert tuple(vit.patch_embed.img_size) == (32, 32)  # sized at construction
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    cnn = build_model(CNN, 7, (3, 24, 24), {"drop_rate": 0.1})  # takes no img_size: built without it
    assert cnn(torch.zeros(2, 3, 24, 24)).shape == (2, 7) and cnn.drop_rate == 0.1
    grey = build_model(CNN, 3, (1, 16, 16)).eval()
    assert grey(torch.zeros(1, 1, 16, 16)).shape == (1, 3)
    assert build_model(CNN, 3, (3, 16, 16), {"distill_tokens": 0, "head_mode": "cls"}).num_classes == 3


@pytest.mark.parametrize("name, options, words", [
    ("timm:no_such_model", {}, "timm has no model 'no_such_model'"),
    (VIT, {"bogus": 1}, "cannot build 'timm:test_vit' with bogus=1"),
    (VIT, {"distill_tokens": 1}, "--distill-tokens needs a ViT or Mixer student"),
    (VIT, {"num_classes": 3}, "num_classes is set by kdcache"),
])
def test_build_errors(name, options, words):
    with pytest.raises(KDCacheError, match=words):
        build_model(name, 10, (3, 32, 32), options)


def test_tensor_inputs_refused():
    with pytest.raises(KDCacheError, match="takes images"):
        build_model(VIT, 10, (40,))


@pytest.mark.parametrize("name", [VIT, CNN, "timm:resnet10t", "timm:vit_tiny_patch16_224"])
def test_preprocess_is_the_models_own(name):
    """What kdcache reads without building the model is what timm resolves for the built model."""
    model = timm.create_model(name[5:], pretrained=False)
    cfg = timm.data.resolve_model_data_config(model)
    pre = Preprocess(**timm_models.timm_preprocess(name))
    assert pre.input_shape == tuple(cfg["input_size"])
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.interpolation == cfg["interpolation"] and pre.crop_pct == cfg["crop_pct"]
    own = timm_models.timm_preprocess(name, 48)  # the user's size wins; the rest stays the model's
    assert own["image_size"] == 48 and own["crop_pct"] == cfg["crop_pct"] and own["mean"] == tuple(cfg["mean"])
    assert timm_models.timm_preprocess(name, 48, crop_pct=1.0)["crop_pct"] == 1.0


def test_preprocess_json_is_unchanged_at_defaults():
    assert Preprocess(32).to_json() == {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    p = Preprocess(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    assert p.to_json()["interpolation"] == "bicubic" and p.to_json()["crop_pct"] == 0.875
    assert Preprocess.from_json(p.to_json()) == p
    assert Preprocess.from_json(Preprocess(8).to_json()) == Preprocess(8)
    for bad in ({"interpolation": "lanczos"}, {"crop_pct": 0.0}, {"crop_pct": 1.5}):
        with pytest.raises(KDCacheError):
            Preprocess(8, **bad)


def test_crop_pct_matches_timms_eval_transform():
    """crop_pct 0.875 at 224 on a 256-px base image is timm's eval transform (resize 256, centre crop 224)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
           "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    want = timm.data.create_transform(**cfg)(Image.fromarray(base))
    pre = Preprocess(224, cfg["mean"], cfg["std"], "bicubic", 0.875)
    got = render(torch.from_numpy(base).permute(2, 0, 1)[None], torch.tensor([0, 0, 1, 1, 0.0]), pre)[0]
    assert torch.allclose(got, want, atol=1e-4)


def test_crop_pct_composes_views_and_bicubic_stays_in_range():
    x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    views = torch.tensor([[0, 0, 1, 1, 0], [0.1, 0.2, 0.5, 0.6, 1], [-0.1, 0, 1, 1, 0]], dtype=torch.float32)
    cropped = render(x, views, Preprocess(12, crop_pct=0.8))
    assert torch.equal(cropped, render(x, central_box(views, 0.8), Preprocess(12)))
    assert torch.allclose(central_box(views, 0.8)[0], torch.tensor([0.1, 0.1, 0.8, 0.8, 0.0]))
    cubic = render(x, views, Preprocess(31, (0.0,) * 3, (1.0,) * 3, "bicubic"))
    assert cubic.min() >= 0 and cubic.max() <= 1


# --------------------------------------------------------------------------- DEFAULT weights


def _fake_hub(cache_dir, name: str) -> None:
    """A Hugging Face hub cache holding weights for timm model `name`, as a download would leave it."""
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg(name)
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False)
    repo = cache_dir / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(repo / "snapshots" / rev /
                                                                             "model.safetensors"))


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    d = tmp_path / "hub"
    d.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(d))
    return d


def test_default_weights_load_from_the_cache_offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub(hub_cache, "test_resnet")
    model = build_model(CNN, 1000, (3, 32, 32))
    ident = load_weights(model, "DEFAULT", CNN)
    assert ident["source"] == "timm" and ident["weights"] == "test_resnet.r160_in1k"
    assert ident["sha256"] == timm_models.state_sha256(model) and len(ident["sha256"]) == 64
    torch.manual_seed(1)
    ref = timm.create_model("test_resnet", pretrained=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_default_weights_offline_or_unreachable_is_one_line(hub_cache, monkeypatch):
    model = build_model(CNN, 1000, (3, 32, 32))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KDCacheError, match=r"could not load timm's pretrained weights .*HF_HUB_OFFLINE is set") as e:
        load_weights(model, "DEFAULT", CNN)
    assert "\n" not in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(timm_models, "_reachable", lambda host, port, timeout=5.0: False)
    with pytest.raises(KDCacheError, match=r"huggingface.co cannot be reached.*pass --weights PATH"):
        load_weights(model, "DEFAULT", CNN)
    with pytest.raises(KDCacheError, match="have 1000 classes but the dataset has 10"):
        load_weights(build_model(CNN, 10, (3, 32, 32)), "DEFAULT", CNN)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """imagefolder: 3 classes x 8 small PNGs (both splits): a dump and a student epoch take seconds."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(8):
            a = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory):
    """A test_vit teacher for 3 classes at 32 px with random weights, saved as a plain state_dict."""
    path = tmp_path_factory.mktemp("timm") / "vit.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).state_dict(), path)
    return str(path)


def test_timm_teacher_dump_then_student_offline(vit_teacher, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", folder, "--device", "cpu", "--quiet"]
    ok(kd("dump", "--teacher", VIT, "--weights", vit_teacher, "--image-size", 32, "--out", "t.zarr", *common))
    arrays, attrs = read_plain(str(tmp_path / "t.zarr"))
    assert attrs["teacher"]["name"] == VIT and attrs["teacher"]["weights"]["source"] == "file"
    timms = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.95}  # test_vit's config
    assert attrs["teacher"]["preprocess"] == {"image_size": 32, **timms}
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    model.load_state_dict(torch.load(vit_teacher, weights_only=True))
    from kdcache.data.datasets import open_dataset

    ds = open_dataset(folder, "train")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    pre = Preprocess(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.95)
    with torch.inference_mode():
        want = model.eval()(pre(x, torch.tensor([0, 0, 1, 1, 0.0])))
    assert np.allclose(arrays["values"][:, 0], want.numpy(), atol=0.02)  # float16 values
    # students from the cache, offline: a built-in, and a timm model at its own preprocessing and the teacher's crop
    args = ["--epochs", 1, "--batch-size", 8, "--device", "cpu", "--quiet", "--no-plots"]
    ok(kt("--cache", "t.zarr", "--student", "mlp", *args, "--out", "runs/mlp"))
    ok(kt("--cache", "t.zarr", "--student", CNN, "--image-size", 16, *args, "--out", "runs/cnn"))
    import json

    meta = json.loads((tmp_path / "runs" / "cnn" / "metrics.json").read_text())
    cnn = timm.data.resolve_model_data_config(timm.create_model("test_resnet", pretrained=False))
    assert meta["preprocess"] == Preprocess(16, cnn["mean"], cnn["std"], cnn["interpolation"], 0.95).to_json()
    assert json.loads((tmp_path / "runs" / "mlp" / "metrics.json").read_text())["preprocess"]["crop_pct"] == 0.95
    # DEFAULT offline: one line
    r = kd("dump", "--teacher", VIT, "--weights", "DEFAULT", "--image-size", 32, "--out", "d.zarr", *common)
    assert r.exit_code == 1 and "DEFAULT weights for timm:test_vit have 1000 classes" in error_line(r)


def test_timm_teacher_beside_another_in_one_pass(vit_teacher, folder, tmp_path):
    """One pass, a timm teacher (bicubic, crop 0.95, mean 0.5) and an mlp (defaults): each cache as alone."""
    mlp = tmp_path / "mlp.pt"
    model = build_model("mlp", 3, (3, 8, 8), {"hidden": (16,)})
    torch.save({"model": model.state_dict(), "arch_args": {"hidden": [16]}}, mlp)
    common = ["--dataset", folder, "--split", "test", "--device", "cpu", "--quiet", "--views", "2",
              "--augment", "rrc(0.35,1)+flip"]
    ok(kd("dump", "--teacher", VIT, "--weights", vit_teacher, "--image-size", 32, "--out", tmp_path / "a.zarr",
          "--teacher", "mlp", "--weights", mlp, "--image-size", 8, "--out", tmp_path / "b.zarr", *common))
    ok(kd("dump", "--teacher", VIT, "--weights", vit_teacher, "--image-size", 32, "--out", tmp_path / "alone.zarr",
          *common))
    (a, a_attrs), (alone, _) = read_plain(str(tmp_path / "a.zarr")), read_plain(str(tmp_path / "alone.zarr"))
    assert all(np.array_equal(a[k], alone[k]) for k in alone)
    assert a_attrs["teacher"]["preprocess"]["crop_pct"] == 0.95
    assert read_plain(str(tmp_path / "b.zarr"))[1]["teacher"]["preprocess"] == Preprocess(8).to_json()
