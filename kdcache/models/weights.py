"""Load a checkpoint file, or torchvision's published DEFAULT weights, into a built model."""

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from ..errors import KDCacheError
from .registry import param_count, torchvision_names

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_weights(model: nn.Module, weights: str, name: str) -> dict[str, Any]:
    """Load ``weights`` (a checkpoint path, or ``DEFAULT``) into ``model`` in place.

    Returns a JSON-serialisable identity of the weights: source, path or url, sha256 and params.
    """
    if weights == "DEFAULT":
        return _load_default(model, name)
    return _load_file(model, weights, name)


def _load_file(model: nn.Module, path: str, name: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise KDCacheError(f"--weights {path} is a folder: pass the checkpoint file in it (kdtrain writes "
                           "best.pt and last.pt)")
    if not os.path.isfile(path):
        raise KDCacheError(
            f"weights file {path} not found: pass the path of a checkpoint (train one with kdtrain)"
        )
    obj = _read(path)
    arch = obj.get("arch") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise KDCacheError(
            f"weights {path} hold a {type(obj).__name__}, not a state_dict: "
            "save model.state_dict(), or a dict with it under 'model'"
        )
    hint = f" (the file says arch {arch!r})" if isinstance(arch, str) and arch != name else ""
    _fit(model, _strip_prefixes(obj), f"weights {path}", name, hint)
    return {"source": "file", "path": path, "sha256": _sha256(Path(path)), "params": param_count(model)}


def _read(path: str) -> Any:
    """``torch.load(weights_only=True)``, every failure turned into a KDCacheError (torch's own advice to retry
    with weights_only=False is never shown: kdcache does not unpickle code)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails on non-checkpoints with many error types
        if isinstance(e, pickle.UnpicklingError) and _is_pickle(path):
            raise KDCacheError(
                f"weights {path} is not a plain state_dict of tensors (refusing to unpickle code or objects); "
                "re-save it with torch.save(model.state_dict(), path)"
            ) from None
        reason = (str(e).splitlines() or [""])[0]
        raise KDCacheError(
            f"weights {path} is not a readable torch checkpoint ({type(e).__name__}: {reason}); "
            "pass a file written by torch.save"
        ) from None


def published_classes(name: str) -> int | None:
    """The class count of the published DEFAULT weights for `name`, torchvision's or timm's (None: there are none)."""
    if name.startswith("timm:"):
        from .timm_models import published_classes as timm_classes

        return timm_classes(name)
    if name not in torchvision_names():
        return None
    return len(torchvision.models.get_model_weights(name).DEFAULT.meta["categories"])


def _is_pickle(path: str) -> bool:
    """A torch.save zip or a bare pickle (protocol 2+), as opposed to bytes that are no checkpoint at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith((b"PK\x03\x04", b"\x80"))


def _load_default(model: nn.Module, name: str) -> dict[str, Any]:
    if name.startswith("hf:"):  # built from the folder's own weights: DEFAULT names them
        from .hf import hf_identity

        return hf_identity(name[3:], model)
    if name.startswith("timm:"):  # timm's pretrained weights, from the hub or its local cache
        from .timm_models import pretrained_state, state_sha256

        state, ident = pretrained_state(model, name)
        _fit(model, state, f"timm's pretrained weights {ident['weights']}", name, "")
        return ident | {"sha256": state_sha256(model), "params": param_count(model)}
    if name not in torchvision_names():
        raise KDCacheError(
            f"no published weights for {name!r}: pass --weights PATH to a checkpoint (train one with kdtrain)"
        )
    enum = torchvision.models.get_model_weights(name).DEFAULT
    classes, ours = len(enum.meta["categories"]), getattr(model, "num_classes", None)
    if ours is not None and ours != classes:
        raise KDCacheError(
            f"DEFAULT weights for {name} have {classes} classes but the dataset has {ours}: use a dataset of "
            f"those {classes} classes, or pass --weights PATH to a checkpoint trained for {ours} (kdtrain "
            f"--student {name} makes one)"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)
    if cached.is_file() and cached.stat().st_size == 0:
        cached.unlink()  # left behind by a failed offline download; torch would try to read it
    try:
        state = torch.hub.load_state_dict_from_url(
            enum.url, progress=False, check_hash=True, weights_only=True
        )
    except OSError as e:  # includes URLError
        raise KDCacheError(
            f"could not download DEFAULT weights for {name} ({getattr(e, 'reason', e)}); "
            "download them where there is internet or pass --weights PATH"
        ) from None
    except RuntimeError as e:  # bad hash or unreadable cached file
        raise KDCacheError(
            f"DEFAULT weights for {name} at {cached} are corrupt ({e}): delete that file and retry, "
            "or pass --weights PATH"
        ) from None
    _fit(model, state, f"DEFAULT weights {enum}", name, "")
    digest = _sha256(cached) if cached.is_file() else _url_hash_prefix(enum.url)
    return {"source": "torchvision", "weights": str(enum), "url": enum.url, "sha256": digest,
            "params": param_count(model)}


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DataParallel / torch.compile key prefixes shared by every key."""
    stripped = True
    while state and stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _fit(model: nn.Module, state: dict[str, Any], what: str, name: str, hint: str) -> None:
    """Load ``state`` strictly, first raising a KDCacheError that names the first mismatch."""
    own = model.state_dict()
    problems = [
        f"{k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    problems += [f"{k} is in the model but not in the file" for k in own if k not in state]
    problems += [f"{k} is in the file but not in the model" for k in state if k not in own]
    if problems:
        classes = getattr(model, "num_classes", None)
        target = f"{name} with {classes} classes" if classes is not None else name
        raise KDCacheError(
            f"{what} do not fit {target}: {problems[0]}{hint}; "
            "pass weights trained for this architecture and class count"
        )
    model.load_state_dict(state, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _url_hash_prefix(url: str) -> str:
    """The sha256 prefix torchvision puts in file names (``resnet18-f37072fd.pth``)."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(urlparse(url).path))
    return match.group(1) if match else ""


def checkpoint_arch_args(path: str) -> dict[str, Any]:
    """The builder options a kdtrain checkpoint recorded (e.g. width=16), so a dump rebuilds the same net."""
    if path == "DEFAULT" or not os.path.isfile(path):
        return {}
    obj = _read(path)
    args = obj.get("arch_args") if isinstance(obj, dict) else None
    return dict(args) if isinstance(args, dict) else {}
