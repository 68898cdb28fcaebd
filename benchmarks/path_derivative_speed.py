"""The time of one STL and one DReG step (loss and backward) with the IAF guide.

The model is the ``mnist-iaf`` network (784-200-200-50, tanh, two IAF flows with
a MADE of 200 hidden units) on a fixed batch of random binary images, unless
the flags say otherwise. Each estimator is timed ``--repeats`` times after
``--warmup`` untimed steps, with one thread (``--threads``); printed: min and
median seconds per step. Compare two versions of the package by running the
script with each on ``PYTHONPATH``::

    python benchmarks/path_derivative_speed.py
    python benchmarks/path_derivative_speed.py --latent-dim 8 --particles 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from pyro_vae.config.spec import load_spec
from pyro_vae.infer.estimators import STL_ELBO, DReG_ELBO, bound_and_backward
from pyro_vae.model import VAE

ESTIMATORS = {"stl": STL_ELBO, "dreg": DReG_ELBO}


def build(latent_dim: int, hidden: int, flows: int, data_dim: int) -> VAE:
    spec = load_spec(
        None,
        [
            f"model.latent_dim={latent_dim}",
            f"model.encoder.hidden=[{hidden},{hidden}]",
            f"model.decoder.hidden=[{hidden},{hidden}]",
            "model.encoder.activation=tanh",
            "model.decoder.activation=tanh",
            "model.guide.type=iaf",
            f"model.guide.flows={flows}",
            f"model.guide.hidden=[{hidden}]",
        ],
    )
    return VAE.from_spec(spec.model, data_dim)


def step_times(vae: VAE, elbo, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds of each timed ``bound_and_backward`` call."""
    times = []
    for i in range(warmup + repeats):
        vae.zero_grad(set_to_none=True)
        start = time.perf_counter()
        bound_and_backward(elbo, vae.model, vae.guide, x, num_data=60000)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--flows", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--particles", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    vae = build(args.latent_dim, args.hidden, args.flows, 784)
    x = torch.bernoulli(torch.full((args.batch, 784), 0.13), generator=torch.Generator().manual_seed(1))
    for name, estimator in ESTIMATORS.items():
        times = step_times(vae, estimator(num_particles=args.particles), x, args.warmup, args.repeats)
        print(f"{name}: min {min(times):.4f} s, median {statistics.median(times):.4f} s ({args.repeats} steps)")


if __name__ == "__main__":
    main()
