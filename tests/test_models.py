"""Tests for kdcache.models: built-ins, distillation heads, involution, registry, weights."""

import hashlib
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.models import (
    build_model,
    has_distill_heads,
    load_weights,
    model_names,
    param_count,
)
from kdcache.models.involution import Involution, involution

# Small options so every built-in runs fast; ViTs and the Mixer are built at their real size.
TINY = {
    "cifar_resnet18": {"width": 8},
    "cifar_resnet10": {"width": 8},
    "rednet26_s": {"width": 16},
    "rednet_s": {},
    "cnn_s": {"width": 8},
    "mlp": {"hidden": (32, 16)},
}
IMAGE_MODELS = ["cifar_resnet18", "cifar_resnet10", "rednet26_s", "rednet_s", "cnn_s", "mlp",
                "vit_ti", "vit_s", "vit_nano", "mixer_ti"]
BUILTINS = [*IMAGE_MODELS, "gpt_nano", "lstm_lm", "lstm_cls", "transformer_cls"]  # sequences: test_sequence_models


def test_model_names_lists_the_builtins():
    assert model_names() == BUILTINS


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_builtin_output_shape(name, size):
    model = build_model(name, 7, (3, size, size), **TINY.get(name, {})).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    assert model.num_classes == 7


@pytest.mark.parametrize("name", ["cifar_resnet10", "rednet_s", "cnn_s", "mlp", "vit_nano", "mixer_ti"])
def test_builtin_one_channel_odd_size(name):
    size = 9 if name not in ("vit_nano", "mixer_ti") else 12
    model = build_model(name, 3, (1, size, size), **TINY.get(name, {})).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


def test_full_size_param_counts():
    assert 11_000_000 < param_count(build_model("cifar_resnet18", 10, (3, 32, 32))) < 11_300_000
    assert 5_600_000 < param_count(build_model("vit_ti", 1000, (3, 224, 224))) < 5_800_000  # DeiT-Ti: 5.7M
    assert param_count(build_model("mlp", 10, (1, 28, 28))) == 785 * 1200 + 1201 * 1200 + 1201 * 10


