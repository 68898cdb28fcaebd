"""The run folder: what a training run writes, and reading it back.

Files: ``config.yaml`` (the resolved spec), ``run.json`` (seed, package
versions, git revision, device, thread count, and under ``model_inputs`` what
building the model needs besides the spec: ``data_dim`` and ``image_shape``),
``metrics.jsonl`` (one JSON object per epoch), ``checkpoint.pt``, ``log.txt``,
and the pictures.

One command at a time: ``train`` (a new run or ``--resume``) holds an
exclusive ``fcntl.flock`` on ``RUN/.lock`` (which names its pid and command)
for its whole duration (:func:`locked`). The lock is the kernel's flock, not
the file's existence: the file is removed when the command ends, and one left
behind by a killed process (SIGKILL) holds no lock, since the kernel releases
a dead process's flocks, so it never blocks the next command. Readers
(``evaluate``, ``sample``, ``table``, ``compare --at``) take no lock: every
file they read is replaced whole by a rename, so they see the last complete
checkpoint, even while a run trains.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Iterator

import torch
import yaml

from pyro_vae.config import plugins
from pyro_vae.config.spec import Spec
from pyro_vae.errors import UserInputError, one_line

CONFIG, METRICS, CHECKPOINT, RUN_INFO, LOG = "config.yaml", "metrics.jsonl", "checkpoint.pt", "run.json", "log.txt"
LOCK = ".lock"  # held (fcntl.flock) by the command training in the folder; it names that command
BEST = "best.pt"  # the parameters of the epoch with the best validation ELBO (runs with data.validation_size)
CHECKPOINT_CHOICES = ("best", "last")


def default_run_dir(spec: Spec) -> Path:
    """``runs/<dataset>-<YYYYmmdd-HHMMSS>`` under the working directory."""
    return Path("runs") / f"{spec.data.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_new_run(run_dir: Path, spec: Spec, force: bool) -> None:
    """Refuse, without writing anything, a folder that holds another run (unless ``force``) or cannot be written."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).exists() and not force:
        try:
            what = "the same spec" if read_spec(run_dir) == spec else "a different spec"
        except UserInputError:
            what = "an unreadable spec"
        raise UserInputError(
            f"'{run_dir}' already holds a run with {what}; use --resume to continue it, --force to overwrite it, "
            "or another --out"
        )
    if (
        run_dir.is_dir()
        and not (run_dir / CONFIG).exists()
        and any(p.name != LOCK for p in run_dir.iterdir())
        and not force
    ):
        raise UserInputError(
            f"'{run_dir}' is a folder with other files in it, not a run folder; give an empty or new "
            f"--out (or --force to write the run among those files)"
        )
    check_can_make(run_dir, "output folder")


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


def _in_use_error(run_dir: Path, handle: int) -> UserInputError:
    """The one line naming the process that holds the lock of ``run_dir`` (read from the lock file)."""
    os.lseek(handle, 0, os.SEEK_SET)
    holder = os.read(handle, 4096).decode(errors="replace").strip() or "another process (starting)"
    return UserInputError(
        f"'{run_dir}' is in use by {holder}; wait for it to end (or stop it) and try again; nothing was changed"
    )


