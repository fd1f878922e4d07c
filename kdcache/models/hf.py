"""Hugging Face ``transformers`` causal language models from a local directory (``hf:PATH``), via the ``hf`` extra.

``build_hf(path, num_classes, input_shape, vocab_size)`` loads ``AutoModelForCausalLM.from_pretrained(path)`` offline
(``local_files_only``, never ``trust_remote_code``) and wraps it as a kdcache model: ``forward`` takes (B, L) int64
token ids and returns (B, L, num_classes) float32 logits — the row for position j is the model's distribution over
token j+1, as transformers computes it (no shift is applied here). Many checkpoints pad the output layer past the
tokenizer (Qwen2: 152064 rows for a 151936-token tokenizer); the padded rows are sliced off, so ``num_classes`` must
be the tokenizer's true size. Inputs are never padded on the left, so no attention mask is needed: a causal model's
logits at a position depend only on the ids up to it, and right-padding changes none of the real positions.

An hf model's weights are the directory's own files: :func:`hf_identity` describes them (source, path, sha256 of
the weight files, params) like `kdcache.models.weights.load_weights` describes a checkpoint.

transformers is imported lazily, so this module costs nothing when the extra is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDCacheError, printable
from .registry import param_count

INSTALL_HINT = "pip install 'kdcache[hf]'"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions")
_LFS_POINTER = b"version https://git-lfs"


def _transformers() -> Any:
    """The transformers module, offline; a one-line KDCacheError when the extra is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # kdcache never downloads: a local directory or nothing
    try:
        import transformers
    except ImportError as e:
        raise KDCacheError(f"Hugging Face models need transformers ({e}): {INSTALL_HINT}") from None
    return transformers


def _first_line(e: BaseException) -> str:
    return printable((str(e).strip().splitlines() or [type(e).__name__])[0])


def _show(path: str) -> str:
    return printable(path)


@contextmanager
def _quiet_progress(transformers: Any) -> Iterator[None]:
    """No 'Loading weights' progress bars from transformers (kdcache reports its own progress)."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _check_dir(path: str) -> None:
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "not found"
        raise KDCacheError(f"model directory {_show(path)} {what}: pass hf:PATH to a directory written by a "
                           "model's save_pretrained (config.json and model.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise KDCacheError(f"{_show(path)} has no config.json, so it is not a Hugging Face model directory: save "
                           "the model there with model.save_pretrained")


def _text_config(config: Any) -> Any:
    """The language model's own config (multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except Exception:  # an older or unusual config: use it as it is
        return config


def context_length(config: Any) -> int | None:
    """The longest sequence the model takes (max_position_embeddings / n_positions), or None if it sets none."""
    config = _text_config(config)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _dtype_kwargs(transformers: Any, dtype: str) -> dict[str, Any]:
    if dtype not in DTYPES:
        raise KDCacheError(f"hf model dtype {dtype!r} is not one of {', '.join(DTYPES)}: pass dtype=float32 (the "
                           "default; autocast still runs it in bf16 on GPUs) or dtype=auto (as saved)")
    from packaging.version import Version  # a dependency of transformers

    # transformers 4.56 renamed torch_dtype= to dtype=
    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: DTYPES[dtype]}


class HFCausalLM(nn.Module):
    """A transformers causal LM as a kdcache model: (B, L) int64 ids -> (B, L, num_classes) float32 logits."""

    def __init__(self, lm: nn.Module, num_classes: int, context: int | None, path: str) -> None:
        super().__init__()
        self.lm = lm
        self.num_classes = int(num_classes)
        self.context = context
        self.path = path
        self.output_size = _output_size(lm)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2:
            raise KDCacheError(f"hf model {_show(self.path)} takes (batch, length) token ids, not a tensor of shape "
                               f"{tuple(ids.shape)}")
        if self.context is not None and ids.shape[1] > self.context:
            raise KDCacheError(_too_long(self.path, ids.shape[1], self.context))
        logits = self.lm(input_ids=ids.long(), use_cache=False, return_dict=True).logits
        if logits.shape[-1] < self.num_classes:  # the build checked this; a swapped head would break it
            raise KDCacheError(_too_small(self.path, logits.shape[-1], self.num_classes))
        return logits[..., : self.num_classes].float().contiguous()


