"""timm (pytorch-image-models) classifiers as kdcache models: ``timm:NAME``, through the ``timm`` extra.

``build_timm(NAME, num_classes, input_shape)`` is ``timm.create_model(NAME, pretrained=False,
num_classes=num_classes, in_chans=C)``, plus ``img_size=S`` for models sized at construction (ViTs and the like take
it; models that reject it are built without it). NAME may carry a pretrained tag
(``vit_small_patch16_224.augreg_in1k``), which picks that tag's configuration.

**Preprocessing is the model's own.** :func:`timm_preprocess` reads the model's pretrained configuration (what
``timm.data.resolve_model_data_config`` resolves for the built model, read here without building it): input size,
mean, std, interpolation and crop_pct. A ``--image-size`` the user gives wins over the configuration's input size;
mean, std, interpolation and crop_pct stay the model's. kdcache renders with ``grid_sample``, so timm's
interpolations map onto its modes: bilinear, bicubic and nearest as named, the PIL-only filters (lanczos, hamming,
box, random) to bicubic. ``crop_pct`` c < 1 makes the identity view the central c-fraction box of the base image
(timm's eval transform: resize to size / c, centre crop), whatever timm's ``crop_mode`` (base images are square).

**DEFAULT weights** (:func:`pretrained_state`, called by ``kdcache.models.weights.load_weights``) are timm's
pretrained weights for NAME, read from the local caches when there (offline too), else downloaded from the Hugging
Face hub (or the configuration's URL) into them; offline (``HF_HUB_OFFLINE=1``, or the host unreachable) and not
cached, that is a one-line KDCacheError. They must have the dataset's class count: kdcache never puts a freshly
initialised head on a teacher. Their recorded sha256 is :func:`state_sha256` of the loaded state_dict (timm's
download has no single file to hash).

How the preprocessing reaches a cache: the dump builds each ``timm:`` teacher's ``Preprocess`` from
:func:`timm_preprocess` (instead of kdcache's default for the data), renders with it, and records it as
``teacher.preprocess`` (``interpolation`` and ``crop_pct`` are written only when they differ from bilinear and 1.0).

timm is imported lazily, so this module costs nothing when the extra is not installed.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import KDCacheError, printable

PREFIX = "timm:"
INSTALL_HINT = "pip install 'kdcache[timm]'"
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest",
          "lanczos": "bicubic", "hamming": "bicubic", "box": "bicubic", "random": "bicubic"}
_BUILD_ATTR = "kdcache_timm"  # what a built model remembers of its construction (DEFAULT weights rebuild it)


def is_timm(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise KDCacheError(f"timm models need timm ({e}): {INSTALL_HINT}") from None
    return timm


def _arch(name: str) -> str:
    arch = name[len(PREFIX):] if is_timm(name) else name
    timm = _timm()
    if not arch or not timm.is_model(arch):
        raise KDCacheError(f"timm has no model {printable(arch)!r}: pick a name from timm.list_models() "
                           "(e.g. timm:resnet50, timm:vit_small_patch16_224)")
    return arch


def pretrained_config(name: str) -> dict[str, Any]:
    """The model's pretrained configuration as ``timm.data.resolve_data_config`` resolves it (input_size, mean,
    std, interpolation, crop_pct, crop_mode), without building the model."""
    timm = _timm()
    arch = _arch(name)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:  # no pretrained configuration at all: timm's defaults (ImageNet)
        return dict(timm.data.resolve_data_config({}))
    return dict(timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict()))


def timm_preprocess(name: str, image_size: int | None = None, crop_pct: float | None = None) -> dict[str, Any]:
    """``kdcache.data.render.Preprocess`` fields for timm model ``name``: the user's ``image_size`` if given, else
    the configuration's input size; mean, std, interpolation and crop_pct from the configuration (``crop_pct``
    given: that one instead, e.g. a student replaying a cache's crop). A plain dict: the data layer builds it."""
    cfg = pretrained_config(name)
    _, h, w = cfg["input_size"]
    if image_size is None:
        if h != w:
            raise KDCacheError(f"{name} takes {h}x{w} inputs and kdcache renders square ones: pass --image-size S")
        image_size = int(h)
    mode = _MODES.get(str(cfg.get("interpolation", "bilinear")), "bicubic")
    crop = float(cfg.get("crop_pct") or 1.0) if crop_pct is None else float(crop_pct)
    return {"image_size": int(image_size), "mean": tuple(float(m) for m in cfg["mean"]),
            "std": tuple(float(s) for s in cfg["std"]), "interpolation": mode, "crop_pct": min(crop, 1.0)}


