"""Views of base images: the augmentation spec and seeded sampling of crop/flip parameters.

A *view* is 5 float32 numbers ``[y0, x0, h, w, flip]`` relative to the base
image: the box's top-left corner ``(y0, x0)`` and size ``(h, w)`` as fractions
of the base image's H and W, and ``flip`` in {0, 1}, a horizontal flip applied
after cropping.  The identity view is ``[0, 0, 1, 1, 0]``.  Boxes may reach
outside ``[0, 1]`` (translation); pixels outside the base image are black (0)
before normalisation.

Because views are resolution-free, a multi-view cache stores them once and a
teacher at 224 px and a student at 32 px can both replay them with
:func:`render` and see the same part of each image.

:func:`sample_views` is a pure function of ``(spec, seed, sample index, view
index)``: it uses a counter-based hash (SplitMix64 over those integers), not a
stateful generator, so chunked, resumed, reordered or sharded dumps draw
exactly the same views.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from kdcache.errors import KDCacheError

VIEW_FIELDS = ("y0", "x0", "h", "w", "flip")  # one view's parameters, in the order caches store them

_DEFAULT_RATIO = (3 / 4, 4 / 3)
_RRC_ATTEMPTS = 10


def _fmt(x: float) -> str:
    """Shortest text that reads back as the same float ("1", "0.35", "1.3333333333333333")."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


@dataclass(frozen=True)
class AugmentSpec:
    """Which random views to draw.

    Text form (``parse`` / ``str``): ``none``, or ``+``-joined parts among
    ``rrc(SMIN,SMAX)`` / ``rrc(SMIN,SMAX,RMIN,RMAX)`` (random resized crop:
    area fraction in [SMIN, SMAX], aspect ratio w/h in [RMIN, RMAX], default
    3/4..4/3), ``flip`` (horizontal, p = 0.5) and ``translate(T)`` (shift the
    box by up to T of the side in y and x), e.g. ``rrc(0.35,1)+flip``.
    """

    rrc_scale: tuple[float, float] | None = None  # random-resized-crop area range; None = no RRC
    rrc_ratio: tuple[float, float] = _DEFAULT_RATIO
    flip: bool = False
    translate: float = 0.0  # max |shift| as a fraction of the side

    def __post_init__(self) -> None:
        if self.rrc_scale is not None:
            lo, hi = (float(v) for v in self.rrc_scale)
            if not (0.0 < lo <= hi <= 1.0):
                raise KDCacheError(
                    f"bad rrc scale ({_fmt(lo)}, {_fmt(hi)}): need 0 < min <= max <= 1, e.g. rrc(0.35,1)"
                )
            object.__setattr__(self, "rrc_scale", (lo, hi))
        r0, r1 = (float(v) for v in self.rrc_ratio)
        if not (0.0 < r0 <= r1) or not math.isfinite(r1):
            raise KDCacheError(
                f"bad rrc aspect ratio ({_fmt(r0)}, {_fmt(r1)}): need 0 < min <= max, e.g. rrc(0.08,1,0.75,1.333)"
            )
        object.__setattr__(self, "rrc_ratio", (r0, r1))
        t = float(self.translate)
        if not (0.0 <= t < 1.0):
            raise KDCacheError(f"bad translate({_fmt(t)}): need 0 <= T < 1, e.g. translate(0.1)")
        object.__setattr__(self, "translate", t)
        object.__setattr__(self, "flip", bool(self.flip))

    @property
    def is_identity(self) -> bool:
        """True when every sampled view is the identity (spec ``none``)."""
        return self.rrc_scale is None and not self.flip and self.translate == 0.0

    @classmethod
    def parse(cls, text: str) -> "AugmentSpec":
        """Read the text form (see the class docstring); bad text -> KDCacheError."""
        src = "" if text is None else str(text)
        t = re.sub(r"\s+", "", src).lower()
        hint = "use e.g. none, flip, rrc(0.35,1)+flip, translate(0.1) or rrc(0.08,1,0.75,1.333)+flip"
        if t in ("", "none"):
            return cls()
        kw: dict = {}
        num = r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"
        for part in t.split("+"):
            if part == "flip":
                key = "flip"
                val: object = True
            elif m := re.fullmatch(rf"rrc\({num},{num}(?:,{num},{num})?\)", part):
                key = "rrc_scale"
                val = (float(m[1]), float(m[2]))
                if m[3] is not None:
                    kw["rrc_ratio"] = (float(m[3]), float(m[4]))
            elif m := re.fullmatch(rf"translate\({num}\)", part):
                key, val = "translate", float(m[1])
            else:
                raise KDCacheError(f"bad augmentation {src!r} (part {part!r}): {hint}")
            if key in kw:
                raise KDCacheError(f"bad augmentation {src!r}: {part.split('(')[0]} given twice; {hint}")
            kw[key] = val
        return cls(**kw)

    def __str__(self) -> str:
        parts = []
        if self.rrc_scale is not None:
            args = [*self.rrc_scale]
            if self.rrc_ratio != _DEFAULT_RATIO:
                args += [*self.rrc_ratio]
            parts.append("rrc(" + ",".join(_fmt(a) for a in args) + ")")
        if self.flip:
            parts.append("flip")
        if self.translate:
            parts.append(f"translate({_fmt(self.translate)})")
        return "+".join(parts) if parts else "none"

    def to_json(self) -> dict:
        return {
            "rrc_scale": None if self.rrc_scale is None else list(self.rrc_scale),
            "rrc_ratio": list(self.rrc_ratio),
            "flip": self.flip,
            "translate": self.translate,
        }

    @classmethod
    def from_json(cls, d: dict) -> "AugmentSpec":
        try:
            scale = d.get("rrc_scale")
            return cls(
                rrc_scale=None if scale is None else (float(scale[0]), float(scale[1])),
                rrc_ratio=tuple(float(v) for v in d.get("rrc_ratio", _DEFAULT_RATIO)),  # type: ignore[arg-type]
                flip=bool(d.get("flip", False)),
                translate=float(d.get("translate", 0.0)),
            )
        except (AttributeError, TypeError, ValueError, IndexError) as e:
            raise KDCacheError(f"bad stored augmentation {d!r} ({e}): the cache metadata is damaged") from None


