"""Each likelihood's distribution, mean and support, the continuous Bernoulli's data-mean logits, and the builders."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits

from pyro_vae.config.spec import load_spec
from pyro_vae.model import VAE
from pyro_vae.parts import likelihoods
from pyro_vae.parts.distributions import BernoulliImage

OUT = torch.tensor([[-2.0, 0.0, 0.5, 3.0], [1.0, -1.0, 2.0, -0.5]])


def test_the_bernoulli_likelihood_takes_logits():
    likelihood = likelihoods.Bernoulli()
    p = likelihood(OUT)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert isinstance(p, BernoulliImage) and p.event_shape == (4,) and p.batch_shape == (2,)
    assert torch.allclose(p.log_prob(x), -binary_cross_entropy_with_logits(OUT, x, reduction="none").sum(-1))
    assert torch.equal(likelihood.mean(OUT), torch.sigmoid(OUT))
    assert likelihood.holds(x) and likelihood.holds(torch.ones(3))
    for other in ([0.0, 0.5], [1.0, 2.0], [-1.0, 0.0]):
        assert not likelihood.holds(torch.tensor(other)), other


def test_the_continuous_bernoulli_is_torchs_on_the_unit_interval():
    likelihood = likelihoods.ContinuousBernoulli()
    p = likelihood(OUT)
    x = torch.tensor([[0.1, 0.9, 0.5, 0.0], [1.0, 0.3, 0.7, 0.2]])
    assert p.event_shape == (4,) and p.batch_shape == (2,)
    want = torch.distributions.ContinuousBernoulli(logits=OUT).log_prob(x).sum(-1)
    assert torch.allclose(p.log_prob(x), want)
    assert torch.allclose(likelihood.mean(OUT), torch.distributions.ContinuousBernoulli(logits=OUT).mean)
    assert likelihood.holds(torch.tensor([0.0, 0.5, 1.0]))
    assert not likelihood.holds(torch.tensor([0.0, 1.1])) and not likelihood.holds(torch.tensor([-0.1, 0.5]))


def test_the_continuous_bernoulli_data_mean_logits_give_that_mean():
    """Bisection on the logit: E[x] under CB(σ(l)) equals the data mean, ends of reach clamped, dtype kept."""
    target = torch.tensor([0.1, 0.3, 0.5, 0.62, 0.9])
    logits = likelihoods.ContinuousBernoulli().output_for_mean(target)
    assert logits.dtype == torch.float32 and logits.shape == target.shape
    mean = dist.ContinuousBernoulli(logits=logits.double()).mean
    assert torch.allclose(mean, target.double(), atol=1e-6)
    assert abs(logits[2].item()) < 1e-6
    ends = likelihoods.ContinuousBernoulli().output_for_mean(torch.tensor([0.0, 0.01, 0.99, 1.0]))
    limit = torch.logit(torch.tensor(1 - torch.finfo(torch.float32).eps, dtype=torch.float64)).item()
    assert torch.allclose(ends.double(), torch.tensor([-limit, -limit, limit, limit], dtype=torch.float64), rtol=1e-6)
    ends = likelihoods.ContinuousBernoulli().output_for_mean(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.dtype == torch.float64
    assert torch.allclose(ends, torch.tensor([-limit, limit], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", [dist.Normal, dist.Laplace])
def test_a_location_scale_likelihood_centres_on_the_output(family):
    likelihood = likelihoods.LocationScale(family, 4, 0.3, 1e-3)
    p = likelihood(OUT)
    x = OUT + 0.1
    assert p.event_shape == (4,) and p.batch_shape == (2,)
    assert torch.allclose(p.log_prob(x), family(OUT, 0.3).log_prob(x).sum(-1))
    assert torch.equal(likelihood.mean(OUT), OUT)
    assert likelihood.holds(OUT)
    assert not likelihood.holds(torch.tensor([0.0, float("inf")])) and not likelihood.holds(
        torch.tensor([float("nan")])
    )


def test_the_data_mean_output_of_a_location_scale_likelihood_is_a_copy_of_the_mean():
    mean = torch.tensor([0.2, 0.4])
    out = likelihoods.LocationScale(dist.Normal, 2, 1.0, 1e-3).output_for_mean(mean)
    assert torch.equal(out, mean)
    out.add_(1.0)
    assert torch.equal(mean, torch.tensor([0.2, 0.4]))


@pytest.mark.parametrize(
    "overrides, kind, family, scale",
    [
        ([], likelihoods.Bernoulli, None, None),
        (["model.likelihood.type=continuous-bernoulli"], likelihoods.ContinuousBernoulli, None, None),
        (["model.likelihood.type=gaussian", "model.likelihood.scale=0.3"], likelihoods.LocationScale, dist.Normal, 0.3),
        (
            ["model.likelihood.type=laplace", "model.likelihood.scale=learned", "model.likelihood.min_scale=0.2"],
            likelihoods.LocationScale,
            dist.Laplace,
            0.2 + 0.6931472,
        ),
    ],
)
def test_the_spec_builds_the_likelihood_it_names(overrides, kind, family, scale):
    spec = load_spec(None, ["model.latent_dim=2", "model.encoder.hidden=[4]", "model.decoder.hidden=[4]", *overrides])
    likelihood = VAE.from_spec(spec.model, 5).likelihood
    assert type(likelihood) is kind
    if family is not None:
        assert likelihood.family is family
        assert torch.allclose(likelihood.scale(), torch.tensor(scale)) and likelihood.scale().numel() in (1, 5)
        assert likelihood.scale().numel() == (5 if "model.likelihood.scale=learned" in overrides else 1)
