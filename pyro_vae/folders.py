"""Output folders of the commands that write files: checked before any work, filled whole or not at all.

``table`` and ``compare`` write a report into ``--out``; ``sample`` a picture
into the folder of its ``--out``. Every check here writes nothing, so a refused
command leaves the disk as it was (:func:`check_output_folder`), and a report
is staged beside its folder and moved in only once it is complete
(:func:`staged_folder`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pyro_vae.errors import UserInputError


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest ancestor that does."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_can_make(folder: Path, what: str) -> None:
    """Refuse, writing nothing, a ``folder`` that cannot be made or written (``what`` names it in the error)."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise UserInputError(f"{what} '{folder}' cannot be made: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{what} '{folder}' is not writable (no write permission on '{existing}')")


def writable_folder(folder: Path, what: str) -> Path:
    """Create ``folder`` and prove it writable, or one line naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(f"{what} '{folder}' is not writable ({exc.strerror or exc})") from None
    return folder


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse, writing nothing, an ``--out`` that exists with files in it (unless ``force``) or cannot be made."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserInputError(
            f"--out '{out}' already exists with files in it; give another --out, or --force to "
            f"replace this command's files there"
        )
    check_can_make(out, "--out")


@contextmanager
def staged_folder(out: Path, names: tuple[str, ...]) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; ``out`` gets its files only if the block succeeds.

    On success the temporary folder is renamed to ``out`` (when ``out`` is new
    or empty), or, into an existing ``out`` (``--force``), the files ``names``
    there are removed and the new ones moved in. On any failure or interrupt
    the temporary folder is removed and ``out`` is as it was.
    """
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=nearest_existing(out.parent)))
    try:
        yield staging
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir() and any(out.iterdir()):
            for name in names:
                (out / name).unlink(missing_ok=True)
            for made in staging.iterdir():
                os.replace(made, out / made.name)
        else:
            os.replace(staging, out)
    except OSError as exc:
        raise UserInputError(f"cannot write --out '{out}' ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
