"""The SVI loop: minibatches by index, progress, checkpoints, exact resume, NaN guard.

One step on a minibatch of B of the N training examples::

    loss = −ELBO estimate of the whole training set (the plate scales by N/B)
    loss.backward(); Adam step on θ and φ together

The per-example figures reported (``train_elbo``) are −loss / N, averaged over
the epoch's steps. The update rule is Pyro's ``pyro.optim.Adam``: Adam acts on
each parameter element separately, so one ``torch.optim.Adam`` over all the
module parameters gives the same updates as Pyro's one-optimizer-per-parameter
wrapper, with a single fused step instead of one per tensor.

Everything random comes from torch's global generator (initialization,
binarization draws, the guide's ε) except the data order, which is a fresh
permutation per epoch from a generator seeded by (seed, epoch). A checkpoint
holds all of it (the data order through the seed in its spec and its epoch), so
a resumed run repeats the interrupted epoch bit for bit.

Nothing lost:

- a checkpoint is written (atomically, :mod:`pyro_vae.checkpoint`) at the start,
  after every epoch, and at the step reached when SIGINT or SIGTERM arrives;
- every step's loss and largest gradient entry are kept as tensors and checked
  for being finite (every step on the CPU, every ``NONFINITE_CHECK_EVERY`` steps
  and before every checkpoint elsewhere, so no host sync per step on a GPU), as
  are the end-of-epoch test ELBO and, before any checkpoint, the parameters; a
  non-finite value stops training with :class:`NonFiniteError` and no
  checkpoint of the damaged parameters is ever written;
- before a new run touches its folder, the data, the model and one validated
  model/guide pass on two examples are checked, so bad input fails first.
"""
from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import torch

from pyro_vae import (checkpoint, contracts, distributed, estimators, evaluation, optimizer, path_choice, progress,
                      run_state, runs)
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import NonFiniteError, UserInputError, one_line
from pyro_vae.model import VAE, check_likelihood_support
from pyro_vae.rng import seed_everything
from pyro_vae.spec import Spec, check_device_name

VALIDATED_STEPS = 3
NONFINITE_CHECK_EVERY = 100


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
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


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
            f"model.decoder.hidden, model.latent_dim or model.prior.pseudo_inputs")


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


def kl_weight(spec: Spec, global_step: int, steps_per_epoch: int) -> float:
    """β, reached linearly over ``train.kl_warmup_epochs`` epochs."""
    beta, warmup = spec.train.beta, spec.train.kl_warmup_epochs
    if warmup == 0:
        return beta
    return beta * min(1.0, global_step / (warmup * steps_per_epoch))


