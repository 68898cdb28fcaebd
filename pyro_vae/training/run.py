"""The run folder as one object: what a training run writes, and reading it back (:class:`Run`).

Files: ``config.yaml`` (the resolved spec), ``run.json`` (seed, package
versions, git revision, device, thread count, and under ``model_inputs`` what
building the model needs besides the spec: ``data_dim``, ``image_shape`` and,
for a conditional VAE, ``num_classes``),
``metrics.jsonl`` (one JSON object per epoch, always the rows of the last
checkpoint), ``checkpoint.pt`` (:mod:`pyro_vae.training.run_state`), ``best.pt``
(the parameters of the epoch with the best validation ELBO), ``log.txt``, the
folder lock ``.lock`` (:mod:`pyro_vae.training.lock`), and the pictures.

Every file is replaced whole by a rename (:mod:`pyro_vae.training.checkpoint`),
so a reader sees the last complete version even while a run trains, and every
checkpoint is read through the CRC-checked loader and checked against the
run's ``config.yaml``. Folders written by earlier versions (no ``model_inputs``
in ``run.json``, no ``start_elbo`` or ``step_path`` in the checkpoint) still load.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import yaml

from pyro_vae import folders
from pyro_vae.config import plugins
from pyro_vae.config.spec import Spec, dotted_keys, get_dotted
from pyro_vae.errors import UserInputError, one_line
from pyro_vae.training import checkpoint, lock
from pyro_vae.training.environment import environment

CONFIG, METRICS, CHECKPOINT, RUN_INFO, LOG = "config.yaml", "metrics.jsonl", "checkpoint.pt", "run.json", "log.txt"
LOCK = lock.LOCK
BEST = "best.pt"  # the parameters of the epoch with the best validation ELBO (runs with data.validation_size)
CHECKPOINT_CHOICES = ("best", "last")

#: the package's logger: every line a run says goes through it (and, as usual, on to the host's handlers)
LOGGER = "pyro_vae"


def check_same_spec(state: dict, spec: Spec, where: Path | None) -> None:
    """Refuse a checkpoint ``state`` written by another spec than ``spec`` (``train.epochs`` may differ)."""
    try:
        saved = Spec.from_saved(state["spec"])
    except UserInputError as exc:
        raise UserInputError(f"the checkpoint in '{where}' holds an invalid spec: {exc}") from None
    saved.train.epochs = spec.train.epochs
    if saved != spec:
        different = next(
            key
            for key in dotted_keys(spec.to_dict())
            if get_dotted(saved.to_dict(), key) != get_dotted(spec.to_dict(), key)
        )
        raise UserInputError(
            f"the checkpoint in '{where}' was written by a different spec than its {CONFIG} "
            f"({different}: {get_dotted(saved.to_dict(), different)!r} in the checkpoint, "
            f"{get_dotted(spec.to_dict(), different)!r} in {CONFIG})"
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole (:func:`pyro_vae.training.checkpoint.write_atomic`)."""
    checkpoint.write_atomic(path, lambda handle: handle.write(text.encode()))