def build_timm(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=C[, img_size=S], **kwargs)``: fresh
    weights for inputs of ``input_shape`` ((C, S, S) images; other ranks are refused)."""
    arch = _arch(name)
    timm = _timm()
    if len(input_shape) != 3:
        raise KDCacheError(f"model {name!r} takes images (C, H, W), but the inputs have shape {tuple(input_shape)}: "
                           "use a model for such inputs (e.g. mlp, or package.module:factory)")
    c, h, w = (int(s) for s in input_shape)
    base = {"num_classes": int(num_classes), "in_chans": c, **kwargs}
    sized = {**base, "img_size": h if h == w else (h, w)}
    model, used = None, sized
    if "img_size" not in kwargs:
        try:
            model = timm.create_model(arch, pretrained=False, **sized)
        except TypeError as e:  # a model sized by its input at run time (CNNs) takes no img_size
            if "img_size" not in str(e):
                raise _build_error(name, kwargs, e) from None
        except (ValueError, RuntimeError, AssertionError) as e:
            raise _build_error(name, kwargs, e) from None
    if model is None:
        used = base
        try:
            model = timm.create_model(arch, pretrained=False, **base)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise _build_error(name, kwargs, e) from None
    setattr(model, _BUILD_ATTR, {"arch": arch, "kwargs": used})
    return model


def _build_error(name: str, kwargs: dict[str, Any], e: BaseException) -> KDCacheError:
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
    return KDCacheError(f"cannot build {name!r} with {shown} ({_first_line(e)}): check the builder options")


def _first_line(e: BaseException) -> str:
    return printable((str(e).strip().splitlines() or [type(e).__name__])[0])


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict: names, dtypes, shapes and bytes, in key order (weights downloaded by timm
    have no one file kdcache can hash)."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        h.update(f"{key}\0{a.dtype}\0{tuple(a.shape)}\0".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode (cache only) for the block; it reads the flag at every call."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm then loads from URLs (torch.hub's cache first)
        yield
        return
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _host(cfg: Any) -> tuple[str, int] | None:
    """(host, port) the weights would be downloaded from: the hub's endpoint, else the configuration's URL."""
    url = cfg.url or ""
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants

            url = constants.ENDPOINT
        except ImportError:
            pass
    parsed = urlparse(url)
    if not parsed.hostname:
        return None
    return parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)


def _reachable(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def published_classes(name: str) -> int | None:
    """The class count of timm's pretrained weights for ``name`` (None: timm publishes none)."""
    _timm()
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(_arch(name))
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return None
    return int(cfg.num_classes) if cfg.num_classes else None


def pretrained_state(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """timm's pretrained weights for ``name`` as a state_dict for ``model`` (built by :func:`build_timm`: timm
    rebuilds the same architecture with ``pretrained=True``, adapting the checkpoint to its input size and channels
    as it does for its own models), and their identity (source, weights = architecture.tag, hf_hub_id or url).
    Cached weights load with no request; otherwise they are downloaded, after a quick check that the host can be
    reached. The caller loads the state strictly and hashes it (:func:`state_sha256`)."""
    timm = _timm()
    built = getattr(model, _BUILD_ATTR, None)
    arch = _arch(name)
    kwargs = dict(built["kwargs"]) if isinstance(built, dict) else {"num_classes": getattr(model, "num_classes", None)}
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise KDCacheError(f"timm publishes no pretrained weights for {name}: pass --weights PATH to a checkpoint")
    classes, ours = cfg.num_classes, kwargs.get("num_classes")
    if classes and ours is not None and ours != classes:
        raise KDCacheError(f"DEFAULT weights for {name} have {classes} classes but the dataset has {ours}: use a "
                           f"dataset of those {classes} classes, or pass --weights PATH to a checkpoint trained for "
                           f"{ours} (kdtrain --student {name} makes one)")
    where = cfg.hf_hub_id or cfg.url or cfg.file
    try:
        try:  # from the local caches first (no request at all), so cached weights load offline
            with _hub_offline():
                ref = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception:  # noqa: BLE001 - not cached (the error types vary by source)
            if _offline():
                raise
            host = _host(cfg)
            if host and not _reachable(*host):  # fail in one line, not after the hub's minute of retries
                raise ConnectionError(f"{host[0]} cannot be reached") from None
            ref = timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub, HTTP and file errors of many types
        hint = " (HF_HUB_OFFLINE is set)" if _offline() else ""
        raise KDCacheError(f"could not load timm's pretrained weights for {name} from {printable(where)}{hint} "
                           f"({type(e).__name__}: {_first_line(e)}): download them where there is internet (they "
                           "are cached for later offline use) or pass --weights PATH") from None
    tag = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else arch
    origin = {"hf_hub_id": cfg.hf_hub_id} if cfg.hf_hub_id else {"url": cfg.url or cfg.file}
    return ref.state_dict(), {"source": "timm", "weights": tag, **origin}
