"""Model names to modules: built-ins, torchvision classifiers, then ``package.module:factory``."""

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from ..errors import KDCacheError
from .cnn import cnn_s
from .mixer import mixer_ti
from .mlp import mlp
from .rednet import rednet26_s, rednet_s
from .resnet import cifar_resnet10, cifar_resnet18
from .vit import vit_nano, vit_s, vit_ti

BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_resnet10": cifar_resnet10,
    "rednet26_s": rednet26_s,
    "rednet_s": rednet_s,
    "cnn_s": cnn_s,
    "mlp": mlp,
    "vit_ti": vit_ti,
    "vit_s": vit_s,
    "vit_nano": vit_nano,
    "mixer_ti": mixer_ti,
}
# Options every model accepts at these values, so a CLI can pass its flags unconditionally.
NEUTRAL_OPTIONS: dict[str, Any] = {"distill_tokens": 0, "head_mode": "cls"}


def model_names() -> list[str]:
    """Built-in model names (torchvision names and factories are accepted too)."""
    return list(BUILTINS)


@functools.cache
def torchvision_names() -> frozenset[str]:
    """torchvision classification model names (``resnet18``, ``regnet_y_400mf``, ...)."""
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def param_count(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def has_distill_heads(model: nn.Module) -> bool:
    """True for a ViT or Mixer built with ``distill_tokens > 0``."""
    return getattr(model, "distill_tokens", 0) > 0


def build_model(name: str, num_classes: int, image_size: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build ``name`` with fresh weights; kwargs are model options (width, distill_tokens, ...)."""
    if num_classes < 1 or image_size < 1:
        raise KDCacheError(
            f"cannot build {name!r} for {num_classes} classes at {image_size} px: both must be positive"
        )
    if name in BUILTINS:
        factory = BUILTINS[name]
        _check_options(name, factory, kwargs, ("num_classes", "image_size", "in_chans"))
        try:
            model = factory(num_classes, image_size, in_chans, **kwargs)
        except (TypeError, ValueError) as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
            raise KDCacheError(f"cannot build {name!r} with {shown} ({e}): check the builder options") from None
    elif name in torchvision_names():
        model = _build_torchvision(name, num_classes, image_size, in_chans, kwargs)
    elif ":" in name:
        model = _build_factory(name, num_classes, image_size, in_chans, kwargs)
    else:
        raise _unknown(name)
    if not hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def _unknown(name: str) -> KDCacheError:
    return KDCacheError(
        f"unknown model {name!r}: use one of {', '.join(BUILTINS)}, "
        "a torchvision classification model name, or package.module:factory"
    )


def _distill_models() -> list[str]:
    return [n for n, f in BUILTINS.items() if "distill_tokens" in inspect.signature(f).parameters]


def _reject_distill(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("distill_tokens", 0):
        raise KDCacheError(
            f"--distill-tokens needs a ViT or Mixer student ({', '.join(_distill_models())}); "
            f"{name!r} has no token to add"
        )


def _check_options(name: str, factory: Callable[..., Any], kwargs: dict[str, Any],
                   fixed: tuple[str, ...]) -> None:
    """Drop neutral options the factory lacks; reject any other option it does not take."""
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    if "distill_tokens" not in params:
        _reject_distill(name, kwargs)
    for key, neutral in NEUTRAL_OPTIONS.items():
        if key not in params and kwargs.get(key, neutral) == neutral:
            kwargs.pop(key, None)
    taken = [p for p in params if p not in fixed]
    unknown = sorted(set(kwargs) - set(taken))
    if unknown:
        raise KDCacheError(
            f"model {name!r} does not take option {', '.join(unknown)}: "
            f"it takes {', '.join(taken) or 'no options'}"
        )


def _build_torchvision(name: str, num_classes: int, image_size: int, in_chans: int,
                       kwargs: dict[str, Any]) -> nn.Module:
    if in_chans != 3:
        raise KDCacheError(
            f"torchvision model {name!r} takes 3-channel input, not {in_chans}: use a built-in model"
        )
    _reject_distill(name, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if NEUTRAL_OPTIONS.get(k, object()) != v}
    if name.startswith("vit_"):  # torchvision's ViTs are sized at construction (default 224 px)
        kwargs.setdefault("image_size", image_size)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise KDCacheError(
            f"torchvision model {name!r} rejected options {sorted(kwargs)} ({e}): drop them"
        ) from None


def _build_factory(name: str, num_classes: int, image_size: int, in_chans: int,
                   kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise _unknown(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KDCacheError(
            f"cannot import {module_name!r} for model {name!r} ({e}): install it or put it on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise KDCacheError(f"{module_name!r} has no factory {attr!r}: check the name after ':' in {name!r}")
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    _check_options(name, factory, kwargs, ("num_classes", "image_size"))
    model = factory(num_classes=num_classes, image_size=image_size, **kwargs)
    if not isinstance(model, nn.Module):
        raise KDCacheError(
            f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module: return the model"
        )
    return model