def _too_long(path: str, length: int, context: int) -> str:
    return (f"sequences of {length} tokens are longer than the context of hf model {_show(path)} ({context} "
            f"positions): use --seq-len {context} or less")


def _too_small(path: str, got: int, want: int) -> str:
    return (f"hf model {_show(path)} outputs {got} logits per token but the vocabulary has {want} tokens: use the "
            "tokenizer this model was trained with")


def _output_size(lm: nn.Module) -> int | None:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def _input_size(lm: nn.Module) -> int | None:
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def _check_sizes(path: str, out: int | None, inp: int | None, num_classes: int, vocab_size: int | None) -> None:
    if out is not None and out < num_classes:
        raise KDCacheError(_too_small(path, out, num_classes))
    if vocab_size is not None and inp is not None and inp < vocab_size:
        raise KDCacheError(f"hf model {_show(path)} embeds {inp} token ids but the data's vocabulary has "
                           f"{vocab_size}: use the tokenizer this model was trained with")


def build_hf(path: str, num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None = None, *,
             dtype: str = "float32") -> nn.Module:
    """Load the causal LM saved in directory ``path`` for sequences of ``input_shape == (L,)`` token ids.

    ``num_classes``: logits kept per position (the tokenizer's true size; a padded output layer is sliced to it).
    ``vocab_size``: the data's vocabulary (ids are < vocab_size); None skips that check. ``dtype``: float32
    (default), bfloat16, float16, or auto (as the checkpoint stores it). Every refusal is a one-line KDCacheError.
    """
    path = os.fspath(path)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 1 or shape[0] < 1:
        raise KDCacheError(f"hf model {_show(path)} takes sequences of token ids (inputs of shape (L,)), not "
                           f"{shape}: use a token dataset")
    if num_classes < 1:
        raise KDCacheError(f"cannot build hf model {_show(path)} for {num_classes} classes: it must be positive")
    _check_dir(path)
    transformers = _transformers()
    kwargs = _dtype_kwargs(transformers, dtype)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # OSError, ValueError (unknown model_type / remote code), JSON errors, ...
        raise KDCacheError(f"cannot read the config of hf model {_show(path)} ({type(e).__name__}: "
                           f"{_first_line(e)}): it needs a config.json transformers knows") from None
    context = context_length(config)
    if context is not None and shape[0] > context:
        raise KDCacheError(_too_long(path, shape[0], context))
    declared = getattr(_text_config(config), "vocab_size", None)
    if isinstance(declared, int):  # refuse before loading gigabytes; the loaded layers are checked again below
        _check_sizes(path, declared, declared, num_classes, vocab_size)
    weight_files(path)  # a one-line error for missing weights or Git LFS pointers, before transformers tries
    try:
        with _quiet_progress(transformers):
            lm, info = transformers.AutoModelForCausalLM.from_pretrained(
                path, config=config, local_files_only=True, trust_remote_code=False, output_loading_info=True,
                **kwargs)
    except Exception as e:
        raise KDCacheError(f"cannot load hf model {_show(path)} as a causal LM ({type(e).__name__}: "
                           f"{_first_line(e)}): it needs a causal LM transformers knows and its weights") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would train from random values there, silently
        raise KDCacheError(f"the weights in {_show(path)} lack {len(missing)} of the model's tensors (first: "
                           f"{missing[0]}), which would start random: save the whole model with save_pretrained")
    _check_sizes(path, _output_size(lm), _input_size(lm), num_classes, vocab_size)
    model = HFCausalLM(lm, num_classes, context, path)
    model.eval()  # as transformers loads it: dropout off
    return model