class Run:
    """A run folder: its spec, ``run.json``, metrics, log, checkpoints and lock.

    ``Run(path)`` names a folder and reads nothing; :meth:`create` makes a new
    run there, the ``read_*`` and ``load_*`` methods read an existing one.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def default(cls, spec: Spec) -> Run:
        """``runs/<dataset>-<YYYYmmdd-HHMMSS>`` under the working directory."""
        return cls(Path("runs") / f"{spec.data.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")

    @classmethod
    def create(cls, path: Path | str, spec: Spec, force: bool, model_inputs: dict | None = None) -> Run:
        """A new run in ``path``: the folder made, ``config.yaml`` and ``run.json`` written.

        A folder that holds another run is refused unless ``force``, which removes
        that run's metrics, checkpoints and log. ``model_inputs`` (:meth:`model_inputs`)
        is recorded in ``run.json``.
        """
        run = cls(path)
        run.check_new(spec, force)
        folders.writable_folder(run.path, "output folder")
        if force:
            for name in (METRICS, CHECKPOINT, BEST, LOG):
                (run.path / name).unlink(missing_ok=True)
        run.write_spec(spec)
        info = {**environment(spec), **({"model_inputs": model_inputs} if model_inputs is not None else {})}
        write_text_atomic(run.path / RUN_INFO, json.dumps(info, indent=2) + "\n")
        return run

    # -- before a new run ---------------------------------------------------------------------------
    def check_new(self, spec: Spec, force: bool) -> None:
        """Refuse, writing nothing, a folder that holds another run (unless ``force``) or cannot be written."""
        if (self.path / CONFIG).exists() and not force:
            try:
                what = "the same spec" if self.read_spec() == spec else "a different spec"
            except UserInputError:
                what = "an unreadable spec"
            raise UserInputError(
                f"'{self.path}' already holds a run with {what}; use --resume to continue it, --force to overwrite "
                "it, or another --out"
            )
        if (
            self.path.is_dir()
            and not (self.path / CONFIG).exists()
            and any(p.name != LOCK for p in self.path.iterdir())
            and not force
        ):
            raise UserInputError(
                f"'{self.path}' is a folder with other files in it, not a run folder; give an empty or new "
                f"--out (or --force to write the run among those files)"
            )
        folders.check_can_make(self.path, "output folder")

    def check_not_in_use(self) -> None:
        """Refuse, writing nothing, a folder whose lock another command holds (:mod:`pyro_vae.training.lock`)."""
        lock.check_not_in_use(self.path)

    def locked(self) -> AbstractContextManager[None]:
        """Hold the folder's lock while the block runs, or refuse (:func:`pyro_vae.training.lock.locked`)."""
        return lock.locked(self.path)

    @contextmanager
    def log_file(self, rank: int = 0) -> Iterator[logging.Logger]:
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
            handler = logging.FileHandler(self.path / LOG)
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

    # -- the spec and run.json ----------------------------------------------------------------------
    def read_spec(self) -> Spec:
        """The resolved spec the run was trained with (after importing the plugins the run recorded)."""
        path = self.path / CONFIG
        if not path.exists():
            raise UserInputError(f"'{self.path}' is not a run folder (no {CONFIG})")
        plugins.load(self.recorded_plugins(), where=f"'{self.path / RUN_INFO}'")
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

    def write_spec(self, spec: Spec) -> None:
        """Replace ``config.yaml`` with ``spec`` (resolved, every key)."""
        write_text_atomic(self.path / CONFIG, spec.to_yaml())

    def _info(self) -> dict:
        """``run.json`` as a dict; empty for a folder without a readable one."""
        try:
            info = json.loads((self.path / RUN_INFO).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def recorded_plugins(self) -> list[str]:
        """The plugin modules the run recorded in ``run.json`` (none for a folder without one)."""
        return [name for name in self._info().get("plugins", []) if isinstance(name, str)]

    def model_inputs(self) -> dict | None:
        """What building the run's model needs besides its spec, as recorded in ``run.json`` at training time:
        ``{"data_dim": int, "image_shape": (C, H, W) or None, "num_classes": int or None}`` (``num_classes`` is
        recorded for labelled data only); None for a run without a usable record."""
        record = self._info().get("model_inputs")
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

    # -- metrics ------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl`` (none for a run that has not written it)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite ``metrics.jsonl`` whole (atomically), so it always matches the checkpoint."""
        write_text_atomic(self.path / METRICS, "".join(json.dumps(row) + "\n" for row in rows))

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_path(self, which: str = "best") -> Path:
        """The checkpoint a command reads: ``best.pt`` when asked for ``best`` and the run has one, else the last."""
        if which not in CHECKPOINT_CHOICES:
            raise UserInputError(f"--checkpoint is {which!r}; accepted: {', '.join(CHECKPOINT_CHOICES)}")
        best = self.path / BEST
        return best if which == "best" and best.exists() else self.path / CHECKPOINT

    def has_checkpoint(self) -> bool:
        """Whether the run has written its first checkpoint."""
        return (self.path / CHECKPOINT).exists()

    def load_checkpoint(
        self, spec: Spec, which: str = "last", required: tuple[str, ...] = ()
    ) -> tuple[dict[str, Any], Path]:
        """The checkpoint ``which`` (:meth:`checkpoint_path`) and the file it came from, read once through the
        CRC-checked loader, with the keys ``required``, and written by ``spec`` (:func:`check_same_spec`);
        any failure is one line."""
        path = self.checkpoint_path(which)
        state = checkpoint.load(path, required=required)
        check_same_spec(state, spec, self.path)
        return state, path

    def save_checkpoint(self, state: dict) -> None:
        """``checkpoint.pt`` replaced by ``state`` atomically, then ``metrics.jsonl`` by its ``metrics`` rows."""
        checkpoint.save_atomic(state, self.path / CHECKPOINT)
        self.write_metrics(state["metrics"])

    def save_best(self, state: dict) -> None:
        """``best.pt`` replaced by ``state`` (spec, parameters, epoch, validation ELBO) atomically."""
        checkpoint.save_atomic(state, self.path / BEST)