def closed_form_note(vae: VAE, x: torch.Tensor) -> str | None:
    """With the mean-field estimator: say when KL(q‖p) has no closed form and is sampled."""
    with torch.no_grad():
        if evaluation.closed_form_kl(vae, x[:2]) is not None:
            return None
        q, p = type(vae.posterior(x[:2])).__name__, type(vae.prior_distribution()).__name__
    return (f"meanfield: KL({q} ‖ {p}) has no closed form; that term is estimated by sampling "
            f"log q(z|x) − log p(z) at z ~ q (unbiased, higher variance)")


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
    """Builds data, VAE, estimator and optimizer from a spec and runs SVI into a run folder."""

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
        """torchrun's process group (if any), the device, the log; progress bars on rank 0 only."""
        self.dist, device_name = distributed.setup(self.spec.train.device)
        self.show_progress = show_progress and self.dist.is_main
        self.device = resolve_device(device_name, "'train.device'")
        self.log = runs.run_logger(self.run_dir, self.dist.rank)

    def load_data(self, data: Dataset | None) -> None:
        """The dataset on the device, then every generator seeded.

        Data first: loading draws only from its own generators, but importing a
        loader's library may draw from Python's global one (scikit-learn imports
        rich where it is installed), so the seed comes after it.
        """
        self.data = (data or load_dataset(self.spec.data, self.spec.train.seed)).to(self.device)
        seed_everything(self.spec.train.seed)

    def build_model(self) -> None:
        """The VAE from the spec (the same on every rank), checked against free memory and the data's support."""
        pyro.clear_param_store()  # the one place: a new VAE's parameters replace any earlier ones there
        self.vae = VAE.from_spec(self.spec.model, self.data.data_dim, self.data.image_shape,
                                 self.data.train).to(self.device)
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
        self.note = closed_form_note(self.vae, self.data.train) if spec.inference.estimator == "meanfield" else None

    def training_step(self, setting: bool | str, chosen: str | None = None) -> Callable:
        """The step of ``inference.compile`` = ``setting``; ``chosen``: the path ``auto`` took before a resume."""
        batch = (min(self.spec.data.batch_size, self.data.num_train), self.data.data_dim)
        return path_choice.build_step(self.elbo, self.vae, setting, self.log,
                                      steps_left=lambda: self.horizon - self.progress.global_step,
                                      key=path_choice.step_key(self.spec, batch, self.device), chosen=chosen)

    def prepare_loop(self) -> None:
        """Batch size, steps per epoch, how often to check for non-finite values, and the progress."""
        self.batch_size = min(self.spec.data.batch_size, self.data.num_train)
        self.steps_per_epoch = math.ceil(self.data.num_train / self.batch_size)
        self.check_every = 1 if self.device.type == "cpu" else NONFINITE_CHECK_EVERY
        self.progress = run_state.Progress()
        self.horizon = self.spec.train.epochs * self.steps_per_epoch  # the global step the current loop ends at
        self.board = None  # the TensorBoard writer, opened at the first epoch's end
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its data order), see minibatch

    def check_data(self) -> None:
        """Support: refuse data the likelihood cannot take (all of it; dynamic draws are 0/1 anyway)."""
        name = self.spec.model.likelihood.type
        train = self.data.train
        if self.data.binarize == "dynamic":
            train = self.data.training_batch(torch.arange(min(self.data.num_train, 4096), device=self.device))
        check_likelihood_support(self.vae, train, name, f"data '{self.spec.data.name}' (binarize: {self.data.binarize})")
        check_likelihood_support(self.vae, self.data.test, name, f"the test split of '{self.spec.data.name}'")

    def dry_run(self) -> None:
        """One validated model/guide pass on two examples, the generators left untouched.

        Data the network cannot take, or a spec whose distributions are invalid
        from the start, fail here with one line, before a run folder is written.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), pyro.validation_enabled(True):
                x = self.data.training_batch(torch.arange(min(2, self.data.num_train), device=self.device))
                estimators.bound(self.elbo, self.vae.model, self.vae.guide, x, num_data=self.data.num_train)
        except (RuntimeError, ValueError) as exc:
            if is_out_of_memory(exc):
                raise
            shape = f"examples of {self.data.data_dim} values" + (
                f" (images {self.data.image_shape})" if self.data.image_shape else "")
            raise UserInputError(f"the spec and data '{self.spec.data.name}' ({shape}) fail a first model/guide pass: "
                                 f"{one_line(exc, 300)}") from None

    # -- checkpoints ------------------------------------------------------------
    def attach(self, run_dir: Path) -> None:
        """From now on, checkpoint and log into ``run_dir`` (a folder that ``runs.prepare`` made)."""
        self.run_dir = Path(run_dir)
        self.log = runs.run_logger(self.run_dir, self.dist.rank)

    def state(self) -> dict:
        """Everything a resumed run needs (:func:`pyro_vae.run_state.snapshot`)."""
        return run_state.snapshot(self.spec, self.vae, self.optimizer, self.scheduler, self.progress,
                                  getattr(self.loss_and_grads, "path", None))

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
        self.progress, step_path = run_state.restore(state, self.spec, self.vae, self.optimizer, self.scheduler,
                                                     self.run_dir)
        if step_path is not None:  # auto chose it: the rest of the run takes it too
            self.loss_and_grads = self.training_step(self.spec.inference.compile, chosen=step_path)
        self.dist.seed(self.spec.train.seed, self.progress.global_step)

    # -- the loop ---------------------------------------------------------------
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SVI step; returns the detached loss (−ELBO of the full training set) and max |gradient|.

        Pyro's validation is on for the first ``VALIDATED_STEPS`` steps; an invalid
        distribution there (parameters already damaged) stops training like a NaN.
        """
        beta = kl_weight(self.spec, self.progress.global_step, self.steps_per_epoch)
        validate = self.progress.global_step < VALIDATED_STEPS
        with pyro.validation_enabled(validate):
            self.optimizer.zero_grad(set_to_none=True)
            try:
                loss = self.loss_and_grads(x, self.data.num_train, beta)  # pyro_vae.path_choice: eager, traced or compiled
            except ValueError as exc:
                if not validate:
                    raise
                raise self.nonfinite("invalid distribution parameters", self.progress.step_in_epoch + 1,
                                     one_line(exc, 200)) from None
            if self.dist.enabled:  # data-parallel: Σ_r (B_r/B) · (gradients, loss), one all-reduce
                loss = self.dist.all_reduce(list(self.vae.parameters()), loss)
            grads = [p.grad for p in self.vae.parameters() if p.grad is not None]
            # max |g| as max(max g, −min g): one pass per tensor, no |g| copy (≈0.5 ms/step less at 784-400-20)
            extremes = [torch.aminmax(g.detach()) for g in grads]
            largest = torch.stack([e for m in extremes for e in (m.max, -m.min)]).amax() if grads else loss.new_zeros(())
            if self.spec.optim.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.spec.optim.clip_norm)
            try:
                self.optimizer.step()
            except RuntimeError as exc:  # lr / (1 − β₁ᵗ) beyond float32: "cannot be converted ... without overflow"
                if "overflow" not in str(exc):
                    raise
                raise self.nonfinite("non-finite Adam update", self.progress.step_in_epoch + 1,
                                     "the step size overflows float32") from None
        return loss, largest

    def fit(self) -> list[dict]:
        """Train until ``train.epochs`` epochs are complete; returns the metrics."""
        if self.note:
            self.log.info(self.note)
        stop: list[int] = []
        self.horizon = self.spec.train.epochs * self.steps_per_epoch
        with signals_to_flag(self.dist.signal_list(stop)):  # data-parallel: all ranks stop at one step
            while self.progress.epoch < self.spec.train.epochs and not self.progress.stopped_early:
                self.train_epoch(stop)
                self.end_epoch()
        return self.progress.metrics

    def minibatch(self, epoch: int, position: int) -> torch.Tensor:
        """The training batch of step ``position`` of ``epoch``: this rank's slice of it, binarized afresh."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.data.num_train, self.spec.train.seed, epoch).to(self.device))
        index = self._order[1][position * self.batch_size:(position + 1) * self.batch_size]
        return self.data.training_batch(self.dist.shard(index))

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
            loss, largest = self.step(self.minibatch(p.epoch, p.step_in_epoch))
            p.step_in_epoch, p.global_step = p.step_in_epoch + 1, p.global_step + 1
            self.check_finite(loss.reshape(1), largest.reshape(1), first_step=p.step_in_epoch)
            if on_step is not None:
                on_step(p.global_step)

    def train_epoch(self, stop: list[int]) -> None:
        p = self.progress
        losses = torch.full((self.steps_per_epoch,), float("nan"), device=self.device)
        losses[:p.step_in_epoch] = torch.tensor(p.epoch_losses[:p.step_in_epoch])
        gradients = torch.zeros(self.steps_per_epoch, device=self.device)  # max |gradient| per step
        bar = progress.bar(self.steps_per_epoch, f"epoch {p.epoch + 1}/{self.spec.train.epochs}", "step",
                           quiet=not self.show_progress, initial=p.step_in_epoch, every=30.0)
        start = time.perf_counter()
        checked = p.step_in_epoch  # steps before it are known to be finite
        for step in range(p.step_in_epoch, self.steps_per_epoch):
            losses[step], gradients[step] = self.step(self.minibatch(p.epoch, step))
            p.step_in_epoch, p.global_step = step + 1, p.global_step + 1
            if (step + 1) % self.check_every == 0 or step + 1 == self.steps_per_epoch:
                self.check_finite(losses[checked:step + 1], gradients[checked:step + 1], first_step=checked + 1)
                checked = step + 1
            if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == self.steps_per_epoch:
                bar.set_postfix_str(f"ELBO {-losses[:step + 1].mean().item() / self.data.num_train:.2f} nats")
            bar.update(1)
            if stop:
                self.check_finite(losses[checked:step + 1], gradients[checked:step + 1], first_step=checked + 1)
                p.epoch_seconds += time.perf_counter() - start
                p.epoch_losses = losses[:step + 1].tolist()
                bar.close()
                self.save()
                self.log.info(f"checkpoint written at epoch {p.epoch + 1}, step {step + 1}; resume with --resume {self.run_dir}")
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
            f"scale too small (model.likelihood.scale), data outside the expected range; try optim.clip_norm")

    def end_epoch(self) -> None:
        """Evaluate, log and checkpoint the epoch just completed; keep the best; step the schedule; stop early."""
        p = self.progress
        with pyro.validation_enabled(False):  # damaged parameters give NaN here, not a ValueError
            draws = self.spec.train.eval_num_samples
            test = evaluation.test_elbo(self.vae, self.data.test, num_samples=draws)
            validation = (None if self.data.validation is None
                          else evaluation.test_elbo(self.vae, self.data.validation, num_samples=draws)["test_elbo"])
        if not all(math.isfinite(value) for value in [*test.values(), *([validation] if validation is not None else [])]):
            raise self.nonfinite("non-finite test or validation ELBO", p.step_in_epoch)
        row = {"epoch": p.epoch + 1,
               "train_elbo": -float(np.mean(p.epoch_losses)) / self.data.num_train,
               **({"validation_elbo": validation} if validation is not None else {}),
               **test,
               "seconds": p.epoch_seconds,
               "kl_weight": kl_weight(self.spec, p.global_step - 1, self.steps_per_epoch),  # the epoch's last β
               "lr": optimizer.current_lr(self.optimizer)}
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
        where = f"  validation ELBO {validation:9.3f}" + (" (best)" if improved else "") if validation is not None else ""
        self.log.info(f"epoch {row['epoch']:>3}  train ELBO {row['train_elbo']:9.3f}{where}  test ELBO "
                      f"{row['test_elbo']:9.3f} nats  ({row['seconds']:.1f} s)")
        if p.stopped_early:
            self.log.info(f"early stopping: no better validation ELBO for {patience} epochs; the best is epoch "
                          f"{p.best_epoch} ({p.best_validation:.3f} nats), kept in {runs.BEST}")
        self.save()

    def write_board(self, row: dict) -> None:
        """With ``train.tensorboard``: the epoch's scalars and pictures in ``RUN/tensorboard`` (:mod:`pyro_vae.board`)."""
        if not self.spec.train.tensorboard or self.run_dir is None or not self.dist.is_main:
            return
        from pyro_vae import board

        if self.board is None:
            self.board = board.EpochWriter(self.run_dir, self.spec.train.seed)
        self.board.write(row, self.vae, self.data)

    def save_best(self) -> None:
        """``best.pt``: the parameters of the epoch with the highest validation ELBO, written atomically."""
        if self.run_dir is None or not self.dist.is_main:
            return
        self.check_parameters()
        p = self.progress
        checkpoint.save_atomic({"spec": self.spec.to_dict(), "model": self.vae.state_dict(), "epoch": p.best_epoch,
                                "validation_elbo": p.best_validation}, self.run_dir / runs.BEST)

    def write_pictures(self) -> None:
        """samples.png, reconstructions.png, elbo.png and latent.png (two or more test examples) in the run folder."""
        if not self.dist.is_main:
            return
        from pyro_vae import plots  # matplotlib and torchvision: ~3 s of imports that bad input should not pay

        folder, data = self.run_dir, self.data
        with progress.bar(4, "pictures", "picture", quiet=not self.show_progress) as bar:
            plots.image_grid(self.vae.sample(64), data.image_shape, folder / "samples.png", "E[x | z], z ~ p(z)")
            bar.update(1)
            originals = data.test[:16]
            plots.reconstructions(originals, self.vae.reconstruct(originals), data.image_shape,
                                  folder / "reconstructions.png")
            bar.update(1)
            plots.elbo_curves(self.progress.metrics, folder / "elbo.png")
            bar.update(1)
            subset = data.test[:5000]
            if subset.shape[0] < 2:  # a map of one point says nothing (and PCA needs two)
                return
            labels = data.test_labels[:5000] if data.test_labels is not None else None
            plots.latent_map(self.vae.encode(subset)[0], labels, folder / "latent.png")
            bar.update(1)


