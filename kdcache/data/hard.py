"""``digits-hard``: the embedded 8x8 digits rendered onto a larger, cluttered, noisy canvas (generated, no files).

Why: on ``digits`` (8x8, centred) every model is ~98 % right and a teacher is ~100 % right and near one-hot on its
own training images, so distillation has nothing to pass on.  Here each real scikit-learn digit is placed on a
``SIZE x SIZE`` canvas at a random position and scale, among fragments of other digits and pixel noise.  A CNN,
whose convolutions share weights across positions, learns this far better than an MLP, which has to learn every
position separately: students are far from saturation and architectures' inductive biases matter.

Construction (all draws from ``np.random.RandomState`` -- a legacy generator whose stream numpy keeps fixed --
seeded per split; arithmetic in float64, quantised with ``rint``; the result is the same bytes on every run):

* the source digits are ``digits``' own stratified 80/20 split (1437 train / 360 test source images, see
  :func:`kdcache.data.datasets._digits_split`), so train and test never share a source digit;
* each source digit is rendered ``REPEATS[split]`` times (train 2x = 2874 images, test 3x = 1080 images), in
  sample-major order (all first renderings, then all second ...);
* a rendering scales the 8x8 digit by ``s`` (side ``8 s`` px, bilinear, separable: an independent aspect jitter of
  +-10 % per axis) and centres it at ``centre + r (cos a, sin a)`` px with ``a`` uniform and ``r = R sqrt(u)``
  (uniform over a disc of radius ``R``); then ``CLUTTER`` 4x4 fragments of other digits of the same split,
  rendered at the same kind of scale at uniform positions, are merged with a pixelwise max at ``FRAGMENT_GAIN``
  of their intensity; then Gaussian noise (std ``NOISE``) is added and the image clipped to [0, 1];
* the *variants* (for shift-robustness tests, Abnar et al.'s setting) keep the same train split and the very same
  test draws (digits, clutter, noise, directions), changing only the digit's geometry on the test split:

  =======================  ==============================  ======================================
  spec                     scale ``s`` (digit side, px)     centre offset ``r`` (px)
  =======================  ==============================  ======================================
  ``digits-hard``          1.6 - 2.2 (12.8 - 17.6)          disc of radius 3
  ``digits-hard-shift``    same                             annulus 5 - 6 (beyond anything in train)
  ``digits-hard-small``    1.1 - 1.4 (8.8 - 11.2)           disc of radius 3
  ``digits-hard-large``    2.6 - 2.9 (20.8 - 23.2)          disc of radius 3
  =======================  ==============================  ======================================

Samples are ``(1, 24, 24)`` uint8 grey images; run models at ``--image-size 24`` (the native size: no resampling).
``ds.source_index`` gives each sample's index into the 1797 scikit-learn digits, ``ds.repeat`` its rendering.
"""

from __future__ import annotations

import functools

import numpy as np

from kdcache.data.sources import ArrayDataset, DatasetInfo

SIZE = 24
REPEATS = {"train": 2, "test": 3}
SEEDS = {"train": 14_001, "test": 14_002}
SCALE = (1.6, 2.2)
RADIUS = (0.0, 3.0)
ASPECT = 0.10
CLUTTER = 6
FRAGMENT = 4
FRAGMENT_GAIN = 0.8
NOISE = 0.12
VARIANTS = {  # name -> (scale range, radius range) on the test split
    "": (SCALE, RADIUS),
    "shift": (SCALE, (5.0, 6.0)),
    "small": ((1.1, 1.4), RADIUS),
    "large": ((2.6, 2.9), RADIUS),
}
NAME = "digits-hard"


def spec_names() -> list[str]:
    """``digits-hard`` and its test-split variants ``digits-hard-shift``, ``-small``, ``-large``."""
    return [NAME + (f"-{v}" if v else "") for v in VARIANTS]


def is_hard_spec(low: str) -> bool:
    return low in spec_names()


