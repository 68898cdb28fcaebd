"""The cost of Pyro: the project's training step against a hand-written PyTorch step.

Both sides train the identical network (default 784-400-20, ReLU, diagonal
Gaussian guide with softplus scale, Bernoulli likelihood: PyTorch's
examples/vae) on the same batch, in this one process, with the same thread
count (1, then torch's default, unless ``--threads`` says otherwise). Repeats are interleaved (every variant once
per round, in a shuffled order), and each round's time is divided by the same round's plain step, so
machine noise shared by a round cancels (see the README's speed section). Reported: the median
ratio over rounds with min–max.

The plain step is what one writes by hand: encoder → loc, softplus scale →
z = loc + scale·ε → decoder → Bernoulli log-likelihood and KL (closed form for
``meanfield``, sampled log q − log p for the others; log-mean-exp over K
particles for the importance-weighted ones), loss.backward(), Adam. Two plain
references are timed: ``torch.optim.Adam`` as people write it (its default,
a Python loop over parameter tensors on a CPU) and with ``fused=True`` (the
optimizer the project uses), which isolates what Pyro itself costs.

The project's step is ``Trainer.step`` (zero_grad, the estimator's loss and
gradients, the NaN guard's largest-gradient entry, Adam) in three modes:
``eager`` (``inference.compile: false``), ``traced`` (the cached trace,
TorchInductor off) and ``inductor`` (``inference.compile: true``).

Then an epoch: ``Trainer.train_epoch`` over MNIST (60,000 images, dynamic
binarization) against the bare loop (the same permutation, index batches,
Bernoulli draws and plain step, losses kept in a tensor, one ``.tolist()``).

    python benchmarks/overhead.py                         # steps and epochs, 1 thread then the default
    python benchmarks/overhead.py --no-epoch --repeats 21 # steps only
    PYRO_VAE_DATA=../shared/data python benchmarks/overhead.py --epoch-repeats 5
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from machine import cpu_name

from pyro_vae import training
from pyro_vae.config.spec import Spec
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.training import optimizer

ESTIMATORS = ["trace", "meanfield", "tracegraph", "tail-adaptive", "iwae", "renyi", "stl", "dreg"]


def make_spec(args, estimator: str, compile_: str) -> Spec:
    particles = max(args.particles, 2) if estimator == "tail-adaptive" else args.particles
    return Spec.from_dict(
        {
            "data": {"name": "mnist", "batch_size": args.batch, "root": args.data_root},
            "model": {
                "latent_dim": args.latent,
                "encoder": {"type": "mlp", "hidden": args.hidden, "activation": args.activation},
                "decoder": {"type": "mlp", "hidden": args.hidden, "activation": args.activation},
                "prior": {"type": "standard-normal"},
                "guide": {"type": "diagonal-normal"},
                "likelihood": {"type": "bernoulli"},
            },
            "inference": {"estimator": estimator, "num_particles": particles, "compile": compile_},
            "train": {"device": args.device, "seed": 0},
        }
    )


def mnist_or_synthetic(args) -> tuple[Dataset, str]:
    """Real MNIST (dynamic binarization) where a data root has it, else random images of its shape."""
    try:
        spec = make_spec(args, "meanfield", "eager")
        return load_dataset(spec.data, 0), "MNIST (60,000 train images, dynamic binarization)"
    except Exception as exc:  # no files: the step timings do not depend on pixel values
        generator = torch.Generator().manual_seed(0)
        train = torch.rand(60_000, 784, generator=generator)
        test = torch.bernoulli(torch.rand(1_000, 784, generator=generator), generator=generator)
        return (
            Dataset("mnist", train, test, image_shape=(1, 28, 28), binarize="dynamic"),
            f"synthetic 60,000 x 784 intensities (MNIST not found: {str(exc)[:80]})",
        )


# --------------------------------------------------------------------------
# The plain PyTorch step: same modules, hand-written ELBO, no Pyro
# --------------------------------------------------------------------------


class PlainStep:
    """A hand-written VAE step on the same network (its own copy of the parameters)."""

    def __init__(self, trainer: training.Trainer, kl: str, particles: int, fused: bool):
        self.vae = trainer.vae.__class__.from_spec(
            trainer.spec.model, trainer.data.data_dim, trainer.data.image_shape
        ).to(trainer.device)
        self.vae.load_state_dict(trainer.vae.state_dict())
        self.num_data, self.kl, self.particles = trainer.data.num_train, kl, particles
        self.min_scale = trainer.spec.model.guide.min_scale
        options = {"fused": True} if fused else {}
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=1e-3, **options)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vae, B, K = self.vae, x.shape[0], self.particles
        self.optimizer.zero_grad(set_to_none=True)
        h = vae.encoder(x)
        loc = vae.guide_head.loc(h)
        scale = F.softplus(vae.guide_head.raw_scale(h)) + self.min_scale
        eps = torch.randn((K, *loc.shape) if K > 1 else loc.shape, device=x.device)
        z = loc + scale * eps
        logits = vae.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        if self.kl == "analytic":
            kl = (-torch.log(scale) + 0.5 * (scale * scale + loc * loc) - 0.5).sum(-1)
        else:  # log q(z|x) − log p(z), the Gaussian constants cancel
            kl = (-0.5 * eps * eps - torch.log(scale) + 0.5 * z * z).sum(-1)
        log_w = log_lik - kl
        if K > 1:
            log_w = torch.logsumexp(log_w, 0) - math.log(K)
        loss = -(self.num_data / B) * log_w.sum()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def plain_reference(estimator: str) -> str:
    return "analytic" if estimator == "meanfield" else "sampled"


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def project_step(args, data: Dataset, estimator: str, mode: str) -> training.Trainer | None:
    return training.Trainer(make_spec(args, estimator, mode), None, data=data, show_progress=False)


def warm(trainer: training.Trainer, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        trainer.step(x)
        trainer.progress.global_step += 1


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):5.3f} [{min(values):.3f}–{max(values):.3f}]"


def interleaved(
    runners: dict[str, Callable[[int], None]], repeats: int, seed: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds of each runner per round: every runner once per round (round r = 1, 2, …), in a shuffled order."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    rng = random.Random(seed)
    for r in range(1, repeats + 1):
        rng.shuffle(order)
        for name in order:
            start = clock()
            runners[name](r)
            times[name].append(clock() - start)
    return times


def bench_steps(args, data: Dataset) -> None:
    torch.manual_seed(0)
    x = torch.bernoulli(data.train[: args.batch]).to(args.device)
    variants: dict[str, object] = {}
    meta: dict[str, tuple] = {}
    base = project_step(args, data, "meanfield", "eager")
    variants["plain (Adam default)"] = PlainStep(base, "analytic", 1, fused=False)
    variants["plain (Adam fused)"] = PlainStep(base, "analytic", 1, fused=True)
    plains = {}
    for estimator in args.estimators:
        particles = max(args.particles, 2) if estimator == "tail-adaptive" else args.particles
        ref_kl = plain_reference(estimator)
        key = (ref_kl, particles)
        if key not in plains and key != ("analytic", 1):
            plains[key] = (PlainStep(base, ref_kl, particles, False), PlainStep(base, ref_kl, particles, True))
        for mode in args.modes:
            if mode == "inductor" and estimator not in args.inductor_estimators:
                continue
            started = time.perf_counter()
            trainer = project_step(args, data, estimator, mode)
            warm(trainer, x, training.VALIDATED_STEPS + 3)
            got = getattr(trainer.loss_and_grads, "mode", "eager")
            if got != mode:
                print(f"  {estimator} {mode}: runs as {got} ({getattr(trainer.loss_and_grads, 'failed', '')}); skipped")
                continue
            print(f"  ready: {estimator:<13} {mode:<8} ({time.perf_counter() - started:.1f} s to build)", flush=True)
            name = f"{estimator}|{mode}"
            variants[name] = trainer
            meta[name] = (estimator, mode, ref_kl, particles)
    for key, (plain, fused) in plains.items():
        variants[f"plain {key}"] = plain
        variants[f"plain {key} fused"] = fused

    def run(obj):
        if isinstance(obj, training.Trainer):
            for _ in range(args.steps):
                obj.step(x)
        else:
            for _ in range(args.steps):
                obj(x)

    for obj in variants.values():  # warm-up
        run(obj)
    blocks = interleaved(
        {name: (lambda _, o=obj: run(o)) for name, obj in variants.items()}, args.repeats, seed=0, clock=args.clock
    )
    times = {name: [t / args.steps for t in block] for name, block in blocks.items()}

    def plain_times(ref_kl, particles, fused):
        if (ref_kl, particles) == ("analytic", 1):
            return times["plain (Adam fused)" if fused else "plain (Adam default)"]
        return times[f"plain {(ref_kl, particles)}" + (" fused" if fused else "")]

    print()
    print(
        "| estimator | mode | plain reference | plain ms/step | project ms/step | ratio vs plain (Adam default) "
        "| ratio vs plain (Adam fused) |"
    )
    print("| --- | --- | --- | ---: | ---: | --- | --- |")
    for name, (estimator, mode, ref_kl, particles) in meta.items():
        ours = times[name]
        default, fused = plain_times(ref_kl, particles, False), plain_times(ref_kl, particles, True)
        ratio_default = [a / b for a, b in zip(ours, default)]
        ratio_fused = [a / b for a, b in zip(ours, fused)]
        reference = f"{ref_kl} KL" + (f", K={particles}" if particles > 1 else "")
        print(
            f"| {estimator} | {mode} | {reference} | {statistics.median(default) * 1e3:.2f} | "
            f"{statistics.median(ours) * 1e3:.2f} | {stats(ratio_default)} | {stats(ratio_fused)} |"
        )
    print()


def bench_epochs(args, data: Dataset) -> None:
    """``Trainer.train_epoch`` against the bare loop over the same batches."""
    variants: dict[str, object] = {}
    for estimator in args.epoch_estimators:
        for mode in args.epoch_modes:
            trainer = project_step(args, data, estimator, mode)
            torch.manual_seed(0)
            warm(trainer, torch.bernoulli(data.train[: args.batch]), training.VALIDATED_STEPS + 3)
            # the last, smaller batch of an epoch is traced during the warm-up epoch below
            variants[f"{estimator}|{mode}"] = trainer
    base = next(iter(variants.values()))
    plain = PlainStep(base, "analytic", 1, fused=False)
    plain_fused = PlainStep(base, "analytic", 1, fused=True)
    plain_sampled = PlainStep(base, "sampled", 1, fused=False)

    def bare_epoch(step, epoch):
        order = training.epoch_order(data.num_train, 0, epoch).to(args.device)
        steps = math.ceil(data.num_train / args.batch)
        losses = torch.full((steps,), float("nan"), device=args.device)
        for s in range(steps):
            index = order[s * args.batch : (s + 1) * args.batch]
            losses[s] = step(data.training_batch(index))
        return losses.tolist()

    def project_epoch(trainer, epoch):
        p = trainer.progress
        p.epoch, p.step_in_epoch, p.epoch_losses, p.epoch_seconds = epoch, 0, [], 0.0
        trainer.train_epoch([])

    runners = {
        "bare loop (analytic KL, Adam default)": lambda e: bare_epoch(plain, e),
        "bare loop (analytic KL, Adam fused)": lambda e: bare_epoch(plain_fused, e),
        "bare loop (sampled KL, Adam default)": lambda e: bare_epoch(plain_sampled, e),
    }
    for name, trainer in variants.items():
        runners[name] = (lambda t: lambda e: project_epoch(t, e))(trainer)
    for run in runners.values():  # warm-up epoch: builds the last batch's graph too
        run(0)
    times = interleaved(runners, args.epoch_repeats, seed=1, clock=args.clock)
    print(
        f"| epoch of {data.num_train:,} examples, batch {args.batch} | bare loop | seconds (median) "
        f"| ratio vs bare loop (Adam default) | ratio vs bare loop (Adam fused) |"
    )
    print("| --- | --- | ---: | --- | --- |")
    for name in variants:
        estimator, mode = name.split("|")
        ref = "analytic" if estimator == "meanfield" else "sampled"
        default = times[f"bare loop ({ref} KL, Adam default)"]
        fused = times["bare loop (analytic KL, Adam fused)"]
        ours = times[name]
        print(
            f"| {estimator}, {mode} | {ref} KL | {statistics.median(ours):.2f} "
            f"| {stats([a / b for a, b in zip(ours, default)])} | {stats([a / b for a, b in zip(ours, fused)])} |"
        )
    for name in runners:
        if name.startswith("bare"):
            print(f"| {name} | | {statistics.median(times[name]):.2f} | | |")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, torch.get_num_threads()],
        help="torch thread counts, measured one after the other (default: 1 and torch's default)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, nargs="+", default=[400])
    parser.add_argument("--latent", type=int, default=20)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--particles", type=int, default=1, help="inference.num_particles (tail-adaptive: at least 2)")
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS)
    parser.add_argument("--modes", nargs="+", default=["eager", "traced", "inductor"])
    parser.add_argument(
        "--inductor-estimators",
        nargs="+",
        default=["trace", "meanfield"],
        help="estimators also timed compiled with TorchInductor (each compile takes tens of seconds)",
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--no-steps", action="store_true")
    parser.add_argument("--no-epoch", action="store_true")
    parser.add_argument("--epoch-estimators", nargs="+", default=["meanfield", "trace"])
    parser.add_argument("--epoch-modes", nargs="+", default=["eager", "inductor"])
    parser.add_argument("--epoch-repeats", type=int, default=3)
    parser.add_argument("--data-root", default=os.environ.get("PYRO_VAE_DATA"))
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: this thread's CPU time (with --threads 1 on a shared "
        "machine it leaves out the time other processes hold the core)",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu measures the calling thread only; use it with --threads 1")
    clock_name, args.clock = args.clock, (time.thread_time if args.clock == "cpu" else time.perf_counter)
    pyro.set_rng_seed(0)
    np.random.seed(0)
    data, what = mnist_or_synthetic(args)
    data = data.to(args.device)
    print(
        f"hardware: {cpu_name()}, {os.cpu_count()} CPUs visible; device {args.device}; torch threads "
        f"{', then '.join(map(str, args.threads))} (default {torch.get_num_threads()})"
    )
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}")
    print(
        f"network 784-{'-'.join(map(str, args.hidden))}-{args.latent} ({args.activation}), "
        f"batch {args.batch}, data: {what}"
    )
    print(f"fused Adam in the project: {optimizer.adam_options(list(torch.nn.Linear(2, 2).parameters()))}")
    print(
        f"timing: {args.repeats} interleaved rounds of {args.steps} steps, {clock_name} clock; "
        f"ratio = project / plain of the same round; median [min–max]\n",
        flush=True,
    )
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"### {threads} torch thread{'s' if threads > 1 else ''}\n", flush=True)
        if not args.no_steps:
            bench_steps(args, data)
        if not args.no_epoch:
            bench_epochs(args, data)
    torch.set_num_threads(default_threads)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