def train(spec: Spec, run_dir: Path, force: bool = False, show_progress: bool = True) -> Trainer:
    """A new run: check every input, then prepare the folder, train, write the pictures.

    The folder, the data, the model and a first model/guide pass are checked
    before anything is written, so bad input leaves an existing folder as it was.
    """
    run_dir = Path(run_dir)
    if spec.train.tensorboard:
        from pyro_vae import board

        board.check_available()
    if distributed.is_main():  # under torchrun, rank 0 alone checks and writes the folder
        runs.check_new_run(run_dir, spec, force)
    trainer = Trainer(spec, None, show_progress=show_progress)
    if trainer.dist.is_main:
        runs.prepare(run_dir, spec, force)
    trainer.attach(run_dir)
    if trainer.dist.enabled:
        trainer.log.info(trainer.dist.describe(trainer.batch_size, trainer.device))
    trainer.log.info(f"training {spec.data.name} ({trainer.data.num_train} examples, binarize: {trainer.data.binarize}) "
                     f"with {spec.inference.estimator}, {plural(spec.train.epochs, 'epoch')}; run folder {run_dir}")
    trainer.save()
    trainer.fit()
    trainer.write_pictures()
    return trainer


def resume(run_dir: Path, epochs: int | None = None, show_progress: bool = True) -> Trainer:
    """Continue the run in ``run_dir`` from its checkpoint (or from the start if it has none).

    The checkpoint is read and checked against the run's spec before anything
    in the folder changes; ``epochs`` (``--epochs``) replaces ``train.epochs``.
    """
    run_dir = Path(run_dir)
    spec = runs.read_spec(run_dir)
    if spec.train.tensorboard:
        from pyro_vae import board

        board.check_available()
    path = run_dir / runs.CHECKPOINT
    state = checkpoint.load(path, required=run_state.STATE_KEYS) if path.exists() else None
    if epochs is not None:
        done = int(state["epoch"]) if state is not None else 0
        if epochs < done:
            raise UserInputError(f"--epochs {epochs} is the total number of epochs, and '{run_dir}' has already "
                                 f"trained {plural(done, 'epoch')}; give --epochs above {done} to train further "
                                 f"(nothing was changed)")
        spec.train.epochs = epochs
    trainer = Trainer(spec, None, show_progress=show_progress)
    trainer.attach(run_dir)
    if state is not None:
        trainer.restore(state)
    if epochs is not None and trainer.dist.is_main:
        runs.write_text_atomic(run_dir / runs.CONFIG, spec.to_yaml())
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


def load_run(run_dir: Path, device: str | None = None, which: str = "best") -> tuple[Spec, VAE, Dataset]:
    """The spec, trained VAE (eval mode) and data of a finished or interrupted run.

    ``which``: ``best`` reads ``best.pt`` where the run has one (a run with a
    validation split), else the last checkpoint; ``last`` always the last
    (see :func:`pyro_vae.runs.checkpoint_path`).
    """
    run_dir = Path(run_dir)
    spec = runs.read_spec(run_dir)
    state = checkpoint.load(runs.checkpoint_path(run_dir, which), required=("spec", "model"))
    run_state.check_same_spec(state, spec, run_dir)
    if device is not None:
        spec.train.device = device
    target = resolve_device(spec.train.device, "--device" if device is not None else "'train.device'")
    data = load_dataset(spec.data, spec.train.seed).to(target)
    vae = VAE.from_spec(spec.model, data.data_dim, data.image_shape)
    try:
        vae.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise UserInputError(f"the checkpoint in '{run_dir}' does not fit its {runs.CONFIG}: "
                             f"{one_line(exc, 200)}") from None
    return spec, vae.to(target).eval(), data
