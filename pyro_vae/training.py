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
holds all of it, so a resumed run repeats the interrupted epoch bit for bit.
"""
from __future__ import annotations

import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from pyro_vae import checkpoint, estimators, evaluation, plots, registry, runs
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import NonFiniteError, UserInputError
from pyro_vae.model import VAE, check_likelihood_support
from pyro_vae.spec import Spec

VALIDATED_STEPS = 3
NONFINITE_CHECK_EVERY = 100


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the step reached was written."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.exit_status = 128 + signum


@dataclass
class Progress:
    """Where training stands: completed epochs, the step reached inside the current one."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    metrics: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        try:
            kl_divergence(vae.posterior(x[:2]), vae.prior_distribution())
            return None
        except NotImplementedError:
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
        self.spec, self.run_dir, self.show_progress = spec, run_dir, show_progress
        self.device = torch.device(spec.train.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError("'train.device' is 'cuda' but no CUDA device is available; use cpu")
        self.log = runs.run_logger(run_dir)
        seed_everything(spec.train.seed)
        self.data = (data or load_dataset(spec.data, spec.train.seed)).to(self.device)
        pyro.clear_param_store()
        self.vae = VAE.from_spec(spec.model, self.data.data_dim, self.data.image_shape).to(self.device)
        self.check_data()
        self.elbo = registry.get("estimator", spec.inference.estimator)(spec.inference)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=spec.optim.lr, betas=tuple(spec.optim.betas))
        self.batch_size = min(spec.data.batch_size, self.data.num_train)
        self.steps_per_epoch = math.ceil(self.data.num_train / self.batch_size)
        self.progress = Progress()
        if spec.inference.estimator == "meanfield":
            note = closed_form_note(self.vae, self.data.train)
            if note:
                self.log.info(note)

    def check_data(self) -> None:
        """Shape and support: refuse data the network or the likelihood cannot take."""
        name = self.spec.model.likelihood.type
        sample = self.data.training_batch(torch.arange(min(self.data.num_train, 4096), device=self.device))
        check_likelihood_support(self.vae, sample, name, f"data '{self.spec.data.name}' (binarize: {self.data.binarize})")
        check_likelihood_support(self.vae, self.data.test, name, f"the test split of '{self.spec.data.name}'")

    # -- checkpoints ------------------------------------------------------------
    def state(self) -> dict:
        p = self.progress
        return {"spec": self.spec.to_dict(), "model": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(), "epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                "metrics": p.metrics, "epoch_losses": p.epoch_losses, "epoch_seconds": p.epoch_seconds}

    def save(self) -> None:
        if self.run_dir is None:
            return
        checkpoint.save_atomic(self.state(), self.run_dir / runs.CHECKPOINT)
        runs.write_metrics(self.run_dir, self.progress.metrics)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of this same spec (``train.epochs`` may differ)."""
        saved = Spec.from_dict(state["spec"])
        saved.train.epochs = self.spec.train.epochs
        if saved != self.spec:
            raise UserInputError(f"checkpoint in '{self.run_dir}' was written by a different spec than {runs.CONFIG}")
        try:
            self.vae.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserInputError(f"checkpoint in '{self.run_dir}' does not fit this model: {str(exc).splitlines()[0]}") from None
        pyro.clear_param_store()
        set_rng_state(state["rng"])
        self.progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"], list(state["metrics"]),
                                 list(state["epoch_losses"]), state["epoch_seconds"])

    # -- the loop ---------------------------------------------------------------
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One SVI step; returns the detached loss (−ELBO of the full training set)."""
        self.vae.kl_weight = kl_weight(self.spec, self.progress.global_step, self.steps_per_epoch)
        validate = self.progress.global_step < VALIDATED_STEPS
        with pyro.validation_enabled(validate):
            self.optimizer.zero_grad(set_to_none=True)
            loss = estimators.bound_and_backward(self.elbo, self.vae.model, self.vae.guide, x,
                                                 num_data=self.data.num_train)
            if self.spec.optim.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.spec.optim.clip_norm)
            self.optimizer.step()
        return loss

    def fit(self) -> list[dict]:
        """Train until ``train.epochs`` epochs are complete; returns the metrics."""
        stop: list[int] = []
        with signals_to_flag(stop):
            while self.progress.epoch < self.spec.train.epochs:
                self.train_epoch(stop)
                self.end_epoch()
        return self.progress.metrics

    def train_epoch(self, stop: list[int]) -> None:
        p = self.progress
        order = epoch_order(self.data.num_train, self.spec.train.seed, p.epoch).to(self.device)
        losses = torch.full((self.steps_per_epoch,), float("nan"), device=self.device)
        losses[:p.step_in_epoch] = torch.tensor(p.epoch_losses[:p.step_in_epoch])
        bar = tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {p.epoch + 1}/{self.spec.train.epochs}",
                   disable=not self.show_progress, leave=False, mininterval=0.5, unit="step")
        start = time.perf_counter()
        for step in range(p.step_in_epoch, self.steps_per_epoch):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            losses[step] = self.step(self.data.training_batch(index))
            p.step_in_epoch, p.global_step = step + 1, p.global_step + 1
            if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == self.steps_per_epoch:
                self.check_finite(losses[:step + 1])
                bar.set_postfix_str(f"ELBO {-losses[:step + 1].mean().item() / self.data.num_train:.2f} nats")
            bar.update(1)
            if stop:
                self.check_finite(losses[:step + 1])
                p.epoch_seconds += time.perf_counter() - start
                p.epoch_losses = losses[:step + 1].tolist()
                bar.close()
                self.save()
                self.log.info(f"checkpoint written at epoch {p.epoch + 1}, step {step + 1}; resume with --resume {self.run_dir}")
                raise TrainingInterrupted(stop[0])
        bar.close()
        p.epoch_seconds += time.perf_counter() - start
        p.epoch_losses = losses.tolist()

    def check_finite(self, losses: torch.Tensor) -> None:
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        bad_step = int((~finite).nonzero()[0]) + 1
        raise NonFiniteError(
            f"non-finite loss at epoch {self.progress.epoch + 1}, step {bad_step}: training stopped, the last good "
            f"checkpoint is kept. Usual causes: a learning rate too high (optim.lr={self.spec.optim.lr}), a likelihood "
            f"scale too small (model.likelihood.scale), data outside the expected range; try optim.clip_norm")

    def end_epoch(self) -> None:
        p = self.progress
        row = {"epoch": p.epoch + 1,
               "train_elbo": -float(np.mean(p.epoch_losses)) / self.data.num_train,
               **evaluation.test_elbo(self.vae, self.data.test),
               "seconds": p.epoch_seconds,
               "kl_weight": self.vae.kl_weight}
        p.metrics.append(row)
        p.epoch, p.step_in_epoch, p.epoch_losses, p.epoch_seconds = p.epoch + 1, 0, [], 0.0
        self.log.info(f"epoch {row['epoch']:>3}  train ELBO {row['train_elbo']:9.3f}  test ELBO {row['test_elbo']:9.3f} "
                      f"nats  ({row['seconds']:.1f} s)")
        self.save()

    def write_pictures(self) -> None:
        """samples.png, reconstructions.png, elbo.png and latent.png in the run folder."""
        folder, data = self.run_dir, self.data
        plots.image_grid(self.vae.sample(64), data.image_shape, folder / "samples.png", "E[x | z], z ~ p(z)")
        originals = data.test[:16]
        plots.reconstructions(originals, self.vae.reconstruct(originals), data.image_shape, folder / "reconstructions.png")
        plots.elbo_curves(self.progress.metrics, folder / "elbo.png")
        subset = data.test[:5000]
        labels = data.test_labels[:5000] if data.test_labels is not None else None
        plots.latent_map(self.vae.encode(subset)[0], labels, folder / "latent.png")


