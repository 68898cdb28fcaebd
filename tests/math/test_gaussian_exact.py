"""The linear-Gaussian reference model against Gaussian conditioning done independently; the KL helper's refusals."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.infer.gaussian import LinearGaussian

pytestmark = pytest.mark.usefixtures("float64")


def test_posterior_is_the_conditional_of_the_joint_gaussian():
    """(z, x) is jointly N(0 ⊕ b, [[I, Wᵀ], [W, W Wᵀ + σ² I]]): p(z|x) = N(Wᵀ C⁻¹ (x − b), I − Wᵀ C⁻¹ W)."""
    model = LinearGaussian.random(5, 3, noise=0.3, generator=torch.Generator().manual_seed(0))
    x = model.sample(4, generator=torch.Generator().manual_seed(1))
    c = model.weight @ model.weight.T + 0.3**2 * torch.eye(5)
    gain = model.weight.T @ torch.linalg.inv(c)
    assert torch.allclose(model.posterior_covariance(), torch.eye(3) - gain @ model.weight)
    assert torch.allclose(model.posterior_mean(x), (x - model.bias) @ gain.T)


def test_random_draws_weights_of_variance_one_over_d_from_the_generator():
    model = LinearGaussian.random(6, 4, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    assert model.noise == 0.5
    assert torch.equal(model.weight, torch.randn(6, 4, generator=generator) / 2.0)
    assert torch.equal(model.bias, torch.randn(6, generator=generator))


def test_the_pyro_program_has_one_data_plate_and_vector_sites():
    model = LinearGaussian.random(5, 3, generator=torch.Generator().manual_seed(0))
    x = model.sample(4)
    trace = pyro.poutine.trace(model.model).get_trace(x)
    assert [name for name in trace.nodes if trace.nodes[name]["type"] == "sample"] == ["data", "z", "x"]
    assert trace.nodes["z"]["fn"].event_shape == (3,) and trace.nodes["x"]["fn"].event_shape == (5,)


def test_closed_form_kl_refuses_a_prior_it_has_no_formula_for():
    q = dist.MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(NotImplementedError, match=r"^closed-form KL needs p = Independent\(Normal, 1\)$"):
        torch.distributions.kl_divergence(q, dist.Laplace(torch.zeros(2), 1.0).to_event(1))
    with pytest.raises(NotImplementedError, match=r"^closed-form KL needs p = Independent\(Normal, 1\)$"):
        torch.distributions.kl_divergence(q, dist.Normal(torch.zeros(3, 2), 1.0).to_event(2))
    with pytest.raises(ValueError, match=r"^event shapes differ: q \(2,\), p \(3,\)$"):
        torch.distributions.kl_divergence(q, dist.Normal(torch.zeros(3), 1.0).to_event(1))


def test_sample_is_w_z_plus_b_plus_sigma_eps_from_the_generator():
    model = LinearGaussian.random(5, 3, generator=torch.Generator().manual_seed(0))
    x = model.sample(4, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    z, eps = torch.randn(4, 3, generator=generator), torch.randn(4, 5, generator=generator)
    assert torch.allclose(x, z @ model.weight.T + model.bias + 0.5 * eps)
