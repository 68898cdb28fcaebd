"""Plugins: modules that register parts (priors, guides, estimators, ...) for the command line.

A plugin is any importable module whose import calls :func:`pyro_vae.registry.register`.
It is loaded

- by ``--plugin MODULE`` on any ``pyro-vae`` command (repeatable; the current
  folder is searched first, then ``sys.path``), or
- by being installed with an entry point in the group ``pyro_vae.plugins``
  (``[options.entry_points] pyro_vae.plugins = my_priors = my_priors``), loaded
  by every command.

A run folder records the plugins its run used (``run.json``, key ``plugins``),
and reading its spec (``evaluate``, ``sample``, ``table``, ``--resume``,
``compare --at``) imports them again; a plugin that cannot be imported is a
one-line error naming it.
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from typing import Iterable

from pyro_vae.errors import UserInputError, one_line

ENTRY_POINT_GROUP = "pyro_vae.plugins"
_LOADED: list[str] = []


def load(names: Iterable[str], where: str = "--plugin") -> list[str]:
    """Import each module in ``names`` (once); ``where`` names the source in the error."""
    for name in names:
        if name in _LOADED:
            continue
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserInputError(f"{where}: cannot import plugin module {name!r} ({type(exc).__name__}: "
                                 f"{one_line(exc, 160)}); install it, or run from the folder "
                                 f"that holds {name}.py") from None
        _LOADED.append(name)
    return list(_LOADED)


def load_entry_points() -> list[str]:
    """Import every module registered in the entry-point group ``pyro_vae.plugins``."""
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        load([entry.module], where=f"entry point {entry.name!r} of group {ENTRY_POINT_GROUP}")
    return list(_LOADED)


def loaded() -> list[str]:
    """The plugin modules imported in this process, in order (what a new run records)."""
    return list(_LOADED)
