"""A run from a spec (:func:`train`) or from its folder (:func:`resume`): check, lock, train, write.

What either changes in the calling process: Pyro's param store is cleared and
every global generator (torch, numpy, Python's ``random``) is seeded from
``train.seed`` (:class:`pyro_vae.training.trainer.Trainer`); while it runs, the
``pyro_vae`` logger also writes to the run's ``log.txt``
(:meth:`pyro_vae.training.run.Run.log_file`). It adds no console handler: the
lines reach the host's own logging handlers, if any. torch uses
``train.threads`` threads meanwhile (:mod:`pyro_vae.threads`); the caller's
thread count is restored afterwards. The folder stays locked
(:mod:`pyro_vae.training.lock`) until the run ends. Sizes (``data.train_size``,
``data.test_size``) beyond the data are logged with what was used.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from pyro_vae import threads
from pyro_vae.config.spec import Spec
from pyro_vae.data import Dataset
from pyro_vae.errors import UserInputError
from pyro_vae.model import VAE
from pyro_vae.training import distributed, run_state
from pyro_vae.training.run import BEST, LOGGER, Run
from pyro_vae.training.trainer import Trainer


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def model_inputs(data: Dataset, vae: VAE) -> dict:
    """What :meth:`VAE.from_spec` reads from the data to build a model to load a checkpoint into
    (``num_classes`` for a conditional ``vae`` only)."""
    inputs = {"data_dim": data.data_dim, "image_shape": None if data.image_shape is None else list(data.image_shape)}
    return {**inputs, "num_classes": vae.num_classes} if vae.num_classes else inputs


def check_tensorboard(spec: Spec) -> None:
    """With ``train.tensorboard``, refuse in one line a machine without the tensorboard package."""
    if spec.train.tensorboard:
        from pyro_vae.training import board

        board.check_available()


def train(spec: Spec, run_dir: Path | str, force: bool = False, show_progress: bool = True) -> Trainer:
    """A new run in ``run_dir``: check every input, then lock and prepare the folder, train, write the pictures.

    The folder, the data, the model and a first model/guide pass are checked
    before anything is written, so bad input leaves an existing folder as it was.
    ``force`` overwrites a folder that holds another run. The calling process is
    changed as the module docstring says.
    """
    with threads.using(spec.train.threads):
        return _train(spec, Run(run_dir), force, show_progress)


def _train(spec: Spec, run: Run, force: bool, show_progress: bool) -> Trainer:
    check_tensorboard(spec)
    if distributed.is_main():  # under torchrun, rank 0 alone checks and writes the folder
        run.check_not_in_use()
        run.check_new(spec, force)
    trainer = Trainer(spec, None, show_progress=show_progress)
    main = trainer.dist.is_main
    if main:
        from pyro_vae import folders

        folders.writable_folder(run.path, "output folder")
    with run.locked() if main else nullcontext():
        if main:
            # checked again, now locked
            run = Run.create(run.path, spec, force, model_inputs(trainer.data, trainer.vae))
        trainer.attach(run)
        with run.log_file(trainer.dist.rank):
            if trainer.dist.enabled:
                trainer.log.info(trainer.dist.describe(trainer.batch_size, trainer.device))
            trainer.log.info(
                f"training {spec.data.name} ({trainer.data.num_train} examples, binarize: "
                f"{trainer.data.binarize}) with {spec.inference.estimator}, "
                f"{plural(spec.train.epochs, 'epoch')}; run folder {run}"
            )
            trainer.save()
            trainer.fit()
    return trainer


def nothing_to_do(state: dict, epochs: int) -> str | None:
    """Why a run whose checkpoint is ``state`` needs no training up to ``epochs`` epochs in total, or None."""
    done = int(state["epoch"])
    if bool(state["stopped_early"]):
        return (
            f"nothing to do: stopped early at epoch {done} (no better validation ELBO since epoch "
            f"{int(state['best_epoch'])}, kept in {BEST}); an early-stopped run is finished"
        )
    if done >= epochs and int(state["step_in_epoch"]) == 0:
        return f"nothing to do: trained {done} of {plural(epochs, 'epoch')}; ask for more with --epochs"
    return None


def resume(run_dir: Path | str, epochs: int | None = None, show_progress: bool = True) -> Trainer | None:
    """Continue the run in ``run_dir`` from its checkpoint (or from the start if it has none).

    The folder is locked and its checkpoint read and checked against the run's
    spec before anything in it changes; ``epochs`` (``--epochs``) replaces
    ``train.epochs``. A run that is already complete (all its epochs, or stopped
    early) is not trained again: one line says so, only a stale ``metrics.jsonl``
    is rewritten from the checkpoint, and None is returned. The calling process
    is changed as by :func:`train`; torch uses the run's ``train.threads`` threads
    meanwhile, then the caller's again.
    """
    run = Run(run_dir)
    spec = run.read_spec()
    with threads.using(spec.train.threads):
        check_tensorboard(spec)
        with run.locked() if distributed.is_main() else nullcontext():
            return _resume_locked(run, spec, epochs, show_progress)


def _resume_locked(run: Run, spec: Spec, epochs: int | None, show_progress: bool) -> Trainer | None:
    """:func:`resume` once the folder is locked."""
    state = run.load_checkpoint(spec, "last", run_state.STATE_KEYS)[0] if run.has_checkpoint() else None
    if epochs is not None:
        done = int(state["epoch"]) if state is not None else 0
        if epochs < done:
            raise UserInputError(
                f"--epochs {epochs} is the total number of epochs, and '{run}' has already "
                f"trained {plural(done, 'epoch')}; give --epochs above {done} to train further "
                f"(nothing was changed)"
            )
    target = spec.train.epochs if epochs is None else epochs
    done_why = None if state is None else nothing_to_do(state, target)
    if state is not None and done_why is not None:
        if distributed.is_main() and run.read_metrics() != state["metrics"]:
            run.write_metrics(state["metrics"])  # a kill between checkpoint and metrics left them behind
        logging.getLogger(LOGGER).info(done_why)
        return None
    changed_epochs = target != spec.train.epochs
    spec.train.epochs = target
    trainer = Trainer(spec, run, show_progress=show_progress)
    if state is not None:
        trainer.restore(state)
    if changed_epochs and trainer.dist.is_main:
        run.write_spec(spec)
    with run.log_file(trainer.dist.rank):
        if state is not None:
            p = trainer.progress
            if trainer.dist.is_main:
                run.write_metrics(p.metrics)  # a kill between checkpoint and metrics left them behind
            trainer.log.info(f"resuming {run} at epoch {p.epoch + 1}, step {p.step_in_epoch}")
        else:
            trainer.log.info(f"no checkpoint in {run}: starting the run from the beginning with its saved spec")
            trainer.save()
        trainer.fit()
    return trainer
