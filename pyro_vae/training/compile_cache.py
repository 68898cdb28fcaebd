"""The folder the ``pyro-vae`` command keeps TorchInductor's compiled training steps in.

TorchInductor caches what it compiles (the FX graph and AOTAutograd entries,
the C++ kernels, the probes of the CPU's vector instructions) under
``TORCHINDUCTOR_CACHE_DIR``, by default a folder in the system's temporary
directory that disappears whenever that directory is cleared. The ``pyro-vae``
command (:func:`pyro_vae.cli.commands.main`, and only it: the library never edits the
environment) sets that variable, when the user has not, to a folder the
package owns::

    $PYRO_VAE_CACHE, or the user cache directory (platformdirs: ~/.cache/pyro_vae on Linux)
        inductor-torch<version>/     Inductor's caches for this torch (one folder per version)
            STAMP                    the torch version and the layout, checked before every compile

so a later run of the same spec and batch shape loads its compiled step
instead of compiling it (``inference.compile: inductor``). A user who sets
``TORCHINDUCTOR_CACHE_DIR`` keeps their own folder, and a program that trains
through the library keeps Inductor's default. Where the variable names the
package's folder, a stamp that is missing or from another torch means a stale
folder and a compile that fails with a cache present a damaged one; either way
the folder is emptied with one log line and the step compiled afresh.
Inductor's precompiled C++ headers always live in the temporary directory, so
they are not used for these steps (a missing header would cost a recompile).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

import platformdirs
import torch

ENV = "PYRO_VAE_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
LAYOUT = 1
T = TypeVar("T")


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


def chosen_by_user() -> bool:
    """Whether ``TORCHINDUCTOR_CACHE_DIR`` names a folder of the user's (Inductor writes its default there itself)."""
    value = os.environ.get(INDUCTOR_ENV)
    if not value or os.path.abspath(value) == str(inductor_dir()):
        return False
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return True
    return os.path.abspath(value) != os.path.abspath(default_cache_dir())


def package_folder_in_use(log: logging.Logger) -> Path | None:
    """The package's Inductor folder, stamped, where ``TORCHINDUCTOR_CACHE_DIR`` names it; else None.

    None also where the folder cannot be made (one log line; the compile then
    fails there and the step is replayed without Inductor).
    """
    value = os.environ.get(INDUCTOR_ENV)
    if not value or os.path.abspath(value) != str(inductor_dir()):
        return None
    try:
        return checked(log)
    except OSError as exc:
        log.info(f"compile cache: cannot use {inductor_dir()} ({exc.strerror or exc})")
        return None


def first_call(build_and_run: Callable[[], T], log: logging.Logger) -> tuple[T, float]:
    """``build_and_run()`` (compile a function with Inductor and call it once) and the seconds it took.

    Where the package's folder is in use (:func:`package_folder_in_use`), a
    failure while it holds entries is taken for a damaged cache: the folder is
    emptied with one log line and ``build_and_run`` tried once more, so a damaged
    cache costs a recompile, not the run. Any other failure propagates, after
    ``torch.compiler.reset()``.
    """
    folder = package_folder_in_use(log)
    for attempt in (1, 2):
        began = time.perf_counter()
        try:
            return build_and_run(), time.perf_counter() - began
        except Exception as exc:
            torch.compiler.reset()
            if attempt == 2 or folder is None or not any(p.name != "STAMP" for p in folder.iterdir()):
                raise
            wipe(folder, log, f"compiling with it failed ({type(exc).__name__})")
    raise AssertionError("unreachable")