def _interp(centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, SIZE, 8) bilinear weights mapping an 8-pixel source axis onto the canvas axis, zero outside.

    Canvas pixel j (centre j + 0.5) samples the source at ``(j + 0.5 - centre) / scale + 4`` (pixel units, pixel i
    covering [i, i + 1)), i.e. at index position ``p = that - 0.5``; weights ``max(0, 1 - |p - i|)``.
    """
    j = np.arange(SIZE, dtype=np.float64) + 0.5
    p = (j[None, :] - centre[:, None]) / scale[:, None] + 4.0 - 0.5  # (N, SIZE)
    i = np.arange(8, dtype=np.float64)
    return np.clip(1.0 - np.abs(p[:, :, None] - i[None, None, :]), 0.0, None)


def _place(src: np.ndarray, cy: np.ndarray, cx: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """(N, 8, 8) float images -> (N, SIZE, SIZE), each scaled by (sy, sx) and centred at (cy, cx) px."""
    wy, wx = _interp(cy, sy), _interp(cx, sx)
    return np.einsum("nyi,nij,nxj->nyx", wy, src, wx, optimize=True)


def _draws(split: str, n: int, pool: int) -> dict[str, np.ndarray]:
    """Every random number of a split, drawn in one fixed order (variants reuse them)."""
    rng = np.random.RandomState(SEEDS[split])
    return {
        "u_scale": rng.uniform(0, 1, n), "aspect": rng.uniform(-ASPECT, ASPECT, (n, 2)),
        "angle": rng.uniform(0, 2 * np.pi, n), "u_radius": rng.uniform(0, 1, n),
        "frag_src": rng.randint(0, pool, (n, CLUTTER)),
        "frag_win": rng.randint(0, 8 - FRAGMENT + 1, (n, CLUTTER, 2)),
        "frag_scale": rng.uniform(SCALE[0], SCALE[1], (n, CLUTTER)),
        "frag_pos": rng.uniform(0, SIZE, (n, CLUTTER, 2)),
        "noise": rng.standard_normal((n, SIZE, SIZE)),
    }


@functools.lru_cache(maxsize=8)
def _build(split: str, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, SIZE, SIZE), labels int64, source_index int64, repeat int64) of one split/variant."""
    from kdcache.data.datasets import _digits_arrays, _digits_split

    images, y = _digits_arrays()
    src_idx = _digits_split(y, split)
    reps = REPEATS[split]
    source = np.tile(src_idx, reps)
    repeat = np.repeat(np.arange(reps), len(src_idx))
    n = len(source)
    src = images[source].astype(np.float64) / 255.0  # (N, 8, 8)
    d = _draws(split, n, len(src_idx))
    (s_lo, s_hi), (r_lo, r_hi) = VARIANTS[variant] if split == "test" else (SCALE, RADIUS)
    s = s_lo + d["u_scale"] * (s_hi - s_lo)
    r = np.sqrt(r_lo ** 2 + d["u_radius"] * (r_hi ** 2 - r_lo ** 2))  # uniform over the disc / annulus
    cy = SIZE / 2 + r * np.sin(d["angle"])
    cx = SIZE / 2 + r * np.cos(d["angle"])
    canvas = _place(src, cy, cx, s * (1 + d["aspect"][:, 0]), s * (1 + d["aspect"][:, 1]))
    # clutter: a FRAGMENT x FRAGMENT window of another digit of the same split, in place in an 8x8 frame
    pool = images[src_idx].astype(np.float64) / 255.0
    for k in range(CLUTTER):
        frag = np.zeros((n, 8, 8))
        w = d["frag_win"][:, k]
        other = pool[d["frag_src"][:, k]]
        for a in range(FRAGMENT):
            for b in range(FRAGMENT):
                rows, cols = w[:, 0] + a, w[:, 1] + b
                frag[np.arange(n), rows, cols] = other[np.arange(n), rows, cols]
        # place the frame so that the window's centre lands at frag_pos
        off = (w + FRAGMENT / 2 - 4.0) * d["frag_scale"][:, k, None]
        fy, fx = d["frag_pos"][:, k, 0] - off[:, 0], d["frag_pos"][:, k, 1] - off[:, 1]
        fs = d["frag_scale"][:, k]
        canvas = np.maximum(canvas, FRAGMENT_GAIN * _place(frag, fy, fx, fs, fs))
    canvas = np.clip(canvas + NOISE * d["noise"], 0.0, 1.0)
    out = np.rint(canvas * 255.0).astype(np.uint8)
    labels = y[source].astype(np.int64)
    for a in (out, labels, source, repeat):
        a.setflags(write=False)
    return out, labels, source.astype(np.int64), repeat.astype(np.int64)


def open_digits_hard(spec: str, split: str) -> ArrayDataset:
    """``digits-hard`` or a variant (see the module docstring) for ``split`` ("train" or "test")."""
    low = spec.strip().lower()
    variant = low[len(NAME) + 1:] if low != NAME else ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown digits-hard variant {spec!r}: use one of {', '.join(spec_names())}")
    images, labels, source, repeat = _build(split, variant if split == "test" else "")
    info = DatasetInfo(spec, split, 10, tuple(str(i) for i in range(10)), (1, SIZE, SIZE))
    ds = ArrayDataset(info, images.copy(), labels, "NHW")  # a writable copy: the built arrays stay cached
    ds.source_index, ds.repeat = source, repeat
    return ds
