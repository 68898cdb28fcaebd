"""The SVI loop: minibatches by index, progress, checkpoints, exact resume, NaN guard.

One step on a minibatch of B of the N training examples::

    loss = −ELBO estimate of the whole training set (the plate scales by N/B)
    loss.backward(); Adam step on θ and φ together

The per-example figures reported (``train_elbo``) are −loss / N, averaged over
the epoch's steps. The update rule is Pyro's ``pyro.optim.Adam``: Adam acts on
each parameter element separately, so one ``torch.optim.Adam`` over all the
module parameters gives the same updates as Pyro's one-optimizer-per-parameter
wrapper, with a single fused step instead of one per tensor.

Everything random in training comes from torch's global generator
(initialization, binarization draws, the guide's ε) except the data order, which
is a fresh permutation per epoch from a generator seeded by (seed, epoch). The
end-of-epoch test and validation ELBOs draw from their own generator, seeded by
(seed, epoch) too (:func:`evaluation_seed`), so the size of the test split and
``train.eval_num_samples`` change no number of the training trajectory. A
checkpoint holds all of it (the data order through the seed in its spec and its
epoch), so a resumed run repeats the interrupted epoch bit for bit.

What a run changes in the process that runs it: Pyro's param store is cleared
(the new VAE's parameters replace any there), every global generator (torch,
numpy, Python's ``random``) is seeded from ``train.seed``, and, while a run with
a folder lasts, the ``pyro_vae`` logger writes to its ``log.txt``
(:func:`pyro_vae.training.runs.run_log`). Nothing else global: no other logger, no
environment variable, no ``sys.path`` entry.

Nothing lost:

- a checkpoint is written (atomically, :mod:`pyro_vae.training.checkpoint`) at the start,
  after every epoch, and at the step reached when SIGINT or SIGTERM arrives;
- every step's loss and largest gradient entry are kept as tensors and checked
  for being finite (every step on the CPU, every ``NONFINITE_CHECK_EVERY`` steps
  and before every checkpoint elsewhere, so no host sync per step on a GPU), as
  are the end-of-epoch test ELBO and, before any checkpoint, the parameters; a
  non-finite value stops training with :class:`NonFiniteError` and no
  checkpoint of the damaged parameters is ever written;
- before a new run touches its folder, the data, the model and one validated
  model/guide pass on two examples are checked, so bad input fails first.

Said out loud (a warning in the log and on stderr, at most one line per epoch):
a train ELBO that diverges while staying finite. The reference is the ELBO of
the starting parameters, E₀ (the first step's estimate, taken before its
update); epoch e's train ELBO E_e is diverging when

    E_e < E₀ − DIVERGENCE_FACTOR · max(|E₀|, 1 nat),

that is, for the usual negative E₀, more than ten times its magnitude below it
(E_e < 11 E₀): worse by an order of magnitude than the untrained model.
Checkpoints older than this record use the first epoch's train ELBO as E₀.
Sizes (``data.train_size``, ``data.test_size``) beyond the data are logged with
what was used.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import pyro
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from pyro_vae import evaluation, progress, threads
from pyro_vae.conditional import labels_for, program_kwargs
from pyro_vae.config.spec import Spec, check_device_name
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import NonFiniteError, UserInputError, one_line
from pyro_vae.infer import estimators
from pyro_vae.model import VAE, check_likelihood_support
from pyro_vae.parts import contracts
from pyro_vae.training import checkpoint, distributed, optimizer, path_choice, run_state, runs
from pyro_vae.training.rng import seed_everything

if TYPE_CHECKING:
    from pyro_vae.training import board

VALIDATED_STEPS = 3
NONFINITE_CHECK_EVERY = 100
EVALUATION_STREAM = 1  # the (seed, epoch, stream) entropy of the end-of-epoch evaluation's generator
DIVERGENCE_FACTOR = 10.0  # see the module docstring: E_e < E₀ − factor · max(|E₀|, 1) warns


def divergence_warning(epoch: int, train_elbo: float, start_elbo: float, lr: float) -> str | None:
    """The warning line for ``train_elbo`` of ``epoch`` far below the starting point's ``start_elbo``; else None."""
    if not train_elbo < start_elbo - DIVERGENCE_FACTOR * max(abs(start_elbo), 1.0):
        return None
    return (
        f"warning: epoch {epoch}: train ELBO {train_elbo:.4g} nats, more than {DIVERGENCE_FACTOR:g}×|E₀| below "
        f"the starting point's E₀ = {start_elbo:.4g} nats: training is diverging. Try a lower optim.lr "
        f"(now {lr:g}) or optim.clip_norm"
    )


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the step reached was written."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.exit_status = 128 + signum


