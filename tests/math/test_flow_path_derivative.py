"""STL and DReG with the IAF guide: the path derivative from the flow's cached base draw, never its inverse.

The reference is the surrogate log q(z) − [log q(zᵈ) − log q(zᵈ)ᵈ], which
inverts the flow at the detached zᵈ; the cached form must give the same value
and, to float64 rounding, the same gradients, without calling the inverse.
"""

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro.distributions.transforms import AffineAutoregressive

from pyro_vae.config.spec import load_spec
from pyro_vae.infer import log_weights
from pyro_vae.infer.estimators import STL_ELBO, DReG_ELBO, bound_and_backward
from pyro_vae.model import VAE

B, N, D, LATENT = 5, 50, 8, 4


pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def inverses(monkeypatch):
    """The number of times any affine autoregressive transform is inverted."""
    calls = []
    inverse = AffineAutoregressive._inverse

    def counted(self, y):
        calls.append(y.shape)
        return inverse(self, y)

    monkeypatch.setattr(AffineAutoregressive, "_inverse", counted)
    return calls


def iaf_vae() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    spec = load_spec(
        None,
        [
            f"model.latent_dim={LATENT}",
            "model.encoder.hidden=[16]",
            "model.decoder.hidden=[16]",
            "model.guide.type=iaf",
            "model.guide.flows=2",
            "model.guide.hidden=[12]",
        ],
    )
    vae = VAE.from_spec(spec.model, D)
    x = torch.bernoulli(torch.full((B, D), 0.4), generator=torch.Generator().manual_seed(1))
    return vae, x


def guide_site(vae: VAE, x: torch.Tensor, k: int = 3):
    model_trace, guide_trace = log_weights.traces(vae.model, vae.guide, (x,), {"num_data": N}, k)
    return model_trace, guide_trace, guide_trace.nodes["z"]


def by_inverse(site) -> torch.Tensor:
    """The path-derivative surrogate that inverts the flow at the detached draw (log q(z) first, from the cache)."""
    fn, value = site["fn"], site["value"]
    log_q = fn.log_prob(value)
    fixed = fn.log_prob(value.detach())
    return log_q - (fixed - fixed.detach())


def test_flow_path_derivative_has_the_inverse_formulas_value_and_gradients(inverses):
    vae, x = iaf_vae()
    pyro.set_rng_seed(3)
    model_trace, guide_trace, site = guide_site(vae, x)
    cached = log_weights.from_traces(model_trace, guide_trace, path_derivative=True).guide["z"].log_prob
    assert inverses == []
    reference = by_inverse(site)
    assert inverses, "the reference inverts the flow"
    assert torch.equal(cached, reference)
    params = [p for p in vae.encoder_parameters() if p.requires_grad]
    weights = torch.randn(cached.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((weights * cached).sum(), params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad((weights * reference).sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in got if g is not None) > 0


def test_flow_score_is_the_gradient_of_log_q_in_z():
    """An autoregressive, an elementwise and a y-dependent Jacobian, a float32 flow, two batch dims and one."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)  # the flow in float32, scored while the default is float64
    flow = T.affine_autoregressive(3, hidden_dims=[6])
    base = dist.Normal(torch.randn(3), torch.rand(3) + 0.5).to_event(1)
    q = dist.TransformedDistribution(base, [flow, T.ExpTransform(cache_size=1), T.PowerTransform(2.0, cache_size=1)])
    for shape in [(2, 4), (5,)]:
        z = q.rsample(shape)
        torch.set_default_dtype(torch.float64)
        score = log_weights.flow_score(q, log_weights.cached_base_draw(q, z))
        torch.set_default_dtype(torch.float32)  # Pyro's inverse makes its zeros in the default dtype
        free = z.detach().requires_grad_()
        (want,) = torch.autograd.grad(q.log_prob(free).sum(), free)
        assert score.dtype == torch.float32 and score.shape == (*shape, 3)
        assert torch.allclose(score, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("estimator", [STL_ELBO, DReG_ELBO])
def test_stl_and_dreg_steps_never_invert_the_iaf(inverses, estimator):
    vae, x = iaf_vae()
    pyro.set_rng_seed(3)
    bound_and_backward(estimator(num_particles=3), vae.model, vae.guide, x, num_data=N)
    assert inverses == []
    assert all(p.grad is not None for p in vae.guide_head.parameters())


def test_a_draw_the_cache_does_not_hold_takes_the_inverse():
    flow = T.affine_autoregressive(2, hidden_dims=[4])
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    z = q.rsample((3,))
    assert torch.equal(log_weights.cached_base_draw(q, z), flow._cached_x_y[0])
    assert log_weights.cached_base_draw(q, z.clone()) is None
    assert log_weights.cached_base_draw(q.base_dist, z) is None
    q.rsample((3,))  # a newer pass replaces the cache
    assert log_weights.cached_base_draw(q, z) is None
    site = {"fn": q, "value": z, "args": (), "kwargs": {}, "is_observed": False}
    assert torch.equal(log_weights._site_log_prob(site, True), q.log_prob(z))


def test_only_a_cached_vector_flow_has_a_base_draw():
    flow = T.affine_autoregressive(3, hidden_dims=[4])
    vector = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
    assert log_weights.cached_base_draw(vector, vector.rsample()) is not None  # one draw, no batch dims
    resized = dist.TransformedDistribution(  # a base of 3 dims, a value of 4
        dist.Normal(torch.zeros(3), 1.0).to_event(1), [T.StickBreakingTransform(cache_size=1)]
    )
    assert log_weights.cached_base_draw(resized, resized.rsample()) is None
    scalar = dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.ExpTransform(cache_size=1)])
    assert log_weights.cached_base_draw(scalar, scalar.rsample()) is None
    uncached = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [T.ExpTransform()])
    assert log_weights.cached_base_draw(uncached, uncached.rsample()) is None