@pytest.mark.parametrize("name", ["vit_nano", "mixer_ti"])
def test_distill_heads_cls_and_mean(name):
    torch.manual_seed(0)
    cls_model = build_model(name, 5, (3, 16, 16), distill_tokens=2).eval()
    assert cls_model.distill_tokens == 2 and has_distill_heads(cls_model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        heads = cls_model.forward_heads(x)
        assert heads.shape == (3, 3, 5)
        torch.testing.assert_close(cls_model(x), heads[:, 0])
        mean_model = build_model(name, 5, (3, 16, 16), distill_tokens=2, head_mode="mean").eval()
        mean_model.load_state_dict(cls_model.state_dict())
        torch.testing.assert_close(mean_model(x), heads.mean(dim=1))


def test_no_distill_tokens_is_one_head():
    model = build_model("vit_nano", 4, (3, 8, 8)).eval()
    assert model.distill_tokens == 0 and not has_distill_heads(model)
    assert not has_distill_heads(build_model("cnn_s", 4, (3, 8, 8)))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        heads = model.forward_heads(x)
        assert heads.shape == (2, 1, 4)
        torch.testing.assert_close(model(x), heads[:, 0])


def test_vit_token_and_position_shapes():
    model = build_model("vit_nano", 4, (3, 8, 8), distill_tokens=1)
    assert model.tokens.shape == (1, 2, 96)
    assert model.pos_embed.shape == (1, 2 + 64, 96)


def test_bad_head_mode():
    with pytest.raises(KDCacheError, match="head_mode"):
        build_model("vit_nano", 4, (3, 8, 8), head_mode="max")


def test_patch_size_rule():
    assert build_model("vit_nano", 4, (3, 224, 224)).patch_embed.proj.kernel_size == (16, 16)
    assert build_model("vit_nano", 4, (3, 32, 32)).patch_embed.proj.kernel_size == (4, 4)
    assert build_model("vit_nano", 4, (3, 8, 8)).patch_embed.proj.kernel_size == (1, 1)
    assert build_model("mixer_ti", 4, (3, 32, 32), patch_size=8).patch_embed.num_patches == 16
    with pytest.raises(KDCacheError, match="image size 100 is not divisible by patch size 12"):
        build_model("vit_ti", 4, (3, 100, 100))


def _involution_loop(x, kernel, k, stride):
    """Slow reference: out[c, i, j] = sum_ab kernel[g(c), ab, i, j] * x_padded[c, i*s + a, j*s + b]."""
    b, c, _, _ = x.shape
    groups, ho, wo = kernel.shape[1], kernel.shape[3], kernel.shape[4]
    xp = F.pad(x, [(k - 1) // 2] * 4)
    out = torch.zeros(b, c, ho, wo)
    for ch in range(c):
        g = ch // (c // groups)
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, ch, i * stride : i * stride + k, j * stride : j * stride + k].reshape(b, -1)
                out[:, ch, i, j] = (patch * kernel[:, g, :, i, j]).sum(1)
    return out


@pytest.mark.parametrize(("k", "stride", "size"), [(3, 1, 5), (7, 1, 6), (3, 2, 7)])
def test_involution_matches_loop(k, stride, size):
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size)
    out_size = (size - 1) // stride + 1
    kernel = torch.randn(2, 2, k * k, out_size, out_size)
    torch.testing.assert_close(involution(x, kernel, k, stride), _involution_loop(x, kernel, k, stride))


def test_involution_layer_strides_odd_input():
    layer = Involution(32, kernel_size=7, stride=2)
    assert layer.groups == 2
    assert layer(torch.randn(2, 32, 7, 7)).shape == (2, 32, 4, 4)


def test_rednet_width_must_split_into_groups():
    with pytest.raises(KDCacheError, match="width 48"):
        build_model("rednet26_s", 10, (3, 8, 8), width=48)


def test_torchvision_model_builds():
    model = build_model("resnet18", 10, (3, 32, 32), distill_tokens=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.num_classes == 10
    with pytest.raises(KDCacheError, match="3-channel"):
        build_model("resnet18", 10, (1, 32, 32))


@pytest.mark.parametrize("name", ["resnet18", "cnn_s"])
def test_distill_tokens_need_a_vit(name):
    with pytest.raises(KDCacheError) as err:
        build_model(name, 10, (3, 32, 32), distill_tokens=2)
    assert str(err.value) == (
        "--distill-tokens needs a ViT or Mixer student (vit_ti, vit_s, vit_nano, mixer_ti); "
        f"'{name}' has no token to add"
    )


def test_unknown_option_is_named():
    with pytest.raises(KDCacheError, match="does not take option hidden: it takes width"):
        build_model("cnn_s", 10, (3, 32, 32), hidden=(3,))


def test_unknown_model():
    with pytest.raises(KDCacheError) as err:
        build_model("foo", 10, (3, 32, 32))
    assert str(err.value).startswith("unknown model 'foo': use one of cifar_resnet18, cifar_resnet10,")
    assert str(err.value).endswith("a torchvision classification model name, timm:NAME, hf:DIR, or package.module:factory")


def test_factory_path(tmp_path, monkeypatch):
    (tmp_path / "kd_factory_fixture.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes, image_size, depth=1):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size**2, num_classes))

        def not_a_model(num_classes, image_size):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("kd_factory_fixture:tiny", 6, (3, 8, 8), depth=2, distill_tokens=0)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 6)
    assert model.num_classes == 6
    with pytest.raises(KDCacheError, match="not a torch.nn.Module"):
        build_model("kd_factory_fixture:not_a_model", 6, (3, 8, 8))
    with pytest.raises(KDCacheError, match="has no factory 'missing'"):
        build_model("kd_factory_fixture:missing", 6, (3, 8, 8))
    with pytest.raises(KDCacheError, match="cannot import 'no_such_kd_module'"):
        build_model("no_such_kd_module:tiny", 6, (3, 8, 8))
    with pytest.raises(KDCacheError, match="--distill-tokens"):
        build_model("kd_factory_fixture:tiny", 6, (3, 8, 8), distill_tokens=1)


@pytest.mark.parametrize("wrap", ["raw", "kdtrain"])
def test_load_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    src = build_model("cnn_s", 10, (3, 16, 16), width=8).eval()
    state = src.state_dict()
    if wrap == "kdtrain":
        state = {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "arch": "cnn_s",
                 "num_classes": 10, "image_size": 16}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    dst = build_model("cnn_s", 10, (3, 16, 16), width=8).eval()
    ident = load_weights(dst, str(path), "cnn_s")
    assert ident == {"source": "file", "path": str(path),
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "params": param_count(dst)}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_load_weights_wrong_class_count(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(build_model("cnn_s", 100, (3, 16, 16), width=8).state_dict(), path)
    with pytest.raises(KDCacheError) as err:
        load_weights(build_model("cnn_s", 10, (3, 16, 16), width=8), str(path), "cnn_s")
    assert str(err.value) == (
        f"weights {path} do not fit cnn_s with 10 classes: fc.weight has shape (100, 32) in the file "
        "but (10, 32) in the model; pass weights trained for this architecture and class count"
    )


def test_load_weights_wrong_architecture(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": build_model("mlp", 10, (3, 8, 8), hidden=(4,)).state_dict(), "arch": "mlp"}, path)
    with pytest.raises(KDCacheError, match=r"not in the file \(the file says arch 'mlp'\)"):
        load_weights(build_model("cnn_s", 10, (3, 8, 8), width=8), str(path), "cnn_s")


def _side_effect(path):
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this would run _side_effect; a weights-only load must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _side_effect, (str(self.marker),)


def test_load_weights_refuses_pickled_code(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, path)
    with pytest.raises(KDCacheError, match="not a plain state_dict"):
        load_weights(build_model("cnn_s", 10, (3, 8, 8), width=8), str(path), "cnn_s")
    assert not marker.exists()


def test_load_weights_missing_or_garbage_file(tmp_path):
    model = build_model("cnn_s", 10, (3, 8, 8), width=8)
    with pytest.raises(KDCacheError, match="not found"):
        load_weights(model, str(tmp_path / "nope.pt"), "cnn_s")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(KDCacheError, match="not a readable torch checkpoint"):
        load_weights(model, str(tmp_path / "junk.pt"), "cnn_s")


def test_default_weights_for_builtin():
    with pytest.raises(KDCacheError) as err:
        load_weights(build_model("cnn_s", 10, (3, 8, 8)), "DEFAULT", "cnn_s")
    assert str(err.value) == (
        "no published weights for 'cnn_s': pass --weights PATH to a checkpoint (train one with kdtrain)"
    )


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads fail as they do offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return checkpoints


def test_default_weights_offline(hub_cache):
    stale = hub_cache / "resnet18-f37072fd.pth"
    stale.write_bytes(b"")
    with pytest.raises(KDCacheError) as err:
        load_weights(build_model("resnet18", 1000, (3, 32, 32)), "DEFAULT", "resnet18")
    assert str(err.value) == (
        "could not download DEFAULT weights for resnet18 (no network); "
        "download them where there is internet or pass --weights PATH"
    )
    assert not stale.exists()


def test_default_weights_class_count(hub_cache):
    with pytest.raises(KDCacheError, match="have 1000 classes but the dataset has 10"):
        load_weights(build_model("resnet18", 10, (3, 32, 32)), "DEFAULT", "resnet18")


def test_default_weights_identity(hub_cache, monkeypatch):
    published = build_model("resnet18", 1000, (3, 32, 32)).state_dict()
    cached = hub_cache / "resnet18-f37072fd.pth"
    torch.save(published, cached)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: published)
    model = build_model("resnet18", 1000, (3, 32, 32))
    ident = load_weights(model, "DEFAULT", "resnet18")
    assert ident == {
        "source": "torchvision",
        "weights": "ResNet18_Weights.IMAGENET1K_V1",
        "url": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "sha256": hashlib.sha256(cached.read_bytes()).hexdigest(),
        "params": 11_689_512,
    }
    torch.testing.assert_close(model.state_dict()["fc.weight"], published["fc.weight"])
    cached.unlink()
    assert load_weights(model, "DEFAULT", "resnet18")["sha256"] == "f37072fd"
