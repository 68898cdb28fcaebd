"""Atomic checkpoints: written whole or not at all, read back with one-line errors.

A checkpoint is written to a temporary file in the same folder, flushed and
fsync'ed, then renamed over the old one (``os.replace`` is atomic on POSIX), and
the folder is fsync'ed, so at every moment ``checkpoint.pt`` is either the
previous complete checkpoint or the new complete one.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import UserInputError

FORMAT = 1


def save_atomic(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint, turning a missing, truncated or foreign file into a UserInputError."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"no checkpoint at '{path}'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserInputError(
            f"checkpoint '{path}' is truncated or corrupted ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserInputError(f"'{path}' is not a pyro_vae checkpoint (format {FORMAT})")
    return state
