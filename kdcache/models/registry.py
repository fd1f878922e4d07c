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
from .sequence import gpt_nano, lstm_cls, lstm_lm, transformer_cls
from .shapes import square_image
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
    "gpt_nano": gpt_nano,
    "lstm_lm": lstm_lm,
    "lstm_cls": lstm_cls,
    "transformer_cls": transformer_cls,
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


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any] | None = None,
                vocab_size: int | None = None, **kwargs: Any) -> nn.Module:
    """Build ``name`` with fresh weights for inputs of ``input_shape`` (one sample: (3, S, S) for rendered images,
    the dataset's own shape for tensors); ``vocab_size`` is the vocabulary token-id inputs index (given to builders
    that take it); ``options`` (a user's builder options, e.g. from --student-arg) and kwargs are model options
    (width, distill_tokens, ...)."""
    kwargs = {**(options or {}), **kwargs}
    input_shape = tuple(int(s) for s in input_shape)
    if num_classes < 1 or not input_shape or min(input_shape) < 1:
        raise KDCacheError(f"cannot build {name!r} for {num_classes} classes and inputs {input_shape}: both must "
                           "be positive")
    if name in BUILTINS:
        factory = BUILTINS[name]
        _check_options(name, factory, kwargs, ("num_classes", "input_shape", "vocab_size"))
        if "vocab_size" in inspect.signature(factory).parameters:
            kwargs["vocab_size"] = vocab_size
        try:
            model = factory(num_classes, input_shape, **kwargs)
        except (TypeError, ValueError) as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
            raise KDCacheError(f"cannot build {name!r} with {shown} ({e}): check the builder options") from None
    elif name in torchvision_names():
        model = _build_torchvision(name, num_classes, input_shape, kwargs)
    elif name.startswith("hf:"):
        from .hf import build_hf  # transformers itself is imported inside, with a one-line error when missing

        _check_options(name, build_hf, kwargs, ("path", "num_classes", "input_shape", "vocab_size"))
        model = build_hf(name[3:], num_classes, input_shape, vocab_size, **kwargs)
    elif name.startswith("timm:"):
        from .timm_models import build_timm  # timm itself is imported inside, with a one-line error when missing

        _reject_distill(name, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if NEUTRAL_OPTIONS.get(k, object()) != v}
        for key in ("num_classes", "in_chans", "pretrained", "vocab_size"):
            if key in kwargs:
                raise KDCacheError(f"{key} is set by kdcache, not by a builder option: drop {key}=")
        model = build_timm(name, num_classes, input_shape, **kwargs)
    elif ":" in name:
        model = _build_factory(name, num_classes, input_shape, kwargs, vocab_size)
    else:
        raise _unknown(name)
    if not hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def model_preprocess(name: str, image_size: int | None, crop_pct: float | None = None) -> dict[str, Any]:
    """``Preprocess`` fields model ``name`` asks for beyond kdcache's defaults (the data layer builds it): a timm
    model's from its pretrained configuration (``image_size`` given: that size instead of the configuration's);
    ``crop_pct`` given (a student replaying its teacher's crop): that crop instead of the model's."""
    if name.startswith("timm:"):
        from .timm_models import timm_preprocess

        return timm_preprocess(name, image_size, crop_pct)
    return {} if crop_pct is None else {"crop_pct": crop_pct}


def _unknown(name: str) -> KDCacheError:
    return KDCacheError(
        f"unknown model {name!r}: use one of {', '.join(BUILTINS)}, "
        "a torchvision classification model name, timm:NAME, hf:DIR, or package.module:factory"
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
    """Drop neutral options the factory lacks; reject any other option it does not take (or one kdcache sets)."""
    for key in fixed:
        if key in kwargs:
            raise KDCacheError(f"{key} is set by kdcache from the data, not by a builder option: drop {key}=")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to check against: the call itself will tell
        return
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


def _build_torchvision(name: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any]) -> nn.Module:
    c, size = square_image(input_shape, name)
    if c != 3:
        raise KDCacheError(f"torchvision model {name!r} takes 3-channel input, not {c}: use a built-in model")
    _reject_distill(name, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if NEUTRAL_OPTIONS.get(k, object()) != v}
    if name.startswith("vit_"):  # torchvision's ViTs are sized at construction (default 224 px)
        kwargs.setdefault("image_size", size)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise KDCacheError(f"torchvision model {name!r} rejected options {sorted(kwargs)} ({e}): drop them") from None


def _factory_inputs(name: str, factory: Callable[..., Any], input_shape: tuple[int, ...],
                    vocab_size: int | None) -> dict[str, Any]:
    """What a factory is told about its inputs: `input_shape` (and `vocab_size`) if it takes them, else (images)
    `image_size` and, when not 3, `in_chans` — the older contract. A factory that needs an image size cannot be
    built for tensor inputs."""
    params = inspect.signature(factory).parameters
    vocab = _vocab_input(name, params, vocab_size)
    if "input_shape" in params:
        return {"input_shape": input_shape, **vocab}
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        if "image_size" in params and params["image_size"].default is inspect.Parameter.empty:
            raise KDCacheError(f"factory {name!r} takes image_size, but the inputs have shape {input_shape}: give it "
                               "an input_shape parameter instead")
        return vocab
    out: dict[str, Any] = {"image_size": input_shape[-1], **vocab}
    if input_shape[0] != 3:
        out["in_chans"] = input_shape[0]
    return out


def _vocab_input(name: str, params: Any, vocab_size: int | None) -> dict[str, Any]:
    """`vocab_size` for a factory that takes it; a one-line error when it needs one and the data has none."""
    if "vocab_size" not in params:
        return {}
    if vocab_size is None:
        if params["vocab_size"].default is inspect.Parameter.empty:
            raise KDCacheError(f"model {name!r} embeds token ids but the dataset declares no vocabulary: use a token "
                               "dataset (its vocabulary sets the embedding size)")
        return {}
    return {"vocab_size": vocab_size}


def _build_factory(name: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any],
                   vocab_size: int | None) -> nn.Module:
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
    try:
        given = _factory_inputs(name, factory, input_shape, vocab_size)
    except (TypeError, ValueError):  # no signature (a builtin or C callable): the older contract
        given = {"image_size": input_shape[-1]}
    _check_options(name, factory, kwargs, ("num_classes", "vocab_size", *given))
    try:
        model = factory(num_classes=num_classes, **given, **kwargs)
    except TypeError as e:
        raise KDCacheError(f"cannot build {name!r} ({e}): a model factory takes num_classes= and input_shape= "
                           "(or image_size=) and returns a torch.nn.Module") from None
    if not isinstance(model, nn.Module):
        raise KDCacheError(
            f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module: return the model"
        )
    return model
