"""The priors: their densities against plain formulas, their starting values, and how the spec builds them."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal
from torch.nn.functional import softplus

from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.model import VAE
from pyro_vae.parts import guides, priors

D = 3


def standard_log_prob(z: torch.Tensor) -> torch.Tensor:
    return Normal(0.0, 1.0).log_prob(z).sum(-1)


def mixture_log_prob(z: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log Σ_k softmax(logits)_k N(z; loc_k, diag scale_k²), z (n, d), loc and scale (K, d)."""
    per_component = Normal(loc, scale).log_prob(z[:, None, :]).sum(-1)
    return torch.logsumexp(per_component + torch.log_softmax(logits, -1), -1)


def test_the_standard_normal_is_n_0_i_kept_in_buffers():
    prior = priors.StandardNormal(D)
    p = prior()
    z = torch.randn(7, D, generator=torch.Generator().manual_seed(0))
    assert p.event_shape == (D,) and p.batch_shape == ()
    assert torch.allclose(p.log_prob(z), standard_log_prob(z))
    assert set(prior.state_dict()) == {"loc", "scale"} and not list(prior.parameters())


def test_the_learned_normal_starts_at_n_0_i_and_follows_its_parameters():
    prior = priors.LearnedNormal(D)
    z = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(prior().log_prob(z), standard_log_prob(z), atol=1e-4)
    assert {name for name, _ in prior.named_parameters()} == {"loc", "raw_scale"}
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        prior.raw_scale.copy_(torch.tensor([-1.0, 0.0, 1.5]))
    want = Normal(prior.loc, softplus(prior.raw_scale)).log_prob(z).sum(-1)
    assert torch.allclose(prior().log_prob(z), want)


def test_the_mixture_starts_near_n_0_i_with_equal_weights():
    torch.manual_seed(2)
    prior = priors.MixtureOfGaussians(D, 400)
    assert prior.logits.shape == (400,) and torch.equal(prior.logits, torch.zeros(400))
    assert prior.loc.shape == (400, D) and prior.raw_scale.shape == (400, D)
    assert abs(prior.loc.std().item() - 0.1) < 0.01 and abs(prior.loc.mean().item()) < 0.01
    assert torch.allclose(softplus(prior.raw_scale), torch.ones(400, D), atol=1e-4)


def test_the_mixture_density_is_the_weighted_sum_of_its_components():
    torch.manual_seed(3)
    prior = priors.MixtureOfGaussians(D, 4)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        prior.loc.copy_(torch.randn(4, D))
        prior.raw_scale.copy_(torch.randn(4, D))
    z = torch.randn(9, D)
    with torch.no_grad():
        want = mixture_log_prob(z, prior.logits, prior.loc, softplus(prior.raw_scale))
        assert torch.allclose(prior().log_prob(z), want, atol=1e-5)


def vamp_prior(bounds: tuple[float, float] | None) -> tuple[priors.VampPrior, torch.nn.Module, guides.Guide]:
    torch.manual_seed(4)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
    guide = guides.DiagonalNormal(6, D, 0.01)
    return priors.VampPrior(5, 300, encoder, guide, bounds), encoder, guide


def test_the_pseudo_inputs_start_near_005_and_are_the_priors_only_parameters():
    prior, _, _ = vamp_prior((0.0, 1.0))
    assert prior.pseudo_inputs.shape == (300, 5)
    assert abs(prior.pseudo_inputs.mean().item() - 0.05) < 0.002
    assert abs(prior.pseudo_inputs.std().item() - 0.01) < 0.001
    assert set(prior.state_dict()) == {"pseudo_inputs", "data_range"}  # encoder and guide are the guide's


def test_bounded_pseudo_inputs_are_clamped_into_the_data_range():
    prior, _, _ = vamp_prior((-0.5, 2.0))
    with torch.no_grad():
        prior.pseudo_inputs[:2] = torch.tensor([[-3.0, 0.1, 5.0, 2.0, -0.5], [1.0, 2.5, -0.6, 0.0, 3.0]])
    assert torch.equal(prior.data_range, torch.tensor([-0.5, 2.0]))
    want = torch.tensor([[-0.5, 0.1, 2.0, 2.0, -0.5], [1.0, 2.0, -0.5, 0.0, 2.0]])
    assert torch.equal(prior.inputs()[:2], want)
    assert torch.equal(prior.inputs()[2:], prior.pseudo_inputs[2:])


def test_unbounded_pseudo_inputs_are_used_as_they_are():
    prior, _, _ = vamp_prior(None)
    with torch.no_grad():
        prior.pseudo_inputs[0] = torch.tensor([-3.0, 0.1, 5.0, 2.0, -0.5])
    assert not prior.bounded and torch.equal(prior.data_range, torch.zeros(2))
    assert prior.inputs() is prior.pseudo_inputs