def train(spec: Spec, run_dir: Path, force: bool = False, show_progress: bool = True) -> Trainer:
    """A new run: prepare the folder, train, write the pictures."""
    runs.prepare(run_dir, spec, force)
    trainer = Trainer(spec, Path(run_dir), show_progress=show_progress)
    trainer.log.info(f"training {spec.data.name} ({trainer.data.num_train} examples, binarize: {trainer.data.binarize}) "
                     f"with {spec.inference.estimator}, {spec.train.epochs} epochs; run folder {run_dir}")
    trainer.save()
    trainer.fit()
    trainer.write_pictures()
    return trainer


def resume(run_dir: Path, epochs: int | None = None, show_progress: bool = True) -> Trainer:
    """Continue the run in ``run_dir`` from its checkpoint (or from the start if it has none)."""
    run_dir = Path(run_dir)
    spec = runs.read_spec(run_dir)
    if epochs is not None:
        spec.train.epochs = epochs
        runs.write_text_atomic(run_dir / runs.CONFIG, spec.to_yaml())
    trainer = Trainer(spec, run_dir, show_progress=show_progress)
    if (run_dir / runs.CHECKPOINT).exists():
        trainer.restore(checkpoint.load(run_dir / runs.CHECKPOINT))
        p = trainer.progress
        trainer.log.info(f"resuming {run_dir} at epoch {p.epoch + 1}, step {p.step_in_epoch}")
    else:
        trainer.log.info(f"no checkpoint in {run_dir}: starting the run from the beginning with its saved spec")
        trainer.save()
    trainer.fit()
    trainer.write_pictures()
    return trainer


def load_run(run_dir: Path, device: str | None = None) -> tuple[Spec, VAE, Dataset]:
    """The spec, trained VAE (eval mode) and data of a finished or interrupted run."""
    run_dir = Path(run_dir)
    spec = runs.read_spec(run_dir)
    if device is not None:
        spec.train.device = device
    state = checkpoint.load(run_dir / runs.CHECKPOINT)
    data = load_dataset(spec.data, spec.train.seed).to(spec.train.device)
    pyro.clear_param_store()
    vae = VAE.from_spec(spec.model, data.data_dim, data.image_shape)
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserInputError(f"checkpoint in '{run_dir}' does not fit its {runs.CONFIG}: {str(exc).splitlines()[0]}") from None
    return spec, vae.to(spec.train.device).eval(), data