def check_not_in_use(run_dir: Path) -> None:
    """Refuse, writing nothing, a run folder whose lock another command holds."""
    try:
        handle = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody holds it
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use_error(run_dir, handle) from None
    finally:
        os.close(handle)  # closing releases a flock this probe took


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` (an exclusive ``fcntl.flock``) while the block runs, or refuse in one line.

    The file holds ``process PID (COMMAND)``, which a refused command quotes;
    it is removed when the block ends, whatever the way out (return, exception,
    signal turned into an exception). A file left by a killed process holds no
    lock: the kernel released it. Acquiring re-checks that the locked file is
    still the one at the path (a holder that was ending may have removed it).
    """
    path = Path(run_dir) / LOCK
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserInputError(f"cannot lock run folder '{run_dir}' ({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use_error(run_dir, handle)
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


def prepare(run_dir: Path, spec: Spec, force: bool, model_inputs: dict | None = None) -> None:
    """Create ``run_dir`` for a new run; refuse a folder that holds another run unless ``force``.

    ``model_inputs`` (:func:`read_model_inputs`) is recorded in ``run.json``.
    """
    run_dir = Path(run_dir)
    check_new_run(run_dir, spec, force)
    writable_folder(run_dir, "output folder")
    if force:
        for name in (METRICS, CHECKPOINT, BEST, LOG):
            (run_dir / name).unlink(missing_ok=True)
    write_text_atomic(run_dir / CONFIG, spec.to_yaml())
    info = {**environment(spec), **({"model_inputs": model_inputs} if model_inputs is not None else {})}
    write_text_atomic(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole (:func:`pyro_vae.training.checkpoint.write_atomic`)."""
    from pyro_vae.training.checkpoint import write_atomic

    write_atomic(path, lambda handle: handle.write(text.encode()))


def read_spec(run_dir: Path) -> Spec:
    """The resolved spec a run was trained with (after importing the plugins the run recorded)."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise UserInputError(f"'{run_dir}' is not a run folder (no {CONFIG})")
    plugins.load(recorded_plugins(run_dir), where=f"'{Path(run_dir) / RUN_INFO}'")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserInputError(f"cannot read '{path}': {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserInputError(f"'{path}' is not valid YAML: {one_line(exc)}") from None
    try:
        return Spec.from_saved(raw)
    except UserInputError as exc:
        raise UserInputError(f"'{path}': {exc}") from None


def checkpoint_path(run_dir: Path, choice: str = "best") -> Path:
    """The checkpoint a command reads: ``best.pt`` when asked for ``best`` and the run has one, else the last."""
    if choice not in CHECKPOINT_CHOICES:
        raise UserInputError(f"--checkpoint is {choice!r}; accepted: {', '.join(CHECKPOINT_CHOICES)}")
    best = Path(run_dir) / BEST
    return best if choice == "best" and best.exists() else Path(run_dir) / CHECKPOINT


def recorded_plugins(run_dir: Path) -> list[str]:
    """The plugin modules a run recorded in ``run.json`` (none for a folder without one)."""
    path = Path(run_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    names = info.get("plugins", []) if isinstance(info, dict) else []
    return [name for name in names if isinstance(name, str)]


def read_model_inputs(run_dir: Path) -> dict | None:
    """What building the run's model needs besides its spec, as recorded in ``run.json`` at training time:
    ``{"data_dim": int, "image_shape": (C, H, W) or None, "num_classes": int or None}`` (``num_classes`` is
    recorded for labelled data only); None for a run without a usable record."""
    try:
        info = json.loads((Path(run_dir) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    record = info.get("model_inputs") if isinstance(info, dict) else None
    if not isinstance(record, dict):
        return None
    data_dim, shape, classes = record.get("data_dim"), record.get("image_shape"), record.get("num_classes")

    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if not whole(data_dim) or not (
        shape is None or (isinstance(shape, list) and len(shape) == 3 and all(whole(size) for size in shape))
    ):
        return None
    if not (classes is None or whole(classes)):
        return None
    return {"data_dim": data_dim, "image_shape": None if shape is None else tuple(shape), "num_classes": classes}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` whole (atomically), so it always matches the checkpoint."""
    write_text_atomic(Path(run_dir) / METRICS, "".join(json.dumps(row) + "\n" for row in rows))


def environment(spec: Spec) -> dict:
    """Seed, versions, git revision and hardware: what reproducing the run needs."""
    versions: dict[str, str | None] = {}
    for package in ("pyro_vae", "pyro-ppl", "torch", "torchvision", "numpy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "seed": spec.train.seed,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "device": spec.train.device,
        "torch_threads": torch.get_num_threads(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "plugins": plugins.loaded(),
    }


def machine() -> str:
    """The processor's model name and logical CPU count (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


def git_revision() -> str | None:
    """The package's git revision, when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


#: the package's logger: every line a run says goes through it (and, as usual, on to the host's handlers)
LOGGER = "pyro_vae"


@contextlib.contextmanager
def run_log(run_dir: Path, rank: int = 0) -> Iterator[logging.Logger]:
    """The ``pyro_vae`` logger, also writing to the run's ``log.txt`` while the block runs (rank 0 only).

    The file handler is attached on entry and removed and closed on exit. So that
    the file gets the run's INFO lines, the ``pyro_vae`` logger's level is INFO
    for the block where the host has left it unset (NOTSET), and is put back on
    exit. No other logger, the root included, is touched; console output is the
    command line's (:func:`pyro_vae.cli.commands.main`) or the host's own handlers'.
    """
    logger = logging.getLogger(LOGGER)
    level = logger.level
    handler = None
    if rank == 0:
        handler = logging.FileHandler(Path(run_dir) / LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    if level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
