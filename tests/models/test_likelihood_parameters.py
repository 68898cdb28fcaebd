"""A likelihood's learned scale and the Bernoulli's data-mean logits, against their formulas."""

import math

import pyro.distributions as dist
import torch

from pyro_vae.parts.likelihoods import MEAN_CLAMP, Bernoulli, LocationScale


def test_a_learned_scale_is_softplus_of_a_parameter_plus_the_floor():
    likelihood = LocationScale(dist.Normal, 3, "learned", 0.1)
    assert [name for name, _ in likelihood.named_parameters()] == ["raw_scale"]
    assert torch.allclose(likelihood.scale(), torch.full((3,), math.log(2.0) + 0.1))
    with torch.no_grad():
        likelihood.raw_scale.fill_(2.0)
    assert torch.allclose(
        likelihood.forward(torch.zeros(3)).base_dist.scale, torch.full((3,), math.log1p(math.e**2) + 0.1)
    )


def test_a_fixed_scale_is_a_buffer():
    likelihood = LocationScale(dist.Laplace, 3, 0.5, 0.1)
    assert list(likelihood.parameters()) == []
    assert float(likelihood.scale()) == 0.5


def test_bernoulli_data_mean_logits_are_clamped_inside_the_unit_interval():
    mean = torch.tensor([0.0, 0.25, 1.0])
    logits = Bernoulli().output_for_mean(mean)
    clamped = torch.tensor([MEAN_CLAMP, 0.25, 1 - MEAN_CLAMP])
    assert torch.allclose(logits, torch.log(clamped / (1 - clamped)))