# --------------------------------------------------------------------------- sampling

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)

# random-number slots per view (each a pure function of seed, index, view, slot)
_SLOT_AREA = 0
_SLOT_RATIO = _SLOT_AREA + _RRC_ATTEMPTS
_SLOT_TOP = _SLOT_RATIO + _RRC_ATTEMPTS
_SLOT_LEFT = _SLOT_TOP + _RRC_ATTEMPTS
_SLOT_TY = _SLOT_LEFT + _RRC_ATTEMPTS
_SLOT_TX = _SLOT_TY + 1
_SLOT_FLIP = _SLOT_TX + 1
_N_SLOTS = _SLOT_FLIP + 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, indices: np.ndarray, n_views: int, slots: np.ndarray, stream: int = 0) -> np.ndarray:
    """float64 uniforms in [0, 1), shape (len(indices), n_views, len(slots)): a pure function of (seed, stream,
    sample index, view, slot), so any batching, order or sharding draws the same numbers. Streams keep unrelated
    uses (views 0, sampled soft labels 1) independent under one seed."""
    with np.errstate(over="ignore"):
        s = np.array([(int(seed) ^ (int(stream) << 48)) % (1 << 64)], dtype=np.uint64)
        key = _mix(s ^ np.uint64(0x6B64636163686521))  # "kdcache!"
        idx = indices.astype(np.int64).view(np.uint64)
        k = _mix(key + idx * _GOLDEN)  # (N,)
        v = np.arange(n_views, dtype=np.uint64)
        k = _mix(k[:, None] ^ _mix((v + np.uint64(1)) * _GOLDEN)[None, :])  # (N, V)
        st = (slots.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        bits = _mix(k[:, :, None] + st[None, None, :])  # (N, V, S)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _sample_chunk(spec: AugmentSpec, indices: np.ndarray, n_views: int, seed: int) -> np.ndarray:
    n = len(indices)
    out = np.zeros((n, n_views, 5), dtype=np.float64)
    out[..., 2] = 1.0
    out[..., 3] = 1.0
    if spec.rrc_scale is not None:
        a = _RRC_ATTEMPTS
        u = counter_uniforms(seed, indices, n_views, np.arange(_SLOT_AREA, _SLOT_LEFT + a))
        lo, hi = spec.rrc_scale
        area = lo + (hi - lo) * u[..., _SLOT_AREA:_SLOT_AREA + a]
        lr0, lr1 = math.log(spec.rrc_ratio[0]), math.log(spec.rrc_ratio[1])
        ratio = np.exp(lr0 + (lr1 - lr0) * u[..., _SLOT_RATIO:_SLOT_RATIO + a])
        w = np.sqrt(area * ratio)
        h = np.sqrt(area / ratio)
        ok = (w <= 1.0) & (h <= 1.0)
        first = np.argmax(ok, axis=-1)[..., None]  # first accepted attempt
        found = ok.any(axis=-1)
        hs = np.take_along_axis(h, first, -1)[..., 0]
        ws = np.take_along_axis(w, first, -1)[..., 0]
        ut = np.take_along_axis(u[..., _SLOT_TOP:_SLOT_TOP + a], first, -1)[..., 0]
        ul = np.take_along_axis(u[..., _SLOT_LEFT:_SLOT_LEFT + a], first, -1)[..., 0]
        # torchvision's fallback: the central crop of the closest allowed aspect ratio
        r0, r1 = spec.rrc_ratio
        if 1.0 < r0:
            fh, fw = 1.0 / r0, 1.0
        elif 1.0 > r1:
            fh, fw = 1.0, r1
        else:
            fh, fw = 1.0, 1.0
        out[..., 2] = np.where(found, hs, fh)
        out[..., 3] = np.where(found, ws, fw)
        out[..., 0] = np.where(found, ut * (1.0 - hs), (1.0 - fh) / 2)
        out[..., 1] = np.where(found, ul * (1.0 - ws), (1.0 - fw) / 2)
    if spec.translate:
        u = counter_uniforms(seed, indices, n_views, np.array([_SLOT_TY, _SLOT_TX]))
        out[..., 0] += spec.translate * (2.0 * u[..., 0] - 1.0)
        out[..., 1] += spec.translate * (2.0 * u[..., 1] - 1.0)
    if spec.flip:
        u = counter_uniforms(seed, indices, n_views, np.array([_SLOT_FLIP]))
        out[..., 4] = (u[..., 0] < 0.5).astype(np.float64)
    return out.astype(np.float32)


def sample_views(spec: AugmentSpec, indices: np.ndarray, n_views: int, seed: int) -> np.ndarray:
    """Draw ``n_views`` views per sample: float32 ``(len(indices), n_views, 5)``.

    View ``v`` of sample ``i`` is a pure function of ``(spec, seed, i, v)``
    (a SplitMix64 hash of those integers feeds fixed random-number slots), so
    any batching, order, chunking or sharding of ``indices`` -- and any
    ``n_views`` -- gives the same view for the same ``(i, v)``.  All views are
    drawn alike (view 0 is not special).

    Per view, in order:

    * RRC (``spec.rrc_scale``): torchvision's RandomResizedCrop in continuous
      normalised coordinates: up to 10 attempts of area ~ U(scale), log
      aspect ~ U(log ratio), ``w = sqrt(area*ratio)``, ``h = sqrt(area/ratio)``;
      the first with ``w, h <= 1`` is placed uniformly inside the image; if
      none fits, the central crop of the nearest allowed aspect ratio.  The
      aspect ratio is relative to the base image's sides, i.e. a true pixel
      aspect ratio for square base images (all built-in datasets).
    * translate: ``y0, x0 += U(-T, T)`` each.
    * flip: Bernoulli(0.5).

    With spec ``none`` every view is the identity.
    """
    indices = np.asarray(indices).reshape(-1)
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    n_views = int(n_views)
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if spec.is_identity or len(indices) == 0:
        return identity_views(len(indices), n_views)
    chunk = max(1, 32768 // n_views)
    parts = [
        _sample_chunk(spec, indices[s:s + chunk], n_views, seed) for s in range(0, len(indices), chunk)
    ]
    return np.concatenate(parts, axis=0)


def identity_views(n: int, n_views: int = 1) -> np.ndarray:
    """float32 ``(n, n_views, 5)`` of identity views ``[0, 0, 1, 1, 0]``."""
    out = np.zeros((int(n), int(n_views), 5), dtype=np.float32)
    out[..., 2] = 1.0
    out[..., 3] = 1.0
    return out
