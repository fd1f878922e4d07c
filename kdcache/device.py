"""Device choice and mixed precision, shared by dump and training."""

from __future__ import annotations

import contextlib
import re

import torch

from kdcache.errors import KDCacheError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without it is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise KDCacheError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDCacheError(f"--device {name} asked for, but no CUDA GPU is visible: use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise KDCacheError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           "numbered from 0")
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 on older ones, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_model_layout(x: torch.Tensor) -> torch.Tensor:
    """Image batches go channels_last on CUDA (faster convolutions with AMP); anything else stays as it is."""
    if x.is_cuda and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x