@pytest.mark.parametrize("bounds", [(0.0, 1.0), None])
def test_the_vamp_prior_is_the_even_mixture_of_the_guide_at_the_pseudo_inputs(bounds):
    prior, encoder, guide = vamp_prior(bounds)
    with torch.no_grad():
        prior.pseudo_inputs.mul_(40).sub_(1)  # many outside [0, 1]: the bound matters
        q = guide.gaussian(encoder(prior.inputs()))
        z = torch.randn(6, D)
        want = mixture_log_prob(z, torch.zeros(300), q.mean, q.stddev)
        assert torch.allclose(prior().log_prob(z), want, atol=1e-5)
        assert prior().event_shape == (D,) and prior().batch_shape == ()


def test_the_flow_prior_needs_two_latent_dimensions():
    with pytest.raises(UserInputError, match=r"^'model\.prior\.type' flow needs model\.latent_dim >= 2$"):
        priors.MaskedAutoregressiveFlow(1, 2, [8])
    assert len(priors.MaskedAutoregressiveFlow(2, 2, [8]).flows) == 2


def test_the_flow_prior_is_built_as_asked_and_starts_at_the_identity():
    prior = priors.MaskedAutoregressiveFlow(D, 3, [7, 9])
    assert len(prior.flows) == 3 and set(prior.state_dict()) >= {"loc", "scale"}
    for transform in prior.flows:
        layers = transform.arn.layers
        assert [layer.out_features for layer in layers] == [7, 9, 2 * D]
        assert not layers[-1].weight.any() and not layers[-1].bias.any()
        assert layers[0].weight.any()
    z = torch.randn(8, D, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(prior().log_prob(z), standard_log_prob(z), atol=1e-5)


def test_the_flow_prior_density_is_the_change_of_variables_through_the_flows():
    """log p(z) = log N(f(z); 0, I) + log |det ∂f/∂z|, f = f₁ ∘ … ∘ f_T (each flow's forward map)."""
    torch.manual_seed(6)
    prior = priors.MaskedAutoregressiveFlow(D, 2, [8])
    with torch.no_grad():
        for transform in prior.flows:
            for layer in transform.arn.layers:
                layer.weight.normal_(0, 0.5)
                layer.bias.normal_(0, 0.5)

    def f(z: torch.Tensor) -> torch.Tensor:
        for transform in reversed(prior.flows):
            z = transform(z)
        return z

    for z in torch.randn(4, D):
        with torch.no_grad():
            got = prior().log_prob(z)
        jacobian = torch.autograd.functional.jacobian(f, z)
        want = standard_log_prob(f(z)) + torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(got, want.detach(), atol=1e-4)


@pytest.mark.parametrize(
    "overrides, kind, check",
    [
        ([], priors.StandardNormal, lambda p: True),
        (["model.prior.type=learned-normal"], priors.LearnedNormal, lambda p: p.loc.shape == (4,)),
        (
            ["model.prior.type=mog", "model.prior.components=3"],
            priors.MixtureOfGaussians,
            lambda p: p.loc.shape == (3, 4),
        ),
        (
            ["model.prior.type=vamp", "model.prior.pseudo_inputs=7"],
            priors.VampPrior,
            lambda p: p.pseudo_inputs.shape == (7, 10) and p.bounded,
        ),
        (
            ["model.prior.type=vamp", "model.prior.pseudo_input_activation=none"],
            priors.VampPrior,
            lambda p: p.pseudo_inputs.shape == (100, 10) and not p.bounded,
        ),
        (
            ["model.prior.type=flow", "model.prior.flows=3", "model.prior.hidden=[5]"],
            priors.MaskedAutoregressiveFlow,
            lambda p: len(p.flows) == 3 and p.flows[0].arn.layers[0].out_features == 5,
        ),
    ],
)
def test_the_spec_builds_the_prior_it_names(overrides, kind, check):
    spec = load_spec(None, ["model.latent_dim=4", "model.encoder.hidden=[6]", "model.decoder.hidden=[6]", *overrides])
    train = torch.linspace(-0.25, 0.75, 20).reshape(2, 10)
    vae = VAE.from_spec(spec.model, 10, train=train)
    prior = vae.prior
    assert type(prior) is kind and check(prior)
    if kind is priors.VampPrior:
        assert prior._posterior[0] is vae.encoder and prior._posterior[1] is vae.guide_head
    if kind is priors.VampPrior and prior.bounded:
        assert torch.equal(prior.data_range, torch.tensor([-0.25, 0.75]))
    assert math.isfinite(prior().log_prob(torch.zeros(4)).item())