def resolve_device(name: str, key: str) -> torch.device:
    """``name`` as a device that exists on this machine; ``key`` names the setting in the error."""
    check_device_name(name, key)
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserInputError(f"{key} is {name!r} but this machine has {count} CUDA device(s); use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"{key} is 'mps' but MPS is not available on this machine; use cpu")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch failing to allocate memory (CPU or GPU)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def check_memory(vae: VAE, device: torch.device) -> None:
    """Refuse a model whose parameters, gradients and Adam state cannot fit in free memory."""
    needed = 4 * sum(p.numel() * p.element_size() for p in vae.parameters())
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text().split()
            available = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
        except (OSError, ValueError, IndexError):
            return  # not Linux: no cheap way to ask
    held = sum(p.numel() * p.element_size() for p in vae.parameters())  # already allocated
    if needed - held > available:
        count = sum(p.numel() for p in vae.parameters())
        raise UserInputError(
            f"the model has {count:,} parameters: training needs about {needed / 2**30:.1f} GiB (parameters, "
            f"gradients, Adam state) but {available / 2**30:.1f} GiB is free on {device}; reduce model.encoder.hidden, "
            f"model.decoder.hidden, model.latent_dim or model.prior.pseudo_inputs"
        )


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


def evaluation_seed(seed: int, epoch: int) -> int:
    """The seed of the end-of-epoch evaluation of ``epoch``: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch, EVALUATION_STREAM]).generate_state(1)[0])


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
    """Builds data, VAE, estimator and optimizer from a spec and runs SVI into a run folder.

    Building a trainer clears Pyro's param store (the new VAE's parameters replace
    any there) and seeds every global generator (torch, numpy, Python's ``random``)
    from ``train.seed``. It logs through the ``pyro_vae`` logger and adds no handler
    to it; :func:`train` and :func:`resume` add the run's ``log.txt`` for the run.
    """

    def __init__(self, spec: Spec, run_dir: Path | None, data: Dataset | None = None, show_progress: bool = True):
        self.spec, self.run_dir = spec, run_dir
        self.join_job(show_progress)
        self.load_data(data)
        self.build_model()
        self.build_inference()
        self.prepare_loop()
        self.dry_run()
        self.dist.seed(spec.train.seed)  # ranks > 0: their own binarization and ε draws

    def join_job(self, show_progress: bool) -> None:
        """torchrun's process group (if any), the device, the package's logger; progress bars on rank 0 only."""
        self.dist, device_name = distributed.setup(self.spec.train.device)
        self.show_progress = show_progress and self.dist.is_main
        self.device = resolve_device(device_name, "'train.device'")
        self.log = logging.getLogger(runs.LOGGER)

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
        self.vae = VAE.from_spec(
            self.spec.model, self.data.data_dim, self.data.image_shape, self.data.train, self.data.num_classes
        ).to(self.device)
        self.dist.broadcast_parameters(self.vae)
        check_memory(self.vae, self.device)
        self.check_data()

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
        """The step of ``inference.compile`` = ``setting``; ``chosen``: the path ``auto`` took before a resume."""
        return path_choice.build_step(
            self.elbo,
            self.vae,
            setting,
            self.log,
            steps_left=lambda: self.horizon - self.progress.global_step,
            chosen=chosen,
        )

    def prepare_loop(self) -> None:
        """Batch size, steps per epoch, how often to check for non-finite values, and the progress."""
        self.batch_size = min(self.spec.data.batch_size, self.data.num_train)
        self.steps_per_epoch = math.ceil(self.data.num_train / self.batch_size)
        self.check_every = 1 if self.device.type == "cpu" else NONFINITE_CHECK_EVERY
        self.progress = run_state.Progress()
        self.horizon = self.spec.train.epochs * self.steps_per_epoch  # the global step the current loop ends at
        self.board: board.EpochWriter | None = None  # the TensorBoard writer, opened at the first epoch's end
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its data order), see minibatch

    def check_data(self) -> None:
        """Support: refuse data the likelihood cannot take (all of it; dynamic draws are 0/1 anyway)."""
        name = self.spec.model.likelihood.type
        train = self.data.train
        if self.data.binarize == "dynamic":
            train = self.data.training_batch(torch.arange(min(self.data.num_train, 4096), device=self.device))
        check_likelihood_support(
            self.vae, train, name, f"data '{self.spec.data.name}' (binarize: {self.data.binarize})"
        )
        check_likelihood_support(self.vae, self.data.test, name, f"the test split of '{self.spec.data.name}'")

    def dry_run(self) -> None:
        """One validated model/guide pass on two examples, the generators left untouched.

        Data the network cannot take, or a spec whose distributions are invalid
        from the start, fail here with one line, before a run folder is written.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), pyro.validation_enabled(True):
                index = torch.arange(min(2, self.data.num_train), device=self.device)
                x, y = self.data.training_batch(index), self.batch_labels(index)
                estimators.bound(
                    self.elbo, self.vae.model, self.vae.guide, x, num_data=self.data.num_train, **program_kwargs(y)
                )
        except (RuntimeError, ValueError) as exc:
            if is_out_of_memory(exc):
                raise
            shape = f"examples of {self.data.data_dim} values" + (
                f" (images {self.data.image_shape})" if self.data.image_shape else ""
            )
            raise UserInputError(
                f"the spec and data '{self.spec.data.name}' ({shape}) fail a first model/guide pass: "
                f"{one_line(exc, 300)}"
            ) from None

    # -- checkpoints ------------------------------------------------------------
    def attach(self, run_dir: Path) -> None:
        """From now on, checkpoint into ``run_dir`` (a folder that ``runs.prepare`` made)."""
        self.run_dir = Path(run_dir)

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
        if self.run_dir is None:
            return
        self.check_parameters()
        if not self.dist.is_main:  # data-parallel: rank 0 alone writes
            return
        checkpoint.save_atomic(self.state(), self.run_dir / runs.CHECKPOINT)
        runs.write_metrics(self.run_dir, self.progress.metrics)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of this same spec (``train.epochs`` may differ)."""
        self.progress, step_path = run_state.restore(
            state, self.spec, self.vae, self.optimizer, self.scheduler, self.run_dir
        )
        if step_path is not None:  # auto chose it: the rest of the run takes it too
            self.loss_and_grads = self.training_step(self.spec.inference.compile, chosen=step_path)
        self.dist.seed(self.spec.train.seed, self.progress.global_step)

    # -- the loop ---------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One SVI step on ``x`` (and its labels ``y``, for a conditional VAE); returns the detached loss (−ELBO of
        the full training set) and max |gradient|.

        Pyro's validation is on for the first ``VALIDATED_STEPS`` steps: a distribution
        refusing its parameters there (parameters already damaged) stops training like
        a NaN (:class:`NonFiniteError`); any other ``ValueError`` there (a value outside
        a distribution's support, say) stops it with its own one-line message
        (:class:`UserInputError`).
        """
        beta = kl_weight(self.spec, self.progress.global_step, self.steps_per_epoch)
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
                self.optimizer.step()
            except RuntimeError as exc:  # lr / (1 − β₁ᵗ) beyond float32: "cannot be converted ... without overflow"
                if "overflow" not in str(exc):
                    raise
                raise self.nonfinite(
                    "non-finite Adam update", self.progress.step_in_epoch + 1, "the step size overflows float32"
                ) from None
        return loss, largest

    def fit(self) -> list[dict]:
        """Train until ``train.epochs`` epochs are complete; returns the metrics.

        The TensorBoard writer (if any) is closed however training ends.
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
        finally:
            self.close_board()
        return self.progress.metrics

    def minibatch(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training batch of step ``position`` of ``epoch``: this rank's slice of it, binarized afresh, and its
        labels for a conditional VAE (else None)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.data.num_train, self.spec.train.seed, epoch).to(self.device))
        index = self.dist.shard(self._order[1][position * self.batch_size : (position + 1) * self.batch_size])
        return self.data.training_batch(index), self.batch_labels(index)

    def batch_labels(self, index: torch.Tensor) -> torch.Tensor | None:
        """The labels of the training examples at ``index`` for a conditional VAE; None for an unconditional one."""
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
        for step in range(p.step_in_epoch, self.steps_per_epoch):
            losses[step], gradients[step] = self.step(*self.minibatch(p.epoch, step))
            p.step_in_epoch, p.global_step = step + 1, p.global_step + 1
            if (step + 1) % self.check_every == 0 or step + 1 == self.steps_per_epoch:
                self.check_finite(losses[checked : step + 1], gradients[checked : step + 1], first_step=checked + 1)
                checked = step + 1
            if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == self.steps_per_epoch:
                bar.set_postfix_str(f"ELBO {-losses[: step + 1].mean().item() / self.data.num_train:.2f} nats")
            bar.update(1)
            if stop:
                self.check_finite(losses[checked : step + 1], gradients[checked : step + 1], first_step=checked + 1)
                p.epoch_seconds += time.perf_counter() - start
                p.epoch_losses = losses[: step + 1].tolist()
                bar.close()
                self.save()
                self.log.info(
                    f"checkpoint written at epoch {p.epoch + 1}, step {step + 1}; resume with --resume {self.run_dir}"
                )
                raise TrainingInterrupted(stop[0])
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

    def end_epoch(self) -> None:
        """Evaluate, log and checkpoint the epoch just completed; keep the best; step the schedule; stop early."""
        p = self.progress
        seed = evaluation_seed(self.spec.train.seed, p.epoch)  # its own generator: training's is left as it was
        with pyro.validation_enabled(False):  # damaged parameters give NaN here, not a ValueError
            draws = self.spec.train.eval_num_samples
            test = evaluation.test_elbo(
                self.vae, self.data.test, num_samples=draws, seed=seed, labels=self.labels("test")
            )
            validation = (
                None
                if self.data.validation is None
                else evaluation.test_elbo(
                    self.vae, self.data.validation, num_samples=draws, seed=seed, labels=self.labels("validation")
                )["test_elbo"]
            )
        if not all(
            math.isfinite(value) for value in [*test.values(), *([validation] if validation is not None else [])]
        ):
            raise self.nonfinite("non-finite test or validation ELBO", p.step_in_epoch)
        row = {
            "epoch": p.epoch + 1,
            "train_elbo": -float(np.mean(p.epoch_losses)) / self.data.num_train,
            **({"validation_elbo": validation} if validation is not None else {}),
            **test,
            "seconds": p.epoch_seconds,
            "kl_weight": kl_weight(self.spec, p.global_step - 1, self.steps_per_epoch),  # the epoch's last β
            "lr": optimizer.current_lr(self.optimizer),
        }
        if p.start_elbo is None and p.epoch == 0:
            p.start_elbo = -p.epoch_losses[0] / self.data.num_train
        p.metrics.append(row)
        self.write_board(row)
        p.epoch, p.step_in_epoch, p.epoch_losses, p.epoch_seconds = p.epoch + 1, 0, [], 0.0
        improved = validation is not None and (p.best_validation is None or validation > p.best_validation)
        if improved:
            p.best_validation, p.best_epoch = validation, p.epoch
            self.save_best()
        patience = self.spec.train.early_stopping_patience
        if patience is not None and p.epoch - p.best_epoch >= patience:
            p.stopped_early = True
        optimizer.step_scheduler(self.scheduler, validation)
        where = (
            f"  validation ELBO {validation:9.3f}" + (" (best)" if improved else "") if validation is not None else ""
        )
        self.log.info(
            f"epoch {row['epoch']:>3}  train ELBO {row['train_elbo']:9.3f}{where}  test ELBO "
            f"{row['test_elbo']:9.3f} nats  ({row['seconds']:.1f} s)"
        )
        start = p.start_elbo if p.start_elbo is not None else p.metrics[0]["train_elbo"]
        diverging = divergence_warning(row["epoch"], row["train_elbo"], start, self.spec.optim.lr)
        if diverging:
            self.log.warning(diverging)
        if p.stopped_early:
            self.log.info(
                f"early stopping: no better validation ELBO for {patience} epochs; the best is epoch "
                f"{p.best_epoch} ({p.best_validation:.3f} nats), kept in {runs.BEST}"
            )
        self.save()

    def write_board(self, row: dict) -> None:
        """With ``train.tensorboard``: the epoch's scalars and pictures in ``RUN/tensorboard``
        (:mod:`pyro_vae.training.board`)."""
        if not self.spec.train.tensorboard or self.run_dir is None or not self.dist.is_main:
            return
        from pyro_vae.training import board

        if self.board is None:
            self.board = board.EpochWriter(self.run_dir, self.spec.train.seed)
        self.board.write(row, self.vae, self.data)

    def close_board(self) -> None:
        """Close the TensorBoard writer, if one is open (the next epoch's end opens a new one)."""
        if self.board is not None:
            self.board.close()
            self.board = None

    def save_best(self) -> None:
        """``best.pt``: the parameters of the epoch with the highest validation ELBO, written atomically."""
        if self.run_dir is None or not self.dist.is_main:
            return
        self.check_parameters()
        p = self.progress
        checkpoint.save_atomic(
            {
                "spec": self.spec.to_dict(),
                "model": self.vae.state_dict(),
                "epoch": p.best_epoch,
                "validation_elbo": p.best_validation,
            },
            self.run_dir / runs.BEST,
        )

    def write_pictures(self) -> None:
        """The pictures ``train.pictures`` asks for in the run folder (:mod:`pyro_vae.pictures`)."""
        if self.run_dir is None or not self.dist.is_main:
            return
        from pyro_vae import pictures

        pictures.write(
            self.run_dir, self.vae, self.data, self.progress.metrics, self.spec.train.pictures, self.show_progress
        )


def train(spec: Spec, run_dir: Path, force: bool = False, show_progress: bool = True) -> Trainer:
    """A new run: check every input, then lock and prepare the folder, train, write the pictures.

    The folder, the data, the model and a first model/guide pass are checked
    before anything is written, so bad input leaves an existing folder as it was.

    What it changes in the calling process: Pyro's param store is cleared and every
    global generator (torch, numpy, Python's ``random``) is seeded from
    ``train.seed`` (:class:`Trainer`); while it runs, the ``pyro_vae`` logger also
    writes to ``run_dir/log.txt`` (:func:`pyro_vae.training.runs.run_log`). It adds no console
    handler: the lines reach the host's own logging handlers, if any.
    torch uses ``train.threads`` threads meanwhile (:mod:`pyro_vae.threads`); the
    caller's thread count is restored afterwards.
    The folder stays locked (:func:`pyro_vae.training.runs.locked`) until the run ends.
    """
    with threads.using(spec.train.threads):
        return _train(spec, Path(run_dir), force, show_progress)


def _train(spec: Spec, run_dir: Path, force: bool, show_progress: bool) -> Trainer:
    if spec.train.tensorboard:
        from pyro_vae.training import board

        board.check_available()
    if distributed.is_main():  # under torchrun, rank 0 alone checks and writes the folder
        runs.check_not_in_use(run_dir)
        runs.check_new_run(run_dir, spec, force)
    trainer = Trainer(spec, None, show_progress=show_progress)
    if trainer.dist.is_main:
        runs.writable_folder(run_dir, "output folder")
    with runs.locked(run_dir) if trainer.dist.is_main else nullcontext():
        if trainer.dist.is_main:
            runs.check_new_run(run_dir, spec, force)  # again, now that no other command can write there
            runs.prepare(run_dir, spec, force, model_inputs(trainer.data, trainer.vae))
        trainer.attach(run_dir)
        with runs.run_log(run_dir, trainer.dist.rank):
            if trainer.dist.enabled:
                trainer.log.info(trainer.dist.describe(trainer.batch_size, trainer.device))
            trainer.log.info(
                f"training {spec.data.name} ({trainer.data.num_train} examples, binarize: "
                f"{trainer.data.binarize}) with {spec.inference.estimator}, "
                f"{plural(spec.train.epochs, 'epoch')}; run folder {run_dir}"
            )
            trainer.save()
            trainer.fit()
            trainer.write_pictures()
    return trainer


def nothing_to_do(state: dict, epochs: int) -> str | None:
    """Why a run whose checkpoint is ``state`` needs no training up to ``epochs`` epochs in total, or None."""
    done = int(state["epoch"])
    if bool(state["stopped_early"]):
        return (
            f"nothing to do: stopped early at epoch {done} (no better validation ELBO since epoch "
            f"{int(state['best_epoch'])}, kept in {runs.BEST}); an early-stopped run is finished"
        )
    if done >= epochs and int(state["step_in_epoch"]) == 0:
        return f"nothing to do: trained {done} of {plural(epochs, 'epoch')}; ask for more with --epochs"
    return None


def resume(run_dir: Path, epochs: int | None = None, show_progress: bool = True) -> Trainer | None:
    """Continue the run in ``run_dir`` from its checkpoint (or from the start if it has none).

    The folder is locked (:func:`pyro_vae.training.runs.locked`) and its checkpoint read
    and checked against the run's spec before anything in it changes;
    ``epochs`` (``--epochs``) replaces ``train.epochs``. A run that is already
    complete (all its epochs, or stopped early) is not trained again: one line
    says so, only a stale ``metrics.jsonl`` is rewritten from the checkpoint,
    and None is returned.
    The calling process is changed as by :func:`train` (param store, generators,
    ``log.txt`` while it runs); torch uses the run's ``train.threads`` threads
    meanwhile, then the caller's again.
    """
    run_dir = Path(run_dir)
    spec = runs.read_spec(run_dir)
    with threads.using(spec.train.threads):
        return _resume(spec, run_dir, epochs, show_progress)


def _resume(spec: Spec, run_dir: Path, epochs: int | None, show_progress: bool) -> Trainer | None:
    if spec.train.tensorboard:
        from pyro_vae.training import board

        board.check_available()
    with runs.locked(run_dir) if distributed.is_main() else nullcontext():
        return _resume_locked(run_dir, spec, epochs, show_progress)


def _resume_locked(run_dir: Path, spec: Spec, epochs: int | None, show_progress: bool) -> Trainer | None:
    """:func:`resume` once the folder is locked."""
    path = run_dir / runs.CHECKPOINT
    state = checkpoint.load(path, required=run_state.STATE_KEYS) if path.exists() else None
    if epochs is not None:
        done = int(state["epoch"]) if state is not None else 0
        if epochs < done:
            raise UserInputError(
                f"--epochs {epochs} is the total number of epochs, and '{run_dir}' has already "
                f"trained {plural(done, 'epoch')}; give --epochs above {done} to train further "
                f"(nothing was changed)"
            )
    target = spec.train.epochs if epochs is None else epochs
    done_why = None if state is None else nothing_to_do(state, target)
    if state is not None and done_why is not None:
        run_state.check_same_spec(state, spec, run_dir)
        if distributed.is_main() and runs.read_metrics(run_dir) != state["metrics"]:
            runs.write_metrics(run_dir, state["metrics"])  # a kill between checkpoint and metrics left them behind
        logging.getLogger("pyro_vae").info(done_why)
        return None
    changed_epochs = target != spec.train.epochs
    spec.train.epochs = target
    trainer = Trainer(spec, None, show_progress=show_progress)
    trainer.attach(run_dir)
    if state is not None:
        trainer.restore(state)
    if changed_epochs and trainer.dist.is_main:
        runs.write_text_atomic(run_dir / runs.CONFIG, spec.to_yaml())
    with runs.run_log(run_dir, trainer.dist.rank):
        if state is not None:
            p = trainer.progress
            if trainer.dist.is_main:
                runs.write_metrics(run_dir, p.metrics)  # a kill between checkpoint and metrics left them behind
            trainer.log.info(f"resuming {run_dir} at epoch {p.epoch + 1}, step {p.step_in_epoch}")
        else:
            trainer.log.info(f"no checkpoint in {run_dir}: starting the run from the beginning with its saved spec")
            trainer.save()
        trainer.fit()
        trainer.write_pictures()
    return trainer


def model_inputs(data: Dataset, vae: VAE) -> dict:
    """What :meth:`VAE.from_spec` reads from the data to build a model to load a checkpoint into
    (``num_classes`` for a conditional ``vae`` only)."""
    inputs = {"data_dim": data.data_dim, "image_shape": None if data.image_shape is None else list(data.image_shape)}
    return {**inputs, "num_classes": vae.num_classes} if vae.num_classes else inputs


def _checked_state(run_dir: Path, device: str | None, which: str) -> tuple[Spec, dict, Path, torch.device]:
    """The run's spec, its checkpoint ``which`` (read once, checked against the spec), its path, and the device."""
    spec = runs.read_spec(run_dir)
    path = runs.checkpoint_path(run_dir, which)
    state = checkpoint.load(path, required=("spec", "model", "epoch"))
    run_state.check_same_spec(state, spec, run_dir)
    if device is not None:
        spec.train.device = device
    return spec, state, path, resolve_device(spec.train.device, "--device" if device is not None else "'train.device'")


def _trained_vae(
    spec: Spec,
    state: dict,
    data_dim: int,
    image_shape: tuple[int, int, int] | None,
    run_dir: Path,
    target: torch.device,
    num_classes: int | None = None,
) -> VAE:
    """The VAE of ``spec`` with the checkpoint's parameters, on ``target``, in eval mode."""
    vae = VAE.from_spec(spec.model, data_dim, image_shape, num_classes=num_classes)
    try:
        vae.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise UserInputError(
            f"the checkpoint in '{run_dir}' does not fit its {runs.CONFIG}: {one_line(exc, 200)}"
        ) from None
    return vae.to(target).eval()


class LoadedRun(NamedTuple):
    """A run read back for scoring: its spec, the VAE (eval mode), the data, and which checkpoint gave them."""

    spec: Spec
    vae: VAE
    data: Dataset
    checkpoint: Path
    epoch: int


def open_run(run_dir: Path, device: str | None = None, which: str = "best") -> LoadedRun:
    """The spec, trained VAE (eval mode) and data of a finished or interrupted run, with the checkpoint file read
    and the epoch it holds (the epochs completed, or the best epoch for ``best.pt``).

    ``which``: ``best`` reads ``best.pt`` where the run has one (a run with a
    validation split), else the last checkpoint; ``last`` always the last
    (see :func:`pyro_vae.training.runs.checkpoint_path`). The checkpoint is read once,
    so the epoch is that of the parameters returned even while the run trains.
    """
    run_dir = Path(run_dir)
    spec, state, path, target = _checked_state(run_dir, device, which)
    data = load_dataset(spec.data, spec.train.seed).to(target)
    vae = _trained_vae(spec, state, data.data_dim, data.image_shape, run_dir, target, data.num_classes)
    return LoadedRun(spec, vae, data, path, int(state["epoch"]))


def load_run(run_dir: Path, device: str | None = None, which: str = "best") -> tuple[Spec, VAE, Dataset]:
    """The spec, trained VAE (eval mode) and data of a finished or interrupted run (:func:`open_run`)."""
    loaded = open_run(run_dir, device, which)
    return loaded.spec, loaded.vae, loaded.data


def load_model(
    run_dir: Path, device: str | None = None, which: str = "best"
) -> tuple[Spec, VAE, tuple[int, int, int] | None, Path]:
    """The spec, trained VAE (eval mode), image shape and checkpoint path of a run, without its data where it can.

    The model is built from what ``run.json`` recorded at training time
    (:func:`pyro_vae.training.runs.read_model_inputs`); a run without that record loads
    its dataset for it. ``which`` as in :func:`open_run`.
    """
    run_dir = Path(run_dir)
    spec, state, path, target = _checked_state(run_dir, device, which)
    inputs = runs.read_model_inputs(run_dir)
    if inputs is None:
        data = load_dataset(spec.data, spec.train.seed)
        inputs = {"data_dim": data.data_dim, "image_shape": data.image_shape, "num_classes": data.num_classes}
    vae = _trained_vae(
        spec, state, inputs["data_dim"], inputs["image_shape"], run_dir, target, inputs.get("num_classes")
    )
    return spec, vae, inputs["image_shape"], path
