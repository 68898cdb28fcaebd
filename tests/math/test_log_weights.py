"""LogWeights.kl: the closed form where a pair is registered, the sampled difference elsewhere, per particle, example.

Small Pyro programs written here, with a mask on some examples, a guide-only
site and a plate nested inside the data plate, against torch's own
``kl_divergence`` and the sites' own log-densities.
"""

import re

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from torch.distributions import kl_divergence
from two_sites import TwoSiteGuide

from pyro_vae.infer.log_weights import closed_form_allowed, from_traces, log_weights, traces

B, D, K = 4, 3, 5
LOC = torch.linspace(-1.0, 1.0, B * D).reshape(B, D)
SCALE = torch.linspace(0.5, 1.5, B * D).reshape(B, D)
MASK = torch.tensor([True, False, True, True])


@pytest.fixture(autouse=True)
def seed():
    pyro.set_rng_seed(0)


def model(x):
    with pyro.plate("data", B, dim=-1), pyro.poutine.mask(mask=MASK):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 2.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)


def guide(x, flow=None):
    data = pyro.plate("data", B, dim=-1)
    with data:
        pyro.sample("aux", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})  # not in the model, not masked
    with data, pyro.poutine.mask(mask=MASK):
        q = dist.Normal(LOC, SCALE).to_event(1)
        pyro.sample("z", q if flow is None else dist.TransformedDistribution(q, [flow]))


def test_closed_form_kl_per_particle_and_example_masked_plus_a_guide_only_site():
    sites = log_weights(model, guide, torch.zeros(B), num_particles=K)
    kl, closed = sites.kl()
    exact = kl_divergence(dist.Normal(LOC, SCALE).to_event(1), dist.Normal(torch.zeros(D), 2.0).to_event(1))
    aux = sites.guide["aux"].log_prob  # log q of the guide-only site, (K, B)
    assert closed == {"z": True}
    assert kl.shape == (K, B)
    assert torch.allclose(kl, torch.where(MASK, exact, 0.0) + aux)


def test_sampled_kl_where_no_closed_form_is_log_q_minus_log_p():
    flow = T.affine_autoregressive(D, hidden_dims=[4])
    sites = log_weights(model, lambda x: guide(x, flow), torch.zeros(B), num_particles=K)
    kl, closed = sites.kl()
    q, p = sites.guide["z"], sites.model["z"]
    assert closed == {"z": False}
    assert kl.shape == (K, B)
    want = torch.where(MASK, q.log_prob - p.log_prob, 0.0) + sites.guide["aux"].log_prob
    assert torch.allclose(kl, want)
    assert torch.equal(kl[:, ~MASK], sites.guide["aux"].log_prob[:, ~MASK])


def test_closed_form_kl_sums_a_plate_nested_inside_the_data_plate():
    inner = 2

    def nested_model(x):
        data = pyro.plate("data", B, dim=-1)
        with data, pyro.plate("inner", inner, dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(D), 2.0).to_event(1))
        with data:
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def nested_guide(x):
        with pyro.plate("data", B, dim=-1), pyro.plate("inner", inner, dim=-2):
            pyro.sample("z", dist.Normal(LOC, SCALE).to_event(1))

    sites = log_weights(nested_model, nested_guide, torch.zeros(B), num_particles=K, max_plate_nesting=2)
    kl, _ = sites.kl()
    exact = kl_divergence(dist.Normal(LOC, SCALE).to_event(1), dist.Normal(torch.zeros(D), 2.0).to_event(1))
    assert kl.shape == (K, 1, B)
    assert torch.allclose(kl, inner * exact.expand(K, 1, B))


def test_sites_of_a_nested_plate_are_summed_per_particle_and_example():
    inner = 2

    def nested(loc):
        def program(x):
            data = pyro.plate("data", B, dim=-1)
            with data, pyro.plate("inner", inner, dim=-2):
                pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            if loc is LOC:
                return
            with data:
                pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

        return program

    sites = log_weights(nested(torch.zeros(D)), nested(LOC), torch.zeros(B), num_particles=K, max_plate_nesting=2)
    z = sites.guide["z"].value
    log_q = dist.Normal(LOC, 1.0).to_event(1).log_prob(z).sum(-2, keepdim=True)
    log_p = dist.Normal(torch.zeros(D), 1.0).to_event(1).log_prob(z).sum(-2, keepdim=True)
    for got, want in [
        (sites.log_guide, log_q),
        (sites.log_prior, log_p),
        (sites.log_q, log_q),
        (sites.log_p - sites.log_likelihood, log_p),
    ]:
        assert got.shape == (K, 1, B)
        assert torch.allclose(got, want)


def test_unweighted_sums_leave_masked_examples_out():
    sites = log_weights(model, guide, torch.zeros(B), num_particles=K)
    z = sites.guide["z"].value
    log_p = dist.Normal(torch.zeros(D), 2.0).to_event(1).log_prob(z)
    assert torch.allclose(sites.log_prior, torch.where(MASK, log_p, 0.0))
    assert torch.equal(sites.log_guide[:, ~MASK], sites.guide["aux"].log_prob[:, ~MASK])


def test_one_particle_by_default_and_values_wrapped_before_the_model_sees_them():
    sites = log_weights(model, guide, torch.zeros(B))
    assert sites.log_w.shape == (1, B)
    assert [site.name for site in sites.guide.values()] == ["aux", "z"]
    model_trace, guide_trace = traces(model, guide, (torch.zeros(B),), {}, K)  # the data plate alone: K at dim -2
    assert guide_trace.nodes["z"]["value"].shape == model_trace.nodes["z"]["value"].shape == (K, B, D)
    shifted = log_weights(
        model, guide, torch.zeros(B), num_particles=K, scale_values=lambda value, event_dim: value + 1
    )
    assert torch.equal(shifted.model["z"].value, shifted.guide["z"].value + 1)


