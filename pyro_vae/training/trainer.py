"""The SVI loop: minibatches by index, progress, checkpoints, exact resume, NaN guard.

One step on a minibatch of B of the N training examples::

    loss = −ELBO estimate of the whole training set (the plate scales by N/B)
    loss.backward(); Adam step on θ and φ together

The per-example figures reported (``train_elbo``) are −loss / N, averaged over
the epoch's steps. The update rule is Pyro's ``pyro.optim.Adam``: Adam acts on
each parameter element separately, so one ``torch.optim.Adam`` over all the
module parameters gives the same updates as Pyro's one-optimizer-per-parameter
wrapper, with a single fused step instead of one per tensor.

The loop itself is short (:meth:`Trainer.fit`)::

    for each epoch left:
        train_epoch()                        the steps, checked for non-finite values
        row = evaluate_epoch()               the metrics row (its own generator)
        progress counts the epoch, row kept
        for callback in callbacks:           TensorBoard, best.pt, log line, early stopping,
            callback.epoch_end(row)          schedule, checkpoint (pyro_vae.training.callbacks)
    for callback in callbacks: callback.train_end()      the pictures

Everything random in training comes from torch's global generator
(initialization, binarization draws, the guide's ε) except the data order, which
is a fresh permutation per epoch from a generator seeded by (seed, epoch), and
the end-of-epoch evaluation, which has its own generator
(:func:`pyro_vae.training.callbacks.evaluation_seed`). A checkpoint holds all of
it (the data order through the seed in its spec and its epoch), so a resumed
run repeats the interrupted epoch bit for bit.

What a run changes in the process that runs it: Pyro's param store is cleared
(the new VAE's parameters replace any there), every global generator (torch,
numpy, Python's ``random``) is seeded from ``train.seed``, and, while a run with
a folder lasts, the ``pyro_vae`` logger writes to its ``log.txt``
(:meth:`pyro_vae.training.run.Run.log_file`). Nothing else global: no other
logger, no environment variable, no ``sys.path`` entry.

Nothing lost:

- a checkpoint is written (atomically, :class:`pyro_vae.training.run.Run`) at the start,
  after every epoch, and at the step reached when SIGINT or SIGTERM arrives;
- every step's loss and largest gradient entry are kept as tensors and checked
  for being finite (every step on the CPU, every ``NONFINITE_CHECK_EVERY`` steps
  and before every checkpoint elsewhere, so no host sync per step on a GPU), as
  are the end-of-epoch test ELBO and, before any checkpoint, the parameters; a
  non-finite value stops training with :class:`NonFiniteError` and no
  checkpoint of the damaged parameters is ever written;
- before a new run touches its folder, the data, the model and one validated
  model/guide pass on two examples are checked (:mod:`pyro_vae.training.checks`),
  so bad input fails first.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import pyro
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from pyro_vae import evaluation, progress, semisupervised
from pyro_vae.conditional import labels_for
from pyro_vae.config.spec import Spec
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import NonFiniteError, UserInputError, one_line
from pyro_vae.model import VAE
from pyro_vae.parts import contracts
from pyro_vae.training import batches, checks, denormals, distributed, optimizer, path_choice, run_state, whole_step
from pyro_vae.training.callbacks import Callback, default_callbacks, evaluate_epoch
from pyro_vae.training.device import resolve_device
from pyro_vae.training.rng import seed_everything
from pyro_vae.training.run import LOGGER, Run, check_same_spec

VALIDATED_STEPS = 3
NONFINITE_CHECK_EVERY = 100


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the step reached was written."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.exit_status = 128 + signum


def is_invalid_parameter(exc: ValueError) -> bool:
    """Whether ``exc`` is a distribution refusing its parameters (Pyro's validation: NaN or out of range)."""
    return str(exc).startswith("Expected parameter")


def kl_weight(spec: Spec, global_step: int, steps_per_epoch: int) -> float:
    """β, reached linearly over ``train.kl_warmup_epochs`` epochs."""
    beta, warmup = spec.train.beta, spec.train.kl_warmup_epochs
    if warmup == 0:
        return beta
    return beta * min(1.0, global_step / (warmup * steps_per_epoch))


@contextmanager
def signals_to_flag(flag: list[int]):
    """While training, SIGINT/SIGTERM only set ``flag``; the loop checkpoints and stops."""

    def handler(signum, frame):
        flag.append(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer:
    """Builds data, VAE, estimator and optimizer from a spec and runs SVI, checkpointing into ``run`` (if any).

    ``callbacks``: the end-of-epoch work, in order; by default that of the spec
    (:func:`pyro_vae.training.callbacks.default_callbacks`).
    Building a trainer clears Pyro's param store (the new VAE's parameters replace
    any there) and seeds every global generator (torch, numpy, Python's ``random``)
    from ``train.seed``. It logs through the ``pyro_vae`` logger and adds no handler
    to it; :func:`pyro_vae.training.train` and :func:`pyro_vae.training.resume` add
    the run's ``log.txt`` for the run.
    """

    def __init__(
        self,
        spec: Spec,
        run: Run | None,
        data: Dataset | None = None,
        show_progress: bool = True,
        callbacks: list[Callback] | None = None,
    ):
        self.spec, self.run = spec, run
        self.dist, device_name = distributed.setup(spec.train.device)  # torchrun's process group, if any
        self.show_progress = show_progress and self.dist.is_main  # progress bars on rank 0 only
        self.device = resolve_device(device_name, "'train.device'")
        self.log = logging.getLogger(LOGGER)
        self.callbacks = default_callbacks(spec) if callbacks is None else callbacks
        self.load_data(data)
        self.build_model()
        self.build_inference()
        self.prepare_loop()
        checks.first_pass(self.elbo, self.vae, self.data, spec, self.device)
        self.dist.seed(spec.train.seed)  # ranks > 0: their own binarization and ε draws

    def load_data(self, data: Dataset | None) -> None:
        """The dataset on the device, then every generator seeded (:func:`pyro_vae.training.rng.seed_everything`).

        Data first: loading draws only from its own generators, but importing a
        loader's library may draw from Python's global one (scikit-learn imports
        rich where it is installed), so the seed comes after it.
        """
        self.data = (data or load_dataset(self.spec.data, self.spec.train.seed)).to(self.device)
        seed_everything(self.spec.train.seed)

    def build_model(self) -> None:
        """The VAE from the spec (the same on every rank), checked against free memory and the data's support."""
        pyro.clear_param_store()  # the one place: a new VAE's parameters replace any earlier ones there
        weight = semisupervised.classifier_weight(
            self.spec.model.classifier_weight, self.data.num_train, self.data.num_labeled
        )
        strata = None
        if self.spec.data.labeled_per_batch is not None:
            strata = (self.data.num_labeled, self.data.num_train - self.data.num_labeled)
        self.vae = VAE.from_spec(
            self.spec.model,
            self.data.data_dim,
            self.data.image_shape,
            self.data.train,
            self.data.num_classes,
            weight,
            strata,
        ).to(self.device)
        self.dist.broadcast_parameters(self.vae)
        checks.check_memory(self.vae, self.device)
        checks.check_data_support(self.vae, self.data, self.spec, self.device)

    def build_inference(self) -> None:
        """Estimator, optimizer, schedule and the training step (eager, traced, compiled or chosen: auto)."""
        spec = self.spec
        self.elbo = contracts.build("estimator", spec.inference.estimator, spec.inference)
        self.optimizer = optimizer.adam(self.vae.parameters(), spec.optim)
        self.scheduler = optimizer.scheduler(self.optimizer, spec.optim, spec.train.epochs)
        self.loss_and_grads = self.training_step(spec.inference.compile)
        self.note = (
            evaluation.kl_note(self.vae, self.data.test, self.labels("test"))
            if spec.inference.estimator == "meanfield"
            else None
        )

    def training_step(self, setting: bool | str, chosen: str | None = None) -> Callable:
        """The step of ``inference.compile`` = ``setting``; ``chosen``: the path ``auto`` took before a resume.

        Whole steps are offered (and the compiler looked for) only where the setting is ``inductor``.
        """
        whole, missing = (
            whole_step.offer(
                self.elbo, self.vae, self.optimizer, self.data, self.spec, self.dist.enabled, self.device, self.log
            )
            if path_choice.path_name(setting) == "inductor"
            else (None, None)
        )
        return path_choice.build_step(
            self.elbo,
            self.vae,
            setting,
            self.log,
            steps_left=lambda: self.horizon - self.progress.global_step,
            chosen=chosen,
            whole=whole,
            no_whole=missing,
        )

    def prepare_loop(self) -> None:
        """Batch size, steps per epoch, how often to check for non-finite values, and the progress."""
        self.batch_size = min(self.spec.data.batch_size, self.data.num_train)
        self.stratified = self.stratified_batches()
        self.steps_per_epoch = (
            math.ceil(self.data.num_train / self.batch_size)
            if self.stratified is None
            else batches.stratified_steps(*self.stratified, self.batch_size)
        )
        self.check_every = 1 if self.device.type == "cpu" else NONFINITE_CHECK_EVERY
        self.progress = run_state.Progress()
        self.horizon = self.spec.train.epochs * self.steps_per_epoch  # the global step the current loop ends at
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its data order), see minibatch

    def stratified_batches(self) -> tuple[torch.Tensor, int] | None:
        """(which training examples are labeled, B_l) where ``data.labeled_per_batch`` = B_l stratifies every batch
        by label (:mod:`pyro_vae.training.batches`); None for uniform batches."""
        per_batch, labeled = self.spec.data.labeled_per_batch, self.data.labeled
        if per_batch is None or labeled is None:
            return None
        if bool(labeled.all()):
            raise UserInputError(
                f"'data.labeled_per_batch' is {per_batch} but every one of the {self.data.num_train} training "
                "examples is labeled; accepted: data.num_labeled below the training size, or "
                "data.labeled_per_batch null"
            )
        if self.dist.enabled:
            raise UserInputError(
                "'data.labeled_per_batch' is set but training is data-parallel (torchrun), whose ranks each take "
                "a slice of every batch; accepted: data.labeled_per_batch null, or one process"
            )
        return labeled, per_batch

    # -- checkpoints ------------------------------------------------------------
    def attach(self, run: Run) -> None:
        """From now on, checkpoint into ``run`` (a folder that :meth:`Run.create` made)."""
        self.run = run

    def state(self) -> dict:
        """Everything a resumed run needs (:func:`pyro_vae.training.run_state.snapshot`)."""
        return run_state.snapshot(
            self.spec,
            self.vae,
            self.optimizer,
            self.scheduler,
            self.progress,
            getattr(self.loss_and_grads, "path", None),
        )

    def save(self) -> None:
        """Checkpoint and metrics into the run folder; never parameters that are not finite."""
        if self.run is None:
            return
        self.check_parameters()
        if not self.dist.is_main:  # data-parallel: rank 0 alone writes
            return
        self.run.save_checkpoint(self.state())

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of this same spec (``train.epochs`` may differ); another spec's is refused."""
        where = None if self.run is None else self.run.path
        check_same_spec(state, self.spec, where)
        self.progress, step_path = run_state.restore(state, self.vae, self.optimizer, self.scheduler, where)
        if step_path is not None:  # auto chose it: the rest of the run takes it too
            self.loss_and_grads = self.training_step(self.spec.inference.compile, chosen=step_path)
        self.dist.seed(self.spec.train.seed, self.progress.global_step)

    # -- the loop ---------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One SVI step on ``x`` (and its labels ``y``, for a conditional VAE); returns the detached loss (−ELBO of
        the full training set) and the largest ``|gradient|``.

        Pyro's validation is on for the first ``VALIDATED_STEPS`` steps: a distribution
        refusing its parameters there (parameters already damaged) stops training like
        a NaN (:class:`NonFiniteError`); any other ``ValueError`` there (a value outside
        a distribution's support, say) stops it with its own one-line message
        (:class:`UserInputError`).
        """
        beta = self.kl_weight_at(self.progress.global_step)
        validate = self.progress.global_step < VALIDATED_STEPS
        with pyro.validation_enabled(validate):
            self.optimizer.zero_grad(set_to_none=True)
            try:
                loss = self.loss_and_grads(
                    x, self.data.num_train, beta, y
                )  # pyro_vae.training.path_choice: eager, traced or compiled
            except ValueError as exc:
                if not validate:
                    raise
                step = self.progress.step_in_epoch + 1
                if is_invalid_parameter(exc):
                    raise self.nonfinite("invalid distribution parameters", step, one_line(exc, 200)) from None
                raise UserInputError(
                    f"training stopped at epoch {self.progress.epoch + 1}, step {step}: "
                    f"{one_line(exc, 300)} (the last good checkpoint is kept)"
                ) from None
            if self.dist.enabled:  # data-parallel: Σ_r (B_r/B) · (gradients, loss), one all-reduce
                loss = self.dist.all_reduce(list(self.vae.parameters()), loss)
            grads = [p.grad for p in self.vae.parameters() if p.grad is not None]
            # max |g| as max(max g, −min g): one pass per tensor, no |g| copy (≈0.5 ms/step less at 784-400-20)
            extremes = [torch.aminmax(g.detach()) for g in grads]
            largest = (
                torch.stack([e for m in extremes for e in (m.max, -m.min)]).amax() if grads else loss.new_zeros(())
            )
            if self.spec.optim.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.spec.optim.clip_norm)
            try:
                with denormals.calling_thread_only(self.device):
                    self.optimizer.step()
            except RuntimeError as exc:  # lr / (1 − β₁ᵗ) beyond float32: "cannot be converted ... without overflow"
                if "overflow" not in str(exc):
                    raise
                raise self.nonfinite(
                    "non-finite Adam update", self.progress.step_in_epoch + 1, "the step size overflows float32"
                ) from None
        return loss, largest

    def fit(self) -> list[dict]:
        """Train until ``train.epochs`` epochs are complete (or early stopping says so); returns the metrics.

        After each epoch: :meth:`end_epoch`; after the last, every callback's
        ``train_end``; however training ends, every callback's ``close``.
        """
        if self.note:
            self.log.info(self.note)
        for line in self.data.notes:
            self.log.info(line)
        stop: list[int] = []
        self.horizon = self.spec.train.epochs * self.steps_per_epoch
        # with bars shown, log lines go through tqdm.write, so a line logged mid-epoch does not cut the bar
        redirect = logging_redirect_tqdm([self.log]) if self.show_progress else nullcontext()
        try:
            with signals_to_flag(self.dist.signal_list(stop)), redirect:  # data-parallel: all ranks stop at one step
                while self.progress.epoch < self.spec.train.epochs and not self.progress.stopped_early:
                    self.train_epoch(stop)
                    self.end_epoch()
            for callback in self.callbacks:
                callback.train_end(self)
        finally:
            for callback in self.callbacks:
                callback.close()
        return self.progress.metrics

    def end_epoch(self) -> None:
        """The epoch's metrics row (:func:`pyro_vae.training.callbacks.evaluate_epoch`) kept, the epoch counted as
        complete, then every callback's ``epoch_end`` with the row, in order."""
        row = evaluate_epoch(self)
        p = self.progress
        if p.start_elbo is None and p.epoch == 0:
            p.start_elbo = -p.epoch_losses[0] / self.data.num_train
        p.metrics.append(row)
        p.epoch, p.step_in_epoch, p.epoch_losses, p.epoch_seconds = p.epoch + 1, 0, [], 0.0
        for callback in self.callbacks:
            callback.epoch_end(self, row)

    def kl_weight_at(self, global_step: int) -> float:
        """β at step ``global_step`` of the run (:func:`kl_weight`)."""
        return kl_weight(self.spec, global_step, self.steps_per_epoch)

    def minibatch(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training batch of step ``position`` of ``epoch``: this rank's slice of it, binarized afresh, and its
        labels for a conditional VAE (else None)."""
        order = self.order_of(epoch)
        index = self.dist.shard(order[position * self.batch_size : (position + 1) * self.batch_size])
        return self.data.training_batch(index), self.batch_labels(index)

    def order_of(self, epoch: int) -> torch.Tensor:
        """The data order of ``epoch`` on the device, uniform or stratified by label
        (:mod:`pyro_vae.training.batches`), kept for the epoch."""
        if self._order is None or self._order[0] != epoch:
            seed = self.spec.train.seed
            order = (
                batches.epoch_order(self.data.num_train, seed, epoch)
                if self.stratified is None
                else batches.stratified_order(*self.stratified, self.batch_size, seed, epoch)
            )
            self._order = (epoch, order.to(self.device))
        return self._order[1]

    def take_steps(self, epoch: int, position: int, losses: torch.Tensor, gradients: torch.Tensor) -> int:
        """The next steps of ``epoch`` from ``position``: several in one call where the whole compiled step takes
        them (:mod:`pyro_vae.training.whole_step`), else one (:meth:`step`). Their losses and largest
        ``|gradient|`` go into ``losses`` and ``gradients`` at their positions; returns how many were taken."""
        whole = getattr(self.loss_and_grads, "whole", None)
        first = self.progress.global_step
        if whole is not None and first >= VALIDATED_STEPS:
            full_left = self.data.num_train // self.batch_size - position
            betas = [self.kl_weight_at(first + s) for s in range(whole.steps_per_call)]
            count = whole.takes(full_left, betas)
            if count:
                size = self.batch_size
                index = self.order_of(epoch)[position * size : (position + count) * size].view(count, size)
                end = position + count
                losses[position:end], gradients[position:end] = whole.steps(index, self.data.num_train, betas[:count])
                return count
        losses[position], gradients[position] = self.step(*self.minibatch(epoch, position))
        return 1

    def batch_labels(self, index: torch.Tensor) -> torch.Tensor | None:
        """The labels of the training examples at ``index`` for a conditional VAE; for M2, −1 marking those used
        without their label; None for an unconditional VAE."""
        if isinstance(self.vae, semisupervised.SemiSupervisedVAE):
            return self.data.partial_labels(index)
        labels = labels_for(self.vae, self.data.train_labels)
        return None if labels is None else labels[index]

    def labels(self, split: str) -> torch.Tensor | None:
        """The labels of ``split`` (``test``, ``validation``) for a conditional VAE; None for an unconditional one."""
        return labels_for(self.vae, self.data.labels(split))

    def run_steps(self, count: int, on_step: Callable[[int], None] | None = None) -> None:
        """``count`` steps from where training stands, through the epochs' data orders, with no epoch-end evaluation
        or checkpoint (``pyro-vae compare --train-steps``); ``on_step(global_step)`` after each.

        A non-finite loss or gradient raises :class:`NonFiniteError` at once.
        """
        p = self.progress
        self.horizon = p.global_step + count
        for _ in range(count):
            if p.step_in_epoch == self.steps_per_epoch:
                p.epoch, p.step_in_epoch = p.epoch + 1, 0
            with denormals.flushed(self.device):
                loss, largest = self.step(*self.minibatch(p.epoch, p.step_in_epoch))
            p.step_in_epoch, p.global_step = p.step_in_epoch + 1, p.global_step + 1
            self.check_finite(loss.reshape(1), largest.reshape(1), first_step=p.step_in_epoch)
            if on_step is not None:
                on_step(p.global_step)

    def train_epoch(self, stop: list[int]) -> None:
        p = self.progress
        losses = torch.full((self.steps_per_epoch,), float("nan"), device=self.device)
        losses[: p.step_in_epoch] = torch.tensor(p.epoch_losses[: p.step_in_epoch])
        gradients = torch.zeros(self.steps_per_epoch, device=self.device)  # max |gradient| per step
        bar = progress.bar(
            self.steps_per_epoch,
            f"epoch {p.epoch + 1}/{self.spec.train.epochs}",
            "step",
            quiet=not self.show_progress,
            initial=p.step_in_epoch,
            every=30.0,
        )
        start = time.perf_counter()
        checked = p.step_in_epoch  # steps before it are known to be finite
        step = p.step_in_epoch
        with denormals.flushed(self.device):  # the steps only: the epoch's evaluation runs as is
            while step < self.steps_per_epoch:
                end = step + self.take_steps(p.epoch, step, losses, gradients)
                p.step_in_epoch, p.global_step = end, p.global_step + end - step
                if end // self.check_every > step // self.check_every or end == self.steps_per_epoch:
                    self.check_finite(losses[checked:end], gradients[checked:end], first_step=checked + 1)
                    checked = end
                if end // NONFINITE_CHECK_EVERY > step // NONFINITE_CHECK_EVERY or end == self.steps_per_epoch:
                    bar.set_postfix_str(f"ELBO {-losses[:end].mean().item() / self.data.num_train:.2f} nats")
                bar.update(end - step)
                if stop:
                    self.check_finite(losses[checked:end], gradients[checked:end], first_step=checked + 1)
                    p.epoch_seconds += time.perf_counter() - start
                    p.epoch_losses = losses[:end].tolist()
                    bar.close()
                    self.save()
                    where = f"epoch {p.epoch + 1}, step {end}"
                    self.log.info(f"checkpoint written at {where}; resume with --resume {self.run}")
                    raise TrainingInterrupted(stop[0])
                step = end
        bar.close()
        p.epoch_seconds += time.perf_counter() - start
        p.epoch_losses = losses.tolist()

    def check_finite(self, losses: torch.Tensor, gradients: torch.Tensor, first_step: int = 1) -> None:
        """Stop at the first non-finite loss or gradient; ``losses[0]`` is step ``first_step`` of the epoch."""
        finite = torch.isfinite(torch.stack([losses, gradients]))
        if bool(finite.all()):
            return
        bad = int((~finite.all(0)).nonzero()[0])
        raise self.nonfinite("non-finite loss" if not finite[0, bad] else "non-finite gradient", first_step + bad)

    def check_parameters(self) -> None:
        """Stop if a parameter is NaN or infinite (an update overflowed): before evaluating or saving."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.vae.parameters()]).all()
        if not bool(finite):
            raise self.nonfinite("non-finite parameters", self.progress.step_in_epoch)

    def nonfinite(self, what: str, step: int, detail: str = "") -> NonFiniteError:
        """The one-line error for ``what`` (e.g. "non-finite loss") at ``step`` of the current epoch."""
        detail = f" ({detail})" if detail else ""
        return NonFiniteError(
            f"{what} at epoch {self.progress.epoch + 1}, step {step}{detail}: training stopped, the last good "
            f"checkpoint is kept. Usual causes: a learning rate too high (optim.lr={self.spec.optim.lr}), a likelihood "
            f"scale too small (model.likelihood.scale), data outside the expected range; try optim.clip_norm"
        )
