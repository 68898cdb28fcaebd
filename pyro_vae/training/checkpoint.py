"""Atomic checkpoints: written whole or not at all, read back with one-line errors.

A checkpoint is written to a temporary file in the same folder, flushed and
fsync'ed, then renamed over the old one (``os.replace`` is atomic on POSIX), and
the folder is fsync'ed, so at every moment ``checkpoint.pt`` is either the
previous complete checkpoint or the new complete one.

Reading checks the file before trusting it: ``torch.save`` writes a zip archive
with a CRC-32 per record, which ``torch.load`` does not verify (a flipped bit in
a weight loads silently), so every record's CRC is checked first. The payload is
then read with ``weights_only=True``: tensors, numbers, strings and containers,
never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from pyro_vae.errors import UserInputError, one_line

FORMAT = 1


def write_atomic(path: Path, write: Callable[[BinaryIO], object], what: str = "") -> None:
    """Replace ``path`` whole with what ``write(handle)`` writes: a temporary file, fsync, rename, folder fsync.

    ``what`` (e.g. "checkpoint") names the kind of file in the one-line error.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        kept = f"; the previous {what}, if any, is unchanged" if what else ""
        raise UserInputError(
            f"cannot write {what + ' ' if what else ''}'{path}' ({exc.strerror or exc}){kept}"
        ) from None


def save_atomic(state: dict, path: Path) -> None:
    """Write the checkpoint ``state`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda handle: torch.save({"format": FORMAT, **state}, handle), "checkpoint")


def load(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint, turning a missing, truncated, corrupted or foreign file into a UserInputError.

    ``required``: keys the caller needs; a checkpoint without one of them is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no checkpoint at '{path}'")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        state = None if damaged else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file can raise almost any type: report all as one line
        raise UserInputError(
            f"checkpoint '{path}' is truncated or corrupted ({type(exc).__name__}: {one_line(exc, 120)})"
        ) from None
    if damaged:
        raise UserInputError(f"checkpoint '{path}' is corrupted (record '{damaged}' fails its CRC check)")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserInputError(f"'{path}' is not a pyro_vae checkpoint (format {FORMAT})")
    missing = [key for key in required if key not in state]
    if missing:
        raise UserInputError(f"checkpoint '{path}' is incomplete: it has no {', '.join(missing)}")
    return state
