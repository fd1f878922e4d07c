"""Views: AugmentSpec text/json, deterministic sampling, batched rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.data.render import IMAGENET_MEAN, IMAGENET_STD, Preprocess, render, view_grid
from kdcache.data.views import VIEW_FIELDS, AugmentSpec, identity_views, sample_views
from kdcache.errors import KDCacheError

# --------------------------------------------------------------------------- AugmentSpec


@pytest.mark.parametrize(
    "text,canon",
    [
        ("none", "none"),
        ("", "none"),
        ("flip", "flip"),
        ("rrc(0.35,1)+flip", "rrc(0.35,1)+flip"),
        ("translate(0.1)", "translate(0.1)"),
        ("rrc(0.08,1,0.75,1.333)+flip+translate(0.05)", "rrc(0.08,1,0.75,1.333)+flip+translate(0.05)"),
        (" FLIP + rrc( 0.2 , 1.0 ) ", "rrc(0.2,1)+flip"),
        ("rrc(0.5,1,0.75,1.3333333333333333)", "rrc(0.5,1)"),
        ("translate(0)", "none"),
    ],
)
def test_augment_parse_str_roundtrip(text, canon):
    spec = AugmentSpec.parse(text)
    assert str(spec) == canon
    assert AugmentSpec.parse(str(spec)) == spec
    assert AugmentSpec.from_json(spec.to_json()) == spec
    import json

    assert AugmentSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_augment_fields():
    s = AugmentSpec.parse("rrc(0.08,1,0.75,1.333)+flip+translate(0.05)")
    assert s.rrc_scale == (0.08, 1.0) and s.rrc_ratio == (0.75, 1.333)
    assert s.flip is True and s.translate == 0.05
    assert AugmentSpec.parse("none") == AugmentSpec() and AugmentSpec().is_identity
    assert not s.is_identity
    assert AugmentSpec(rrc_scale=(0.35, 1), flip=True) == AugmentSpec.parse("rrc(0.35,1)+flip")


@pytest.mark.parametrize(
    "text",
    ["rrc", "rrc(0.3)", "rrc(0,1)", "rrc(0.5,0.4)", "rrc(0.5,1.5)", "flip+flip", "translate(1.5)",
     "translate(-0.1)", "blur(3)", "rrc(0.3,1,2,1)", "none+flip", "rrc(0.3,1)+"],
)
def test_augment_bad_text(text):
    with pytest.raises(KDCacheError) as e:
        AugmentSpec.parse(text)
    assert "\n" not in str(e.value)


def test_augment_bad_json():
    with pytest.raises(KDCacheError, match="damaged"):
        AugmentSpec.from_json({"rrc_scale": 3})


# --------------------------------------------------------------------------- sampling

FULL = AugmentSpec.parse("rrc(0.08,1)+flip+translate(0.1)")


def test_views_shape_and_identity():
    assert VIEW_FIELDS == ("y0", "x0", "h", "w", "flip")
    iv = identity_views(4, 3)
    assert iv.shape == (4, 3, 5) and iv.dtype == np.float32
    assert np.array_equal(iv, np.broadcast_to(np.array([0, 0, 1, 1, 0], np.float32), (4, 3, 5)))
    v = sample_views(AugmentSpec.parse("none"), np.arange(10, 20), 3, seed=5)
    assert v.dtype == np.float32 and np.array_equal(v, identity_views(10, 3))


def test_views_deterministic_independent_of_batching():
    idx = np.arange(0, 500)
    full = sample_views(FULL, idx, 4, seed=3)
    assert full.shape == (500, 4, 5) and full.dtype == np.float32
    assert np.array_equal(full, sample_views(FULL, idx, 4, seed=3))
    # chunks, reversed order, singletons, shuffled
    chunks = np.concatenate([sample_views(FULL, idx[s:s + 37], 4, seed=3) for s in range(0, 500, 37)])
    assert np.array_equal(chunks, full)
    assert np.array_equal(sample_views(FULL, idx[::-1], 4, seed=3), full[::-1])
    perm = np.random.default_rng(0).permutation(500)
    assert np.array_equal(sample_views(FULL, idx[perm], 4, seed=3), full[perm])
    assert np.array_equal(sample_views(FULL, np.array([123]), 4, seed=3)[0], full[123])
    # more views extend, fewer views are a prefix: view v depends only on (seed, i, v)
    assert np.array_equal(sample_views(FULL, idx, 7, seed=3)[:, :4], full)
    assert np.array_equal(sample_views(FULL, idx, 1, seed=3)[:, 0], full[:, 0])
    # seed and index matter
    assert not np.array_equal(sample_views(FULL, idx, 4, seed=4), full)
    assert not np.array_equal(full[0], full[1])
    # large index values and dtypes
    big = np.array([2**40, 7], dtype=np.int64)
    assert np.array_equal(sample_views(FULL, big.astype(np.uint64), 2, 3), sample_views(FULL, big, 2, 3))
    assert np.array_equal(sample_views(FULL, big, 2, 3)[1], full[7, :2])


def test_views_components_independent():
    """Enabling flip or translation does not change the RRC boxes drawn."""
    idx = np.arange(300)
    rrc = sample_views(AugmentSpec.parse("rrc(0.2,1)"), idx, 2, seed=0)
    both = sample_views(AugmentSpec.parse("rrc(0.2,1)+flip"), idx, 2, seed=0)
    assert np.array_equal(rrc[..., :4], both[..., :4])


def test_rrc_ranges():
    spec = AugmentSpec.parse("rrc(0.25,0.8)")
    v = sample_views(spec, np.arange(4000), 2, seed=11).reshape(-1, 5).astype(np.float64)
    y0, x0, h, w, fl = v.T
    eps = 1e-6
    assert np.all(y0 >= -eps) and np.all(x0 >= -eps)
    assert np.all(y0 + h <= 1 + eps) and np.all(x0 + w <= 1 + eps)
    area = h * w
    assert np.all(area >= 0.25 - 1e-5) and np.all(area <= 0.8 + 1e-5)
    ratio = w / h
    assert np.all(ratio >= 0.75 - 1e-5) and np.all(ratio <= 4 / 3 + 1e-5)
    assert np.all(fl == 0)
    # areas cover the range; boxes are placed all over the image
    assert area.min() < 0.27 and area.max() > 0.78
    cy, cx = y0 + h / 2, x0 + w / 2
    assert abs(cy.mean() - 0.5) < 0.02 and abs(cx.mean() - 0.5) < 0.02
    assert cy.min() < 0.3 and cy.max() > 0.7


def test_rrc_fallback_central_crop():
    # areas near 1 with extreme aspect ratios never fit: all fall back to the centre crop
    spec = AugmentSpec.parse("rrc(0.99,1,2,3)")
    v = sample_views(spec, np.arange(50), 1, seed=0)[:, 0]
    assert np.allclose(v, [0.25, 0, 0.5, 1, 0], atol=1e-7)
    spec = AugmentSpec.parse("rrc(0.99,1,0.25,0.5)")
    v = sample_views(spec, np.arange(50), 1, seed=0)[:, 0]
    assert np.allclose(v, [0, 0.25, 1, 0.5, 0], atol=1e-7)


def test_translate_and_flip_distribution():
    v = sample_views(AugmentSpec.parse("translate(0.1)+flip"), np.arange(5000), 1, seed=2)[:, 0]
    assert np.all(np.abs(v[:, :2]) <= 0.1 + 1e-7)
    assert np.all(v[:, 2:4] == 1)
    assert abs(v[:, 0].mean()) < 0.01 and v[:, 0].std() > 0.05
    assert set(np.unique(v[:, 4]).tolist()) == {0.0, 1.0}
    assert 0.45 < v[:, 4].mean() < 0.55
    # all views are drawn alike: view 0 is not special
    vv = sample_views(AugmentSpec.parse("flip"), np.arange(2000), 3, seed=2)
    assert 0.45 < vv[:, 0, 4].mean() < 0.55 and 0.45 < vv[:, 2, 4].mean() < 0.55


# --------------------------------------------------------------------------- rendering


def _norm(x01: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01.expand(-1, 3, -1, -1) - m) / s


def _imgs(b=6, c=1, h=8, w=8, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, c, h, w), dtype=np.uint8))


def _views(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_preprocess_json_and_validation():
    p = Preprocess(32)
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD
    assert Preprocess.from_json(p.to_json()) == p
    q = Preprocess(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert Preprocess.from_json(q.to_json()) == q
    with pytest.raises(KDCacheError):
        Preprocess(0)
    with pytest.raises(KDCacheError):
        Preprocess(8, std=(0.0, 1.0, 1.0))
    with pytest.raises(KDCacheError, match="damaged"):
        Preprocess.from_json({})


@pytest.mark.parametrize("c", [1, 3])
def test_identity_render_is_normalised_image(c):
    imgs = _imgs(c=c)
    out = render(imgs, torch.from_numpy(identity_views(6)[:, 0]), Preprocess(8))
    assert out.dtype == torch.float32 and out.shape == (6, 3, 8, 8)
    assert torch.allclose(out, _norm(imgs.float() / 255), atol=1e-5, rtol=0)
    # float input in [0, 1] gives the same
    out_f = render(imgs.float() / 255, torch.from_numpy(identity_views(6)[:, 0]), Preprocess(8))
    assert torch.allclose(out_f, out, atol=1e-6, rtol=0)


def test_flip_render_is_flipped_identity():
    imgs = _imgs(c=3, h=10, w=10)
    ident = render(imgs, _views([[0, 0, 1, 1, 0]] * 6), Preprocess(10))
    flipped = render(imgs, _views([[0, 0, 1, 1, 1]] * 6), Preprocess(10))
    assert torch.allclose(flipped, torch.flip(ident, dims=[-1]), atol=1e-5, rtol=0)
    # flip of a crop = flip of the rendered crop, at another size too
    box = [0.1, 0.2, 0.6, 0.5]
    a = render(imgs, _views([box + [0]] * 6), Preprocess(7))
    b = render(imgs, _views([box + [1]] * 6), Preprocess(7))
    assert torch.allclose(b, torch.flip(a, dims=[-1]), atol=1e-5, rtol=0)


def test_quarter_crop_is_pixel_exact():
    """Box [0,0,.5,.5] of an 8x8 image at 4x4 samples pixel centres 0..3: the top-left block."""
    imgs = _imgs(c=1, h=8, w=8)
    out = render(imgs, _views([[0, 0, 0.5, 0.5, 0]] * 6), Preprocess(4))
    assert torch.allclose(out, _norm(imgs[:, :, :4, :4].float() / 255), atol=1e-5, rtol=0)
    out = render(imgs, _views([[0.5, 0.5, 0.5, 0.5, 0]] * 6), Preprocess(4))
    assert torch.allclose(out, _norm(imgs[:, :, 4:, 4:].float() / 255), atol=1e-5, rtol=0)


def test_downscale_2x_averages_pixel_pairs():
    """Identity view of 8x8 at 4x4: bilinear at align_corners=False samples between pixel pairs."""
    imgs = _imgs(c=1, h=8, w=8)
    out = render(imgs, _views([[0, 0, 1, 1, 0]] * 6), Preprocess(4))
    x = imgs.float() / 255
    avg = F.avg_pool2d(x, 2)
    assert torch.allclose(out, _norm(avg), atol=1e-5, rtol=0)


def test_upscale_2x_bilinear_weights():
    """Identity view of 8x8 at 16x16: output pixel k samples base coordinate (k + 0.5) / 2 - 0.5."""
    imgs = _imgs(c=3, h=8, w=8)
    up = render(imgs, _views([[0, 0, 1, 1, 0]] * 6), Preprocess(16))
    assert up.shape == (6, 3, 16, 16)
    x = imgs.float() / 255
    # interior sample at output (5, 5) -> base coord (5+0.5)/2-0.5 = 2.25 between pixels 2 and 3
    want = 0.75 * 0.75 * x[:, :, 2, 2] + 0.75 * 0.25 * (x[:, :, 2, 3] + x[:, :, 3, 2]) + 0.0625 * x[:, :, 3, 3]
    m = torch.tensor(IMAGENET_MEAN).view(1, 3)
    s = torch.tensor(IMAGENET_STD).view(1, 3)
    assert torch.allclose(up[:, :, 5, 5], (want - m) / s, atol=1e-5, rtol=0)


def test_translation_moves_content_and_pads_zeros():
    imgs = _imgs(c=1, h=8, w=8)
    # shift the box 2 px (0.25) to the right: output column j shows base column j + 2
    out = render(imgs, _views([[0, 0.25, 1, 1, 0]] * 6), Preprocess(8))
    x = imgs.float() / 255
    assert torch.allclose(out[..., :6], _norm(x[..., 2:]), atol=1e-5, rtol=0)
    zero = _norm(torch.zeros(6, 1, 8, 2))
    assert torch.allclose(out[..., 6:], zero, atol=1e-5, rtol=0)
    # shift up/left by a box starting above the image: top rows are black
    out = render(imgs, _views([[-0.25, 0, 1, 1, 0]] * 6), Preprocess(8))
    assert torch.allclose(out[:, :, 2:], _norm(x[:, :, :6]), atol=1e-5, rtol=0)
    assert torch.allclose(out[:, :, :2], _norm(torch.zeros(6, 1, 2, 8)), atol=1e-5, rtol=0)


def test_render_batch_vs_one_by_one_bitwise():
    imgs = _imgs(b=24, c=3, h=12, w=12, seed=3)
    v = torch.from_numpy(sample_views(FULL, np.arange(24), 1, seed=9)[:, 0])
    pre = Preprocess(9)
    batch = render(imgs, v, pre)
    singles = torch.cat([render(imgs[i:i + 1], v[i:i + 1], pre) for i in range(24)])
    assert torch.equal(batch, singles)
    # another batch composition: reversed and a sub-batch
    rev = render(imgs.flip(0), v.flip(0), pre).flip(0)
    assert torch.equal(batch, rev)
    assert torch.equal(render(imgs[5:17], v[5:17], pre), batch[5:17])


def test_view_grid_matches_affine_grid():
    v = torch.from_numpy(sample_views(FULL, np.arange(64), 1, seed=1)[:, 0])
    y0, x0, h, w, fl = v.unbind(-1)
    theta = torch.zeros(64, 2, 3)
    theta[:, 0, 0] = torch.where(fl > 0.5, -w, w)
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    ref = F.affine_grid(theta, (64, 3, 11, 11), align_corners=False)
    assert torch.allclose(view_grid(v, 11), ref, atol=1e-6, rtol=0)


def test_same_view_different_resolutions_agree():
    """A teacher at 16 px and a student at 8 px see the same region (compare after pooling)."""
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32).contiguous()  # smooth ramp
    v = _views([[0.1, 0.2, 0.5, 0.5, 0], [0.0, 0.0, 0.7, 0.6, 1]])
    hi = render(x, v, Preprocess(16))
    lo = render(x, v, Preprocess(8))
    assert torch.allclose(F.avg_pool2d(hi, 2), lo, atol=1e-4, rtol=0)


def test_render_inputs():
    imgs = _imgs(b=2)
    one = render(imgs, torch.tensor([0, 0, 1, 1, 0.0]), Preprocess(8))  # one view for all
    assert one.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        render(imgs, torch.zeros(3, 5), Preprocess(8))
    with pytest.raises(ValueError):
        render(imgs[:, :, 0], torch.zeros(2, 5), Preprocess(8))
    with pytest.raises(ValueError):
        render(_imgs(b=2, c=2), torch.zeros(2, 5), Preprocess(8))
    # numpy views and double precision are accepted
    out = render(imgs, identity_views(2)[:, 0], Preprocess(8))
    assert torch.allclose(out, _norm(imgs.float() / 255), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_render_cuda_matches_cpu():
    imgs = _imgs(b=16, c=3, h=12, w=12, seed=4)
    v = torch.from_numpy(sample_views(FULL, np.arange(16), 1, seed=2)[:, 0])
    pre = Preprocess(20)
    cpu = render(imgs, v, pre)
    gpu = render(imgs.cuda(), v, pre)  # views follow the images to the GPU
    assert gpu.device.type == "cuda"
    assert torch.equal(view_grid(v, 20), view_grid(v.cuda(), 20).cpu())
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5, rtol=0)
