"""Plugins: modules that register parts (priors, guides, estimators, ...) for the command line.

A plugin is any importable module whose import calls :func:`pyro_vae.config.registry.register`.
It is loaded

- by ``--plugin MODULE`` on any ``pyro-vae`` command (repeatable; the command
  line searches the current folder first, then ``sys.path``; :func:`load`
  itself leaves ``sys.path`` as it is), or
- by being installed with an entry point in the group ``pyro_vae.plugins``
  (``[options.entry_points] pyro_vae.plugins = my_priors = my_priors``), loaded
  by every command.

A run folder records the plugins its run used (``run.json``, key ``plugins``),
and reading its spec (``evaluate``, ``sample``, ``table``, ``--resume``,
``compare --at``) imports them again. A plugin that cannot be imported, for
whatever reason (not found, a SyntaxError, an exception while it runs, a
part name already registered), is a one-line error naming it and the error.
"""

from __future__ import annotations

import importlib.util
import traceback
from importlib import metadata
from typing import Iterable

from pyro_vae.errors import UserInputError, one_line

ENTRY_POINT_GROUP = "pyro_vae.plugins"
_LOADED: list[str] = []


def load(names: Iterable[str], where: str = "--plugin") -> list[str]:
    """Import each module in ``names`` (once; again is a no-op); ``where`` names the source in the error.

    Any failure of the import is one UserInputError line naming the module and
    the error: the module not found, a SyntaxError in it, an exception raised
    while it runs (with the file and line), a name it registers that is taken.
    ``sys.path`` is used as it is (the command line puts the current folder first).
    """
    for name in names:
        if name in _LOADED:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # whatever the plugin's own code raises: reported, never a traceback
            raise UserInputError(f"{where}: {import_failure(name, exc)}") from None
        _LOADED.append(name)
    return list(_LOADED)


def import_failure(name: str, exc: Exception) -> str:
    """One line: why importing plugin module ``name`` failed, where in its code, and for a missing module the fix."""
    error = f"{type(exc).__name__}: {one_line(exc, 240)}"
    if isinstance(exc, ModuleNotFoundError) and (exc.name == name or name.startswith(f"{exc.name}.")):
        return (
            f"cannot import plugin module {name!r} ({error}); install it, or run from the folder "
            f"that holds {name.replace('.', '/')}.py"
        )
    return f"plugin module {name!r} failed to import ({error}{_location(name, exc)})"


def _location(name: str, exc: Exception) -> str:
    """', at FILE line N': the innermost frame in the plugin's own file (of all frames when none is there);
    nothing for a SyntaxError, whose message holds its place."""
    if isinstance(exc, SyntaxError):
        return ""
    frames = traceback.extract_tb(exc.__traceback__)
    source = _source_file(name)
    own = [frame for frame in frames if frame.filename == source]
    candidates = own or frames
    if not candidates:
        return ""
    frame = candidates[-1]
    return f", at {frame.filename} line {frame.lineno}"


def _source_file(name: str) -> str | None:
    """The file module ``name`` is imported from, or None where it cannot be found."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # its parent package fails to import: no file to name
        return None
    return None if spec is None else spec.origin


def load_entry_points() -> list[str]:
    """Import every module registered in the entry-point group ``pyro_vae.plugins``."""
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        load([entry.module], where=f"entry point {entry.name!r} of group {ENTRY_POINT_GROUP}")
    return list(_LOADED)


def loaded() -> list[str]:
    """The plugin modules imported in this process, in order (what a new run records)."""
    return list(_LOADED)
