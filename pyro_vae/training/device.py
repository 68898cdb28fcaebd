"""The device a command runs on, and what running out of memory looks like there."""

from __future__ import annotations

import torch

from pyro_vae.config.spec import check_device_name
from pyro_vae.errors import UserInputError


def resolve_device(name: str, key: str) -> torch.device:
    """``name`` as a device that exists on this machine; ``key`` names the setting in the error."""
    check_device_name(name, key)
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserInputError(f"{key} is {name!r} but this machine has {count} CUDA device(s); use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"{key} is 'mps' but MPS is not available on this machine; use cpu")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch failing to allocate memory (CPU or GPU)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )
