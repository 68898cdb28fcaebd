"""The end of an epoch: the epoch's evaluation, then a short list of callbacks, each with one job.

After each epoch's steps the loop (:meth:`pyro_vae.training.trainer.Trainer.fit`)
asks :func:`evaluate_epoch` for the epoch's metrics row, records it in the
progress, and hands it to each :class:`Callback` in order:

- :class:`TensorBoard`: the row and, for images, samples and reconstructions (``train.tensorboard``);
- :class:`BestCheckpoint`: ``best.pt`` when the validation ELBO is the best so far;
- :class:`EpochLog`: the epoch's log line, and a warning if training diverges;
- :class:`EarlyStopping`: stop after ``train.early_stopping_patience`` epochs without a better validation ELBO;
- :class:`Schedule`: one step of the learning-rate schedule;
- :class:`Checkpoint`: ``checkpoint.pt`` and ``metrics.jsonl``.

:class:`Pictures` acts once training has ended normally (``train.pictures``).
The callbacks that write files write only into a run folder, and on rank 0 only.
A callback holds no numbers of the run: what must survive a resume lives in
the trainer's progress, which the checkpoint holds.

The end-of-epoch test and validation ELBOs draw from their own generator,
seeded by (seed, epoch) (:func:`evaluation_seed`), so the size of the test split
and ``train.eval_num_samples`` change no number of the training trajectory.

Divergence (:func:`divergence_warning`): the reference is the ELBO of the
starting parameters, E₀ (the first step's estimate, taken before its update);
epoch e's train ELBO E_e is diverging when::

    E_e < E₀ − DIVERGENCE_FACTOR · max(|E₀|, 1 nat),

that is, for the usual negative E₀, more than ten times its magnitude below it
(E_e < 11 E₀): worse by an order of magnitude than the untrained model.
Checkpoints older than this record use the first epoch's train ELBO as E₀.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pyro

from pyro_vae import evaluation, semisupervised
from pyro_vae.config.spec import Spec
from pyro_vae.training import optimizer
from pyro_vae.training.run import BEST

if TYPE_CHECKING:
    from pyro_vae.training import board
    from pyro_vae.training.trainer import Trainer

EVALUATION_STREAM = 1  # the (seed, epoch, stream) entropy of the end-of-epoch evaluation's generator
DIVERGENCE_FACTOR = 10.0  # see the module docstring: E_e < E₀ − factor · max(|E₀|, 1) warns


def evaluation_seed(seed: int, epoch: int) -> int:
    """The seed of the end-of-epoch evaluation of ``epoch``: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch, EVALUATION_STREAM]).generate_state(1)[0])


def divergence_warning(epoch: int, train_elbo: float, start_elbo: float, lr: float) -> str | None:
    """The warning line for ``train_elbo`` of ``epoch`` far below the starting point's ``start_elbo``; else None."""
    if not train_elbo < start_elbo - DIVERGENCE_FACTOR * max(abs(start_elbo), 1.0):
        return None
    return (
        f"warning: epoch {epoch}: train ELBO {train_elbo:.4g} nats, more than {DIVERGENCE_FACTOR:g}×|E₀| below "
        f"the starting point's E₀ = {start_elbo:.4g} nats: training is diverging. Try a lower optim.lr "
        f"(now {lr:g}) or optim.clip_norm"
    )


def evaluate_epoch(trainer: Trainer) -> dict:
    """The metrics row of the epoch just trained (not yet counted as complete in the progress).

    Keys, in order: ``epoch`` (1-based), ``train_elbo`` (−mean step loss / N),
    ``validation_elbo`` (runs with a validation split), the test figures of
    :func:`pyro_vae.evaluation.test_elbo`, ``test_error`` (M2 only: the share of test examples whose
    argmax q(y|x) is not their label), ``seconds``, ``kl_weight`` (the epoch's
    last β) and ``lr``. A non-finite test or validation ELBO stops training.
    """
    p, spec = trainer.progress, trainer.spec
    seed = evaluation_seed(spec.train.seed, p.epoch)  # its own generator: training's is left as it was
    with pyro.validation_enabled(False):  # damaged parameters give NaN here, not a ValueError
        draws = spec.train.eval_num_samples
        test = evaluation.test_elbo(
            trainer.vae, trainer.data.test, num_samples=draws, seed=seed, labels=trainer.labels("test")
        )
        validation = (
            None
            if trainer.data.validation is None
            else evaluation.test_elbo(
                trainer.vae,
                trainer.data.validation,
                num_samples=draws,
                seed=seed,
                labels=trainer.labels("validation"),
            )["test_elbo"]
        )
    if not all(math.isfinite(value) for value in [*test.values(), *([validation] if validation is not None else [])]):
        raise trainer.nonfinite("non-finite test or validation ELBO", p.step_in_epoch)
    return {
        "epoch": p.epoch + 1,
        "train_elbo": -float(np.mean(p.epoch_losses)) / trainer.data.num_train,
        **({"validation_elbo": validation} if validation is not None else {}),
        **test,
        **semisupervised.classification(trainer.vae, trainer.data.test, trainer.data.test_labels),
        "seconds": p.epoch_seconds,
        "kl_weight": trainer.kl_weight_at(p.global_step - 1),
        "lr": optimizer.current_lr(trainer.optimizer),
    }


def improved(trainer: Trainer) -> bool:
    """Whether the epoch just completed has the best validation ELBO so far (after :class:`BestCheckpoint`)."""
    p = trainer.progress
    return p.best_validation is not None and p.best_epoch == p.epoch


class Callback:
    """One job at the end of each epoch; the default of every method does nothing."""

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        """After the epoch of ``row`` is complete (the progress counts it)."""

    def train_end(self, trainer: Trainer) -> None:
        """After the last epoch, when training ends normally (all epochs, or stopped early)."""

    def close(self) -> None:
        """However training ends: release what the callback holds open."""


class TensorBoard(Callback):
    """With ``train.tensorboard``: the row's scalars and pictures in ``RUN/tensorboard`` (:mod:`.board`).

    The writer opens at the first epoch's end and closes when training ends, however it ends.
    """

    def __init__(self) -> None:
        self.writer: board.EpochWriter | None = None

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        if not trainer.spec.train.tensorboard or trainer.run is None or not trainer.dist.is_main:
            return
        from pyro_vae.training import board

        if self.writer is None:
            self.writer = board.EpochWriter(trainer.run.path, trainer.spec.train.seed)
        self.writer.write(row, trainer.vae, trainer.data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class BestCheckpoint(Callback):
    """``best.pt``: the parameters of the epoch with the highest validation ELBO so far."""

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        p, validation = trainer.progress, row.get("validation_elbo")
        if validation is None or (p.best_validation is not None and validation <= p.best_validation):
            return
        p.best_validation, p.best_epoch = validation, p.epoch
        if trainer.run is None or not trainer.dist.is_main:
            return
        trainer.check_parameters()
        trainer.run.save_best(
            {
                "spec": trainer.spec.to_dict(),
                "model": trainer.vae.state_dict(),
                "epoch": p.best_epoch,
                "validation_elbo": p.best_validation,
            }
        )


class EpochLog(Callback):
    """The epoch's line in the log; a warning when the train ELBO diverges (:func:`divergence_warning`)."""

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        p, validation = trainer.progress, row.get("validation_elbo")
        where = (
            f"  validation ELBO {validation:9.3f}" + (" (best)" if improved(trainer) else "")
            if validation is not None
            else ""
        )
        trainer.log.info(
            f"epoch {row['epoch']:>3}  train ELBO {row['train_elbo']:9.3f}{where}  test ELBO "
            f"{row['test_elbo']:9.3f} nats  ({row['seconds']:.1f} s)"
        )
        start = p.start_elbo if p.start_elbo is not None else p.metrics[0]["train_elbo"]
        diverging = divergence_warning(row["epoch"], row["train_elbo"], start, trainer.spec.optim.lr)
        if diverging:
            trainer.log.warning(diverging)


class EarlyStopping(Callback):
    """Stop after ``train.early_stopping_patience`` epochs without a better validation ELBO."""

    def __init__(self, patience: int):
        self.patience = patience

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        p = trainer.progress
        if p.epoch - p.best_epoch < self.patience:
            return
        p.stopped_early = True
        trainer.log.info(
            f"early stopping: no better validation ELBO for {self.patience} epochs; the best is epoch "
            f"{p.best_epoch} ({p.best_validation:.3f} nats), kept in {BEST}"
        )


class Schedule(Callback):
    """One step of the learning-rate schedule (``plateau`` reads the validation ELBO)."""

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        optimizer.step_scheduler(trainer.scheduler, row.get("validation_elbo"))


class Checkpoint(Callback):
    """``checkpoint.pt`` and ``metrics.jsonl`` (:meth:`pyro_vae.training.trainer.Trainer.save`)."""

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        trainer.save()


class Pictures(Callback):
    """After training: the pictures ``train.pictures`` asks for, in the run folder (:mod:`pyro_vae.pictures`)."""

    def train_end(self, trainer: Trainer) -> None:
        if trainer.run is None or not trainer.dist.is_main:
            return
        from pyro_vae import pictures

        pictures.write(
            trainer.run.path,
            trainer.vae,
            trainer.data,
            trainer.progress.metrics,
            trainer.spec.train.pictures,
            trainer.show_progress,
        )


def default_callbacks(spec: Spec) -> list[Callback]:
    """The end-of-epoch work of a run of ``spec``, in order (the module docstring's list)."""
    patience = spec.train.early_stopping_patience
    return [
        TensorBoard(),
        BestCheckpoint(),
        EpochLog(),
        *([EarlyStopping(patience)] if patience is not None else []),
        Schedule(),
        Checkpoint(),
        Pictures(),
    ]