def weight_files(path: str) -> list[str]:
    """Names of the weight files transformers loads from ``path``, sorted: model.safetensors (or its shards), else
    pytorch_model.bin (or its shards). A one-line KDCacheError when there are none or one is a Git LFS pointer."""
    path = os.fspath(path)
    root = Path(path)
    names: list[str] = []
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (root / single).is_file():
            names = [single]
        elif (root / index).is_file():
            try:
                weight_map = json.loads((root / index).read_text(encoding="utf-8"))["weight_map"]
                names = sorted({str(v) for v in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise KDCacheError(f"{_show(str(root / index))} is not a readable shard index ({type(e).__name__}: "
                                   f"{_first_line(e)}): re-save the model with save_pretrained") from None
        if names:
            break
    if not names:
        raise KDCacheError(f"{_show(path)} holds no weights ({SAFETENSORS} or {TORCH_BIN}, or their shards): save "
                           "the model there with model.save_pretrained")
    for name in names:
        file = root / name
        if not file.is_file():
            raise KDCacheError(f"weight shard {_show(str(file))} is missing: copy the whole model directory")
        with open(file, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise KDCacheError(f"{_show(str(file))} is a Git LFS pointer, not the weights: run `git lfs pull` "
                                   "in that repository")
    return names


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_params(root: Path, names: list[str]) -> int:
    """Parameters stored in the weight files (tensors sharing storage counted once), read without loading them."""
    total = 0
    for name in names:
        if name.endswith(".safetensors"):
            try:
                from safetensors import safe_open
            except ImportError as e:
                raise KDCacheError(f"reading {name} needs safetensors ({e}): {INSTALL_HINT}") from None
            with safe_open(str(root / name), framework="pt") as f:
                for key in f.keys():
                    total += torch.Size(f.get_slice(key).get_shape()).numel()
        else:
            try:
                try:
                    state = torch.load(root / name, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
                    state = torch.load(root / name, map_location="cpu", weights_only=True)
            except Exception as e:
                raise KDCacheError(f"{_show(str(root / name))} is not a readable torch state_dict "
                                   f"({type(e).__name__}: {_first_line(e)}): re-save the model with "
                                   "save_pretrained") from None
            if not isinstance(state, dict):
                raise KDCacheError(f"{_show(str(root / name))} holds a {type(state).__name__}, not a state_dict: "
                                   "re-save the model with save_pretrained")
            seen: set[tuple[int, int, tuple[int, ...]]] = set()
            for t in state.values():
                if isinstance(t, Tensor):
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                    if key not in seen:
                        seen.add(key)
                        total += t.numel()
    return total


def hf_identity(path: str, model: nn.Module | None = None) -> dict[str, Any]:
    """The identity of the weights in hf model directory ``path``, JSON-serialisable, as `load_weights` returns:

    ``{"source": "hf", "path", "sha256", "params", "files"}``. ``sha256``: with one weight file, that file's own
    sha256 (what ``sha256sum model.safetensors`` prints and the Hub lists); with shards, the sha256 of the
    ``sha256sum``-style manifest of the sorted shards (``"<hex>  <name>\\n"`` each). ``params``: of ``model`` (a
    built `HFCausalLM`) when given, else counted from the files' tensor shapes.
    """
    path = os.fspath(path)
    _check_dir(path)
    root = Path(path)
    names = weight_files(path)
    digests = [_sha256(root / n) for n in names]
    if len(names) == 1:
        sha = digests[0]
    else:
        manifest = "".join(f"{d}  {n}\n" for d, n in zip(digests, names))
        sha = hashlib.sha256(manifest.encode("utf-8")).hexdigest()
    params = param_count(model) if model is not None else _file_params(root, names)
    return {"source": "hf", "path": path, "sha256": sha, "params": int(params), "files": names}
