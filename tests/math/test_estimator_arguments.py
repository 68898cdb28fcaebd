"""The estimators' constructor defaults, the plate nesting they pass on, and the messages of what they refuse."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.infer.estimators import (
    CIWAE_ELBO,
    IWAE_ELBO,
    MIWAE_ELBO,
    PIWAE_ELBO,
    Renyi_ELBO,
    TailAdaptive_ELBO,
    guide_kl_weight,
)

ESTIMATORS = [Renyi_ELBO, IWAE_ELBO, TailAdaptive_ELBO, MIWAE_ELBO, CIWAE_ELBO, PIWAE_ELBO]


def test_defaults():
    assert (Renyi_ELBO().alpha, Renyi_ELBO().num_particles) == (0.0, 1)
    assert (IWAE_ELBO().alpha, IWAE_ELBO().num_particles) == (0.0, 1)
    assert (TailAdaptive_ELBO().num_particles, TailAdaptive_ELBO().tail_adaptive_beta) == (2, -1.0)
    miwae = MIWAE_ELBO()
    assert (miwae.outer_particles, miwae.inner_particles, miwae.num_particles) == (1, 1, 1)
    assert (CIWAE_ELBO().num_particles, CIWAE_ELBO().ciwae_beta) == (1, 0.5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_plate_nesting_and_vectorized_particles_reach_pyro(estimator):
    elbo = estimator(num_particles=2, max_plate_nesting=2)
    assert elbo.max_plate_nesting == 3  # Pyro counts the vectorized particle plate too
    assert elbo.particle_dim == -3
    assert elbo.vectorize_particles is True


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Renyi_ELBO(alpha=1.0), "alpha = 1 is the ELBO; use Trace_ELBO"),
        (lambda: TailAdaptive_ELBO(num_particles=1), "the tail-adaptive gradient needs num_particles >= 2"),
        (lambda: TailAdaptive_ELBO(tail_adaptive_beta=0.5), r"tail_adaptive_beta must be <= 0 \(the largest"),
        (lambda: CIWAE_ELBO(ciwae_beta=1.5), r"ciwae_beta must be in \[0, 1\]"),
    ],
)
def test_refusals_say_what_is_accepted(build, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        build()


def test_a_renyi_spec_with_alpha_one_is_refused_by_name():
    with pytest.raises(UserInputError, match=r"^'inference.alpha' is 1.0; the Rényi bound needs alpha != 1"):
        load_spec(None, ["inference.estimator=renyi", "inference.alpha=1.0"])
    assert load_spec(None, ["inference.estimator=renyi", "inference.alpha=2.0"]).inference.options.alpha == 2.0


def test_a_guide_site_without_rsample_is_refused_by_name():
    def model():
        with pyro.plate("data", 3, dim=-1):
            pyro.sample("c", dist.Bernoulli(0.5))

    def guide():
        with pyro.plate("data", 3, dim=-1):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(UserInputError, match="^IWAE_ELBO needs reparameterized latent sites; site 'c' \\(Bernoulli\\)"):
        IWAE_ELBO(num_particles=2).differentiable_loss(model, guide)


def test_guide_kl_weight_refuses_two_sites_with_tensor_weights():
    def guide():
        with pyro.plate("data", 3, dim=-1), pyro.poutine.scale(scale=torch.tensor(0.5)):
            pyro.sample("a", dist.Normal(0.0, 1.0))
            pyro.sample("b", dist.Normal(0.0, 1.0))

    trace = pyro.poutine.trace(guide).get_trace()
    with pytest.raises(NotImplementedError, match="^DReG needs one KL weight for all guide sites"):
        guide_kl_weight(trace, 1.0)
