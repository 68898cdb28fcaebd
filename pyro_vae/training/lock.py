"""One command at a time in a run folder: an exclusive ``fcntl.flock`` on ``RUN/.lock``.

``train`` (a new run or ``--resume``) holds the lock, whose file names its pid
and command, for its whole duration (:func:`locked`). The lock is the kernel's
flock, not the file's existence: the file is removed when the command ends,
and one left behind by a killed process (SIGKILL) holds no lock, since the
kernel releases a dead process's flocks, so it never blocks the next command.
Readers (``evaluate``, ``sample``, ``table``, ``compare --at``) take no lock:
every file they read is replaced whole by a rename, so they see the last
complete checkpoint, even while a run trains.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pyro_vae.errors import UserInputError

LOCK = ".lock"  # held (fcntl.flock) by the command training in the folder; it names that command


def _in_use_error(folder: Path, handle: int) -> UserInputError:
    """The one line naming the process that holds the lock of ``folder`` (read from the lock file)."""
    os.lseek(handle, 0, os.SEEK_SET)
    holder = os.read(handle, 4096).decode(errors="replace").strip() or "another process (starting)"
    return UserInputError(
        f"'{folder}' is in use by {holder}; wait for it to end (or stop it) and try again; nothing was changed"
    )


def check_not_in_use(folder: Path) -> None:
    """Refuse, writing nothing, a folder whose lock another command holds."""
    try:
        handle = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody holds it
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use_error(folder, handle) from None
    finally:
        os.close(handle)  # closing releases a flock this probe took


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` (an exclusive ``fcntl.flock``) while the block runs, or refuse in one line.

    The file holds ``process PID (COMMAND)``, which a refused command quotes;
    it is removed when the block ends, whatever the way out (return, exception,
    signal turned into an exception). A file left by a killed process holds no
    lock: the kernel released it. Acquiring re-checks that the locked file is
    still the one at the path (a holder that was ending may have removed it).
    """
    path = Path(folder) / LOCK
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserInputError(f"cannot lock run folder '{folder}' ({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use_error(folder, handle)
            os.close(handle)
            raise error from None
        try:
            if os.fstat(handle).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)  # we locked a file its holder had just removed: take the new one
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"process {os.getpid()} ({shlex.join(sys.argv)})\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)