def test_the_path_derivative_only_when_asked():
    """log q(loc + σε): its total gradient in loc is 0; the path derivative alone is Σ −ε/σ."""
    loc = torch.zeros(B, D, requires_grad=True)

    def normal_guide(x):
        with pyro.plate("data", B, dim=-1):
            pyro.sample("z", dist.Normal(loc, SCALE).to_event(1))

    def plain_model(x):
        with pyro.plate("data", B, dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    def gradient(sites) -> torch.Tensor:
        return torch.autograd.grad(sites.log_guide.sum(), loc, retain_graph=True)[0]

    pyro.set_rng_seed(1)
    plain = log_weights(plain_model, normal_guide, torch.zeros(B), num_particles=K)
    assert torch.allclose(gradient(plain), torch.zeros(B, D), atol=1e-5)
    assert torch.allclose(gradient(from_traces(plain.model_trace, plain.guide_trace)), torch.zeros(B, D), atol=1e-5)
    pyro.set_rng_seed(1)
    path = log_weights(plain_model, normal_guide, torch.zeros(B), num_particles=K, path_derivative=True)
    eps = (path.guide["z"].value - loc).detach() / SCALE
    assert torch.allclose(gradient(path), -(eps / SCALE).sum(0), atol=1e-5)


def test_closed_form_kl_is_allowed_where_the_guide_drew_every_earlier_model_site_first():
    """A site's closed-form KL is unbiased when the guide drew each site the model drew before it (its possible
    parents) earlier; an observed model site absent from the guide is skipped, and a guide-only site is allowed."""
    assert closed_form_allowed(["z2", "x", "z1"], ["z1", "z2"]) == {"z1": False, "z2": True}  # bottom-up
    assert closed_form_allowed(["z2", "x", "z1"], ["z2", "z1"]) == {"z2": True, "z1": True}  # top-down
    assert closed_form_allowed(["z"], ["u", "z"]) == {"u": True, "z": True}


def test_the_path_derivative_of_a_guide_with_two_sites_flows_through_z1_into_q_z2_given_z1():
    """STL/DReG's guide term for q(z1|x) q(z2|z1): the gradient of log q_φ̄(z1(φ)) + log q_φ̄(z2(φ) | z1(φ)) with
    φ̄ = φ held fixed in the densities and the draws z1(φ) = a x + σ_s ε1, z2(φ) = b z1(φ) + σ_t ε2 moving with φ,
    so the derivative through z1 into q(z2|z1)'s mean b·z1 counts, at the draws the guide made."""
    guide = TwoSiteGuide()
    x = torch.tensor([0.5, -1.0, 2.0])
    pyro.set_rng_seed(2)
    sites = log_weights(guide.model, guide.guide, x, num_particles=4, path_derivative=True)
    params = [guide.a, guide.s, guide.b, guide.t]
    got = torch.autograd.grad(sites.log_guide.sum(), params)

    softplus = torch.nn.functional.softplus
    z1_drawn, z2_drawn = sites.guide["z1"].value.detach(), sites.guide["z2"].value.detach()
    eps1 = (z1_drawn - guide.a.detach() * x) / softplus(guide.s.detach())
    eps2 = (z2_drawn - guide.b.detach() * z1_drawn) / softplus(guide.t.detach())
    z1 = guide.a * x + softplus(guide.s) * eps1
    z2 = guide.b * z1 + softplus(guide.t) * eps2
    a, s, b, t = (p.detach() for p in params)
    log_q = dist.Normal(a * x, softplus(s)).log_prob(z1) + dist.Normal(b * z1, softplus(t)).log_prob(z2)
    want = torch.autograd.grad(log_q.sum(), params)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, want)), (got, want)


class ShiftedTwoSiteGuide(TwoSiteGuide):
    """TwoSiteGuide whose programs take a keyword argument: q(z1 | x) = N(a·x + shift, softplus(s))."""

    def model(self, x, shift=0.0):
        super().model(x)

    def guide(self, x, shift=0.0):
        softplus = torch.nn.functional.softplus
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(self.a * x + shift, softplus(self.s)))
            pyro.sample("z2", dist.Normal(self.b * z1, softplus(self.t)))


def test_the_path_derivative_replay_of_a_guide_with_two_sites_keeps_the_programs_keyword_arguments():
    """The detached replay calls the guide with the same keyword arguments (a conditional VAE's labels), so its
    log q equals the plain log q in value at the same draws."""
    guide = ShiftedTwoSiteGuide()
    x = torch.tensor([0.5, -1.0, 2.0])
    values = []
    for path_derivative in (False, True):
        pyro.set_rng_seed(2)
        sites = log_weights(guide.model, guide.guide, x, num_particles=4, path_derivative=path_derivative, shift=1.5)
        values.append(sites.log_guide.detach())
    assert torch.allclose(values[0], values[1], rtol=0, atol=1e-6), (values[0] - values[1]).abs().max()


def test_a_path_derivative_on_a_two_site_guide_that_is_not_a_module_method_is_refused_in_one_line():
    module = TwoSiteGuide()

    def guide(x):
        module.guide(x)

    message = (
        "a path-derivative estimator on a guide with several latent sites needs the guide to be a method of an "
        "nn.Module"
    )
    with pytest.raises(NotImplementedError, match=f"^{re.escape(message)}$"):
        log_weights(module.model, guide, torch.tensor([0.5, -1.0]), num_particles=2, path_derivative=True)
