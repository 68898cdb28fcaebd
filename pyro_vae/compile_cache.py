"""The folder the package keeps compiled training steps in, between runs and across reboots.

TorchInductor caches what it compiles (the FX graph and AOTAutograd entries,
the C++ kernels, the probes of the CPU's vector instructions) under
``TORCHINDUCTOR_CACHE_DIR``, by default a folder in the system's temporary
directory that disappears whenever that directory is cleared. While a training
step is compiled (:class:`pyro_vae.compiled.CompiledStep`) this module points
Inductor at a folder the package owns::

    $PYRO_VAE_CACHE, or the user cache directory (platformdirs: ~/.cache/pyro_vae on Linux)
        inductor-torch<version>/     Inductor's caches for this torch (one folder per version)
            STAMP                    the torch version and the layout, checked before every use
        timings.json                 the measured cost of each path, for ``inference.compile: auto``

so a later run of the same spec and batch shape loads its compiled step
instead of compiling it. A user who sets ``TORCHINDUCTOR_CACHE_DIR`` keeps
their own folder. A stamp that is missing or from another torch means a stale
folder; a compile that fails with a cache present means a damaged one; either
way the folder is emptied with one log line and the step compiled afresh.
Inductor's precompiled C++ headers always live in the temporary directory, so
they are not used for these steps (a missing header would cost a recompile).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

import platformdirs
import torch

from pyro_vae.checkpoint import write_atomic
from pyro_vae.errors import UserInputError

ENV = "PYRO_VAE_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
LAYOUT = 1
TIMINGS = "timings.json"
WARM_COMPILE_SECONDS = 5.0  # what a compile costs once the step is in the cache folder (loading it), at most


def root() -> Path:
    """The package's cache folder: ``$PYRO_VAE_CACHE``, else the user cache directory."""
    return Path(os.environ.get(ENV) or platformdirs.user_cache_dir("pyro_vae"))


def inductor_dir() -> Path:
    """Inductor's cache for this torch version."""
    return root() / f"inductor-torch{torch.__version__}"


def _stamp() -> str:
    return f"torch {torch.__version__}, layout {LAYOUT}\n"


def wipe(folder: Path, log: logging.Logger, reason: str) -> None:
    """Empty ``folder`` and stamp it afresh, with one log line saying why."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "STAMP").write_text(_stamp())
    log.info(f"compile cache: {reason}; rebuilt {folder}")


def checked(log: logging.Logger) -> Path:
    """The Inductor folder, stamped; a folder without this torch's stamp is emptied first."""
    folder = inductor_dir()
    stamp = folder / "STAMP"
    try:
        current = stamp.read_text() if stamp.exists() else None
    except OSError:
        current = ""
    if current is None and not (folder.exists() and any(folder.iterdir())):
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(_stamp())
    elif current != _stamp():
        wipe(folder, log, "the stamp is missing or from another torch")
    return folder


def _chosen_by_user() -> bool:
    """Whether ``TORCHINDUCTOR_CACHE_DIR`` names a folder of the user's (Inductor writes its default there itself)."""
    value = os.environ.get(INDUCTOR_ENV)
    if not value or os.path.abspath(value) == str(inductor_dir()):
        return False
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return True
    return os.path.abspath(value) != os.path.abspath(default_cache_dir())


@contextlib.contextmanager
def inductor_cache(log: logging.Logger) -> Iterator[Path | None]:
    """Inductor's cache in the package's folder while the block runs (unless the user chose one).

    Yields the folder in use, or None where ``TORCHINDUCTOR_CACHE_DIR`` was set by
    the user (their folder, not ours to empty).
    """
    if _chosen_by_user():
        yield None
        return
    try:
        folder = checked(log)
    except OSError as exc:
        log.info(f"compile cache: cannot use {inductor_dir()} ({exc.strerror or exc}); Inductor keeps its default folder")
        yield None
        return
    previous = os.environ.get(INDUCTOR_ENV)
    os.environ[INDUCTOR_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(INDUCTOR_ENV, None)
        else:
            os.environ[INDUCTOR_ENV] = previous


def read_timings() -> dict:
    """Measured costs by step key (``pyro_vae.path_choice``); an unreadable file, or entry, counts as none."""
    try:
        data = json.loads((root() / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: {name: float(value) for name, value in entry.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0}
            for key, entry in data.items() if isinstance(entry, dict)}


def record_timing(key: str, values: dict) -> None:
    """Merge ``values`` into the record of ``key``; a cache folder that cannot be written is skipped."""
    data = read_timings()
    data[key] = {**data.get(key, {}), **values}
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    try:
        root().mkdir(parents=True, exist_ok=True)
        write_atomic(root() / TIMINGS, lambda handle: handle.write(text), "compile timings")
    except (OSError, UserInputError):
        pass
