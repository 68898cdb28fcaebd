"""The ELBO estimators checked on the linear-Gaussian model (the README's mathematics table and estimator list).

The model z ~ N(m, I), x | z ~ N(W z + b, σ² I) has an exact log p(x) and an
exact posterior p(z|x) = N(A x + c, L Lᵀ), so the guide q(z|x) = N(A x + c + m, L Lᵀ)
can be set to the posterior or perturbed away from it. W, b are the "model"
parameters, A, c, L the "encoder" parameters and m is shared (prior mean and
guide offset, like a VampPrior's encoder). Everything runs in float64.

Statistical checks use fixed seeds and a tolerance of Z = 4.5 standard errors
(max over ~20 gradient coordinates); gradient comparisons between two
estimators are paired (the same seed, hence the same z, for both) so that the
standard error is that of their difference.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints, kl_divergence
from two_sites import TwoSiteGuide

from pyro_vae.config import registry
from pyro_vae.config.spec import Spec
from pyro_vae.errors import UserInputError
from pyro_vae.infer.estimators import (
    CIWAE_ELBO,
    IWAE_ELBO,
    MIWAE_ELBO,
    PIWAE_ELBO,
    STL_ELBO,
    DReG_ELBO,
    MeanField_ELBO,
    Renyi_ELBO,
    TailAdaptive_ELBO,
    bound,
    bound_and_backward,
    guide_kl_weight,
)
from pyro_vae.infer.gaussian import LinearGaussian

Z = 4.5
ESTIMATORS = [
    "trace",
    "meanfield",
    "tail-adaptive",
    "iwae",
    "renyi",
    "stl",
    "dreg",
    "miwae",
    "ciwae",
    "piwae",
    "tracegraph",  # with the estimators for discrete sites (pyro_vae.infer.discrete_estimators)
]
ENCODER, MODEL, SHARED = ("A", "c", "L"), ("W", "b"), ("m",)
# coordinates of the flattened gradient over ENCODER + MODEL + SHARED (D = 4, d = 2)
ENC, MOD = slice(0, 8 + 2 + 4), slice(14, 14 + 8 + 4)


pytestmark = pytest.mark.usefixtures("float64_one_thread")


class Problem:
    """The linear-Gaussian model and a guide whose distance from the posterior we set."""

    def __init__(
        self,
        num_examples=6,
        data_dim=4,
        latent_dim=2,
        noise=0.5,
        guide="mvn",
        loc_shift=0.0,
        gain=1.0,
        spread=1.0,
        beta=1.0,
    ):
        self.lg = LinearGaussian.random(data_dim, latent_dim, noise, torch.Generator().manual_seed(1))
        self.x = self.lg.sample(num_examples, torch.Generator().manual_seed(2))
        cov = self.lg.posterior_covariance()
        self.A0 = gain * cov @ self.lg.weight.T / noise**2
        self.c0 = -cov @ self.lg.weight.T @ self.lg.bias / noise**2 + loc_shift
        self.L0 = spread * torch.linalg.cholesky(cov)
        self.kind, self.beta, self.d, self.D = guide, beta, latent_dim, data_dim

    def model(self, x, num_data=None, mask=True):
        W = pyro.param("W", self.lg.weight.clone())
        b = pyro.param("b", self.lg.bias.clone())
        m = pyro.param("m", torch.zeros(self.d))
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))), poutine.mask(mask=mask):
            with self.kl_scale():
                z = pyro.sample("z", dist.Normal(m, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, self.lg.noise).to_event(1), obs=x)

    def q(self, x):
        A, c = pyro.param("A", self.A0.clone()), pyro.param("c", self.c0.clone())
        loc = x @ A.T + c + pyro.param("m", torch.zeros(self.d))
        if self.kind == "mvn":
            return dist.MultivariateNormal(
                loc, scale_tril=pyro.param("L", self.L0.clone(), constraint=constraints.lower_cholesky)
            )
        if self.kind == "diagonal":
            scale = pyro.param("s", self.L0.diagonal().clone(), constraint=constraints.positive)
            return dist.Normal(loc, scale).to_event(1)
        if self.kind == "lowrank":
            factor = pyro.param("factor", 0.3 * torch.ones(self.d, 1))
            diag = pyro.param("diag", torch.full((self.d,), 0.2), constraint=constraints.positive)
            return dist.LowRankMultivariateNormal(loc, factor, diag)
        if self.kind == "flow":
            if not hasattr(self, "flow"):
                torch.manual_seed(3)
                self.flow = T.conditional_affine_autoregressive(self.d, self.D, hidden_dims=[8])
            pyro.module("flow", self.flow)
            base = dist.Normal(loc, 0.5).to_event(1)
            return dist.ConditionalTransformedDistribution(base, [self.flow]).condition(x)
        raise ValueError(self.kind)

    def guide(self, x, num_data=None, mask=True):
        q = self.q(x)
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))), poutine.mask(mask=mask):
            with self.kl_scale():
                pyro.sample("z", q)

    def kl_scale(self):
        """β on the z sites: a scale, or a mask for β = 0 (as the package's VAE does)."""
        return poutine.mask(mask=False) if self.beta == 0 else poutine.scale(scale=self.beta)

    def params(self, names):
        store = pyro.get_param_store()
        return [store.get_param(n).unconstrained() for n in names]

    def gradients(self, elbo, draws, copies=1, names=ENCODER + MODEL + SHARED, seed=0):
        """``draws`` independent draws of the estimator's gradient of −loss, flattened over ``names``.

        Each draw runs on ``copies`` copies of x and is divided by ``copies``: the
        mean of that many independent single-batch gradients (batch means).
        """
        x = self.x.repeat(copies, 1)
        self.model(x), self.guide(x)  # create the parameters
        params = self.params(names)
        out = []
        for draw in range(draws):
            for p in params:
                p.grad = None
            pyro.set_rng_seed(seed + draw)
            bound_and_backward(elbo, self.model, self.guide, x)
            out.append(-torch.cat([p.grad.flatten() for p in params]) / copies)
        return torch.stack(out)

    def exact_elbo(self):
        """The ELBO in closed form (Gaussian q, linear-Gaussian model), differentiable."""
        W, b, m = (pyro.param(n) for n in ("W", "b", "m"))
        q = self.q(self.x)
        loc = q.mean
        cov = q.covariance_matrix if self.kind == "mvn" else torch.diag_embed(q.variance)
        likelihood = dist.Normal(loc @ W.T + b, self.lg.noise).to_event(1).log_prob(self.x)
        likelihood = likelihood - torch.einsum("ij,...jk,ik->...", W, cov, W) / (2 * self.lg.noise**2)
        prior = dist.MultivariateNormal(m.expand(len(self.x), -1), torch.eye(self.d))
        return (likelihood - kl_divergence(dist.MultivariateNormal(loc, cov), prior)).sum()

    def exact_gradient(self, names=ENCODER + MODEL + SHARED):
        self.model(self.x), self.guide(self.x)
        params = self.params(names)
        return torch.cat([g.flatten() for g in torch.autograd.grad(self.exact_elbo(), params)])


def z_scores(draws, target=0.0):
    """(mean − target) / standard error, per coordinate (0 where both are 0, as for
    the gradient of L's unused upper triangle or two identical estimators)."""
    error = draws.mean(0) - target
    se = draws.std(0) / math.sqrt(len(draws))
    return torch.where(se > 0, error / se, torch.where(error.abs() < 1e-12, 0.0, math.inf))


def build(name, **spec):
    return registry.get("estimator", name)(Spec.from_dict({"inference": {"estimator": name, **spec}}).inference)


def perturbed(**kwargs):
    return Problem(loc_shift=0.4, gain=0.8, spread=0.7, **kwargs)


# --------------------------------------------------------------------------- registry


def test_registered_in_order_and_types():
    assert [n for n in registry.names("estimator") if n in ESTIMATORS] == ESTIMATORS
    types = {
        "trace": Trace_ELBO,
        "meanfield": TraceMeanField_ELBO,
        "tracegraph": TraceGraph_ELBO,
        "tail-adaptive": TailAdaptive_ELBO,
        "iwae": IWAE_ELBO,
        "renyi": Renyi_ELBO,
        "stl": STL_ELBO,
        "dreg": DReG_ELBO,
        "miwae": MIWAE_ELBO,
        "ciwae": CIWAE_ELBO,
        "piwae": PIWAE_ELBO,
    }
    for name, cls in types.items():
        elbo = build(name, num_particles=3)
        assert isinstance(elbo, cls), name
        assert elbo.num_particles == 3
    assert build("miwae", num_particles=3, outer_particles=2).num_particles == 6
    assert build("renyi", num_particles=3, alpha=0.3).alpha == 0.3
    assert build("trace", num_particles=3).vectorize_particles
    assert not build("trace", num_particles=1).vectorize_particles


def test_tail_adaptive_needs_two_particles():
    with pytest.raises(UserInputError, match="'inference.num_particles'"):
        build("tail-adaptive", num_particles=1)


# --------------------------------------------------------------------------- bounds


def test_iwae_rises_with_k_toward_log_px():
    # 400 copies of each of 6 examples: per-example bounds are 2400 independent draws
    problem = perturbed()
    x = problem.x.repeat(400, 1)
    log_px = problem.lg.log_marginal(x)
    pyro.set_rng_seed(0)
    gaps = {}
    for k in (1, 4, 16, 64):
        with torch.no_grad():
            problem.model(x), problem.guide(x)
            bounds, scale = IWAE_ELBO(k).example_bounds(problem.model, problem.guide, x)
        assert scale == 1.0 and bounds.shape == (len(x),)
        gaps[k] = log_px - bounds  # ≥ 0 in expectation
    # K = 1 is the ELBO: its mean gap is KL(q ‖ p(z|x)), known exactly
    with torch.no_grad():
        exact_elbo = problem.exact_elbo() / len(problem.x)
    kl = log_px.mean() - exact_elbo
    assert kl > 0.3
    assert abs(z_scores(gaps[1].unsqueeze(1), kl).item()) < Z
    means = [gaps[k].mean().item() for k in (1, 4, 16, 64)]
    for k in (1, 4, 16, 64):  # never above log p(x) beyond noise
        assert z_scores(gaps[k].unsqueeze(1)).item() > -Z
    for small, large in ((1, 4), (4, 16), (16, 64)):  # rises with K (independent draws)
        assert z_scores((gaps[small] - gaps[large]).unsqueeze(1)).item() > Z
    assert means[-1] < 0.5 * means[0]


def test_renyi_alpha_zero_is_iwae_and_alpha_orders_bounds():
    problem = perturbed()
    values = {}
    for alpha in (0.0, 0.5, 0.9, 2.0):
        pyro.set_rng_seed(5)
        with torch.no_grad():
            values[alpha] = Renyi_ELBO(alpha, 8).example_bounds(problem.model, problem.guide, problem.x)[0]
    pyro.set_rng_seed(5)
    iwae = bound(build("iwae", num_particles=8), problem.model, problem.guide, problem.x)
    pyro.set_rng_seed(5)
    renyi0 = bound(build("renyi", num_particles=8, alpha=0.0), problem.model, problem.guide, problem.x)
    assert torch.allclose(iwae, values[0.0].sum(), rtol=1e-12) and torch.allclose(renyi0, iwae, rtol=1e-12)
    # same particles: 1/(1-α) log mean w^(1-α) is a power mean, decreasing in α
    assert (values[0.0] >= values[0.5]).all() and (values[0.5] >= values[0.9]).all()
    assert (values[0.5] >= values[2.0]).all() and (values[0.0] > values[0.9] + 1e-3).all()


def test_iwae_equals_pyro_renyi_on_a_full_batch():
    problem = perturbed()
    ours, pyros = IWAE_ELBO(16), RenyiELBO(alpha=0, num_particles=16, max_plate_nesting=1, vectorize_particles=True)
    grads = []
    for elbo in (ours, pyros):
        pyro.set_rng_seed(7)
        with torch.no_grad():
            value = elbo.loss(problem.model, problem.guide, problem.x)
        grads.append((value, problem.gradients(elbo, 1, seed=8)))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


def test_iwae_scales_after_the_log_mean_exp_under_subsampling():
    # B = 6 of N = 60 examples, β = 0.5 on z, example 2 masked out: the bound must be
    # (N/B) Σ_b mask_b · log mean_k exp(log p(x_b|z_kb) + β (log p(z_kb) − log q(z_kb|x_b)))
    problem = perturbed(beta=0.5)
    x, num_data, k = problem.x, 60, 32
    mask = torch.ones(len(x), dtype=torch.bool)
    mask[2] = False
    problem.model(x), problem.guide(x)
    pyro.set_rng_seed(11)
    with torch.no_grad():
        ours = IWAE_ELBO(k).loss(problem.model, problem.guide, x, num_data=num_data, mask=mask)
    pyro.set_rng_seed(11)  # the same particles, by hand
    with torch.no_grad():
        q = problem.q(x)
        z = q.rsample((k,))
        log_w = dist.Normal(z @ problem.lg.weight.T + problem.lg.bias, problem.lg.noise).to_event(1).log_prob(
            x
        ) + problem.beta * (dist.Normal(0.0, 1.0).expand([problem.d]).to_event(1).log_prob(z) - q.log_prob(z))
        per_example = torch.logsumexp(log_w, 0) - math.log(k)
    expected = num_data / len(x) * per_example[mask].sum()
    assert -ours == pytest.approx(expected.item(), rel=1e-10)
    # Pyro's RenyiELBO puts N/B inside the exp: log mean exp(10 log w) ≥ 10 log mean exp(log w)
    problem.beta = 1.0
    log_px = num_data / len(x) * problem.lg.log_marginal(x).sum()
    values = {}
    for name, elbo in (
        ("ours", IWAE_ELBO(1000)),
        ("pyro", RenyiELBO(0, 1000, max_plate_nesting=1, vectorize_particles=True)),
    ):
        pyro.set_rng_seed(12)
        with torch.no_grad():
            values[name] = -elbo.loss(problem.model, problem.guide, x, num_data=num_data)
    assert values["ours"] < log_px < values["pyro"] - 20


# --------------------------------------------------------------------------- gradients


def test_stl_gradient_has_the_elbo_gradient_expectation():
    problem = perturbed()
    exact = problem.exact_gradient()
    stl = problem.gradients(build("stl", num_particles=1), 40, copies=50)
    trace = problem.gradients(build("trace", num_particles=1), 40, copies=50)
    assert z_scores(stl, exact).abs().max() < Z
    assert z_scores(trace, exact).abs().max() < Z
    assert z_scores(stl - trace).abs().max() < Z  # paired: the same z for both


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_dreg_gradient_has_the_iwae_gradient_expectation(beta):
    problem = perturbed(beta=beta)
    dreg = problem.gradients(build("dreg", num_particles=8), 40, copies=50)
    iwae = problem.gradients(build("iwae", num_particles=8), 40, copies=50)
    assert z_scores(dreg - iwae).abs().max() < Z
    # the model's gradient (W, b) is IWAE's, draw for draw
    assert torch.allclose(dreg[:, MOD], iwae[:, MOD], rtol=1e-9, atol=1e-12)
    # the IWAE form of STL is biased for K > 1: the check above can tell
    stl = problem.gradients(build("stl", num_particles=8), 40, copies=50)
    assert z_scores(stl - iwae).abs().max() > Z


@pytest.mark.parametrize("name,k", [("stl", 1), ("stl", 8), ("dreg", 8)])
def test_encoder_gradient_is_exactly_zero_at_the_posterior(name, k):
    problem = Problem()
    grads = problem.gradients(build(name, num_particles=k), 20, names=ENCODER)
    assert grads.abs().max() < 1e-10
    iwae = problem.gradients(build("iwae", num_particles=k), 20, names=ENCODER)
    assert iwae.std(0).max() > 0.1  # the score term is not zero there


def test_meanfield_and_trace_have_the_same_expected_loss():
    problem = perturbed(guide="diagonal")
    x = problem.x.repeat(50, 1)
    problem.model(x), problem.guide(x)
    with torch.no_grad():
        exact = problem.exact_elbo().item() * 50
    losses = {}
    for name in ("trace", "meanfield"):
        elbo = build(name, num_particles=1)
        pyro.set_rng_seed(0)
        with torch.no_grad():
            losses[name] = torch.tensor([elbo.loss(problem.model, problem.guide, x) for _ in range(100)])
    trace, meanfield = losses["trace"], losses["meanfield"]
    assert abs(z_scores(trace.unsqueeze(1), -exact).item()) < Z
    assert abs(z_scores(meanfield.unsqueeze(1), -exact).item()) < Z
    assert abs(z_scores((trace - meanfield).unsqueeze(1)).item()) < Z


# --------------------------------------------------------------------------- every estimator, every guide


@pytest.mark.parametrize("guide", ["flow", "lowrank"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_runs_with_flow_and_low_rank_guides(name, guide):
    problem = Problem(guide=guide, num_examples=5)
    elbo = build(name, num_particles=3, **({"alpha": 0.5} if name == "renyi" else {}))
    problem.model(problem.x, num_data=50), problem.guide(problem.x, num_data=50)
    store = pyro.get_param_store()
    params = [p for _, p in store.named_parameters()]
    for p in params:
        p.grad = None
    pyro.set_rng_seed(0)
    loss = bound_and_backward(elbo, problem.model, problem.guide, problem.x, num_data=50)
    assert loss.shape == () and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for n, p in store.named_parameters() if n.startswith(("flow", "factor")))
    value = bound(elbo, problem.model, problem.guide, problem.x, num_data=50)
    assert value.shape == () and torch.isfinite(value) and not value.requires_grad


def test_tail_adaptive_reports_the_iwae_bound():
    problem = perturbed()
    values = []
    for elbo in (build("tail-adaptive", num_particles=8), IWAE_ELBO(8)):
        pyro.set_rng_seed(3)
        values.append(bound(elbo, problem.model, problem.guide, problem.x))
    assert values[0].item() == pytest.approx(values[1].item(), rel=1e-12)


def test_dreg_is_iwae_draw_for_draw_when_the_kl_weight_is_zero():
    # β = 0 (the first step of a KL warm-up) masks the z sites: no score term, DReG's weight is w̃
    problem = perturbed(beta=0.0)
    dreg = problem.gradients(build("dreg", num_particles=8), 5)
    iwae = problem.gradients(build("iwae", num_particles=8), 5)
    assert dreg.abs().max() > 0
    assert torch.allclose(dreg, iwae, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kl_weight,expected", [(1.0, 1.0), (0.3, 0.3), (0.0, 0.0)])
def test_the_vae_passes_its_kl_weight_to_dreg_through_the_guide_site(kl_weight, expected):
    from pyro_vae.config.spec import load_spec
    from pyro_vae.model import VAE

    vae = VAE.from_spec(load_spec(None, ["model.encoder.hidden=[8]", "model.decoder.hidden=[8]"]).model, 6)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    trace = poutine.trace(pyro.plate("particles", 3, dim=-2)(vae.guide)).get_trace(x, num_data=50, kl_weight=kl_weight)
    beta = guide_kl_weight(trace, 10.0)
    assert float(torch.as_tensor(beta)) == pytest.approx(expected)


# --------------------------------------------------------------------------- tail-adaptive, per example


def tail_adaptive_reference(problem, x, k, tail_beta, seed, num_data=None):
    """The tail-adaptive surrogate built by hand from the same particles: ranks per example, γ = rank^β."""
    pyro.set_rng_seed(seed)
    q = problem.q(x)
    z = q.rsample((k,))  # (K, B, d), as the plate draws them
    W, b, m = (pyro.param(n) for n in ("W", "b", "m"))
    log_w = dist.Normal(z @ W.T + b, problem.lg.noise).to_event(1).log_prob(x) + problem.beta * (
        dist.Normal(m, 1.0).to_event(1).log_prob(z) - q.log_prob(z)
    )
    gamma = torch.empty_like(log_w)
    for j in range(log_w.shape[1]):  # each example on its own
        for i in range(k):
            count = int((log_w[:, j] >= log_w[i, j]).sum())  # F̂: 1 for the largest weight
            gamma[i, j] = count**tail_beta
    gamma = (gamma / gamma.sum(0)).detach()
    scale = (num_data or len(x)) / len(x)
    return scale * (gamma * log_w).sum()


@pytest.mark.parametrize("tail_beta", [-1.0, -0.5])
def test_tail_adaptive_gradient_equals_the_per_example_rank_reference(tail_beta):
    problem = perturbed()
    x, k, params = problem.x, 8, None
    problem.model(x), problem.guide(x)
    params = problem.params(ENCODER + MODEL + SHARED)
    for seed in range(3):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed)
        bound_and_backward(TailAdaptive_ELBO(k, tail_beta), problem.model, problem.guide, x, num_data=60)
        ours = torch.cat([-p.grad.flatten() for p in params])
        reference = torch.autograd.grad(tail_adaptive_reference(problem, x, k, tail_beta, seed, num_data=60), params)
        reference = torch.cat([g.flatten() for g in reference])
        assert ours.abs().max() > 0
        assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-12)


def test_tail_adaptive_per_example_gradient_ignores_the_other_examples():
    # example 0's gradient, same ε, with the rest of the minibatch changed: ranks per example must not move
    problem = perturbed()
    x = problem.x.clone()
    problem.model(x), problem.guide(x)
    params = problem.params(MODEL)
    gradients = []
    for shift in (0.0, 3.0):
        other = x.clone()
        other[1:] += shift
        pyro.set_rng_seed(4)
        bounds, _ = TailAdaptive_ELBO(8).example_bounds(problem.model, problem.guide, other)
        gradients.append(torch.cat([g.flatten() for g in torch.autograd.grad(bounds[0], params)]))
    assert gradients[0].abs().max() > 0
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-9, atol=1e-12)


def test_tail_adaptive_with_beta_zero_is_the_k_particle_elbo_gradient():
    problem = perturbed()
    tail = problem.gradients(TailAdaptive_ELBO(8, tail_adaptive_beta=0.0), 3, seed=5)
    elbo = problem.gradients(Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1), 3, seed=5)
    assert torch.allclose(tail, elbo, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- the M×K family


def test_miwae_with_one_outer_bound_is_iwae_and_ciwae_with_beta_one_is_the_elbo():
    problem = perturbed()
    miwae = problem.gradients(MIWAE_ELBO(1, 8), 3, seed=6)
    iwae = problem.gradients(IWAE_ELBO(8), 3, seed=6)
    assert torch.allclose(miwae, iwae, rtol=1e-9, atol=1e-12)
    ciwae = problem.gradients(CIWAE_ELBO(8, ciwae_beta=1.0), 3, seed=7)
    elbo = problem.gradients(Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1), 3, seed=7)
    assert torch.allclose(ciwae, elbo, rtol=1e-9, atol=1e-12)
    ciwae0 = problem.gradients(CIWAE_ELBO(8, ciwae_beta=0.0), 3, seed=7)
    assert torch.allclose(ciwae0, problem.gradients(IWAE_ELBO(8), 3, seed=7), rtol=1e-9, atol=1e-12)


def test_mxk_bounds_match_their_definitions_on_the_same_particles():
    problem = perturbed()
    x, m, k = problem.x, 3, 4
    problem.model(x), problem.guide(x)
    pyro.set_rng_seed(8)
    with torch.no_grad():
        log_w, _, _ = IWAE_ELBO(m * k).log_weights(problem.model, problem.guide, (x,), {})
    groups = log_w.reshape(m, k, -1)
    expected = {
        "miwae": (torch.logsumexp(groups, 1) - math.log(k)).mean(0).sum(),
        "piwae": (torch.logsumexp(log_w, 0) - math.log(m * k)).sum(),
        "ciwae": (0.3 * log_w[:k].mean(0) + 0.7 * (torch.logsumexp(log_w[:k], 0) - math.log(k))).sum(),
    }
    per_example = {
        "ciwae": 0.3 * log_w[:k].mean(0) + 0.7 * (torch.logsumexp(log_w[:k], 0) - math.log(k)),
        "miwae": (torch.logsumexp(groups, 1) - math.log(k)).mean(0),
    }
    for name, elbo in (("miwae", MIWAE_ELBO(m, k)), ("piwae", PIWAE_ELBO(m, k)), ("ciwae", CIWAE_ELBO(k, 0.3))):
        pyro.set_rng_seed(8)
        assert bound(elbo, problem.model, problem.guide, x).item() == pytest.approx(expected[name].item(), rel=1e-10)
        if name in per_example:  # each example's own bound, not only their sum
            pyro.set_rng_seed(8)
            with torch.no_grad():
                bounds, _ = elbo.example_bounds(problem.model, problem.guide, x)
            assert torch.allclose(bounds, per_example[name], rtol=1e-10)


def test_piwae_gives_the_decoder_iwae_and_the_encoder_miwae_draw_for_draw():
    problem = perturbed()
    piwae = problem.gradients(PIWAE_ELBO(2, 4), 3, seed=9)
    iwae = problem.gradients(IWAE_ELBO(8), 3, seed=9)
    miwae = problem.gradients(MIWAE_ELBO(2, 4), 3, seed=9)
    assert torch.allclose(piwae[:, MOD], iwae[:, MOD], rtol=1e-9, atol=1e-12)
    assert torch.allclose(piwae[:, ENC], miwae[:, ENC], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(piwae[:, ENC], iwae[:, ENC], rtol=1e-3)


def test_mxk_expected_gradients_match_their_definitions():
    # MIWAE(M, K)'s expected gradient is the one of the exact objective E[(1/M) Σ_m log (1/K) Σ_k w_mk]
    # = E[IWAE_K]: the mean over many draws of MIWAE(4, 2) equals that of IWAE(2) drawn 4x as often
    problem = perturbed()
    miwae = problem.gradients(MIWAE_ELBO(4, 2), 40, copies=25)
    iwae = problem.gradients(IWAE_ELBO(2), 40, copies=100)
    difference = miwae.mean(0) - iwae.mean(0)
    se = (miwae.var(0) / len(miwae) + iwae.var(0) / len(iwae)).sqrt()
    z = torch.where(se > 0, difference / se, torch.zeros_like(se))
    assert z.abs().max() < Z


# --------------------------------------------------------------------------- what the mutation run found untested


def test_dreg_reads_a_tensor_mask_and_a_tensor_kl_weight_from_the_guide_site():
    problem = perturbed()
    x = problem.x
    everyone = torch.ones(len(x), dtype=torch.bool)
    gradients = []
    for mask in (True, everyone):
        problem.model(x), problem.guide(x)
        params = problem.params(ENCODER)
        for p in params:
            p.grad = None
        pyro.set_rng_seed(13)
        bound_and_backward(DReG_ELBO(4), problem.model, problem.guide, x, mask=mask)
        gradients.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-12)
    with poutine.trace() as tape:
        with poutine.scale(scale=torch.tensor(0.25)):
            problem.guide(x)
    assert float(guide_kl_weight(tape.trace, 1.0)) == pytest.approx(0.25)


def test_dreg_refuses_guide_sites_with_different_kl_weights():
    def guide(x):
        with pyro.plate("data", len(x)):
            with poutine.scale(scale=0.5):
                pyro.sample("a", dist.Normal(torch.zeros(len(x)), 1.0))
            pyro.sample("b", dist.Normal(torch.zeros(len(x)), 1.0))

    def same(x):
        with pyro.plate("data", len(x)), poutine.scale(scale=0.5):
            pyro.sample("a", dist.Normal(torch.zeros(len(x)), 1.0))
            pyro.sample("b", dist.Normal(torch.zeros(len(x)), 1.0))

    x = torch.zeros(3)
    with pytest.raises(NotImplementedError, match="one KL weight"):
        guide_kl_weight(poutine.trace(guide).get_trace(x), 1.0)
    assert guide_kl_weight(poutine.trace(same).get_trace(x), 1.0) == 0.5


def test_bound_keeps_the_minibatch_scale_and_its_sign_for_every_kind_of_elbo():
    problem = perturbed(guide="diagonal")
    x = problem.x
    problem.model(x), problem.guide(x)
    values = {}
    for name, elbo in (
        ("trace", Trace_ELBO(max_plate_nesting=1)),
        ("tracegraph", TraceGraph_ELBO(max_plate_nesting=1)),
        ("iwae", IWAE_ELBO(1)),
    ):
        for num_data in (None, 60):
            pyro.set_rng_seed(14)
            values[name, num_data] = bound(elbo, problem.model, problem.guide, x, num_data=num_data).item()
            pyro.set_rng_seed(14)
            loss = bound_and_backward(elbo, problem.model, problem.guide, x, num_data=num_data).item()
            assert loss == pytest.approx(-values[name, num_data], rel=1e-9)
    for name in ("trace", "tracegraph", "iwae"):
        assert values[name, 60] == pytest.approx(10 * values[name, None], rel=1e-9)  # N/B = 60/6
        assert values[name, None] < 0 and values[name, None] == pytest.approx(values["trace", None], rel=1e-9)


def test_estimator_arguments_are_checked_at_their_boundaries():
    assert TailAdaptive_ELBO(2).num_particles == 2
    TailAdaptive_ELBO(4, tail_adaptive_beta=0.0)
    for bad in (
        lambda: TailAdaptive_ELBO(1),
        lambda: TailAdaptive_ELBO(4, tail_adaptive_beta=0.5),
        lambda: CIWAE_ELBO(4, ciwae_beta=1.5),
        lambda: CIWAE_ELBO(4, ciwae_beta=-0.1),
        lambda: Renyi_ELBO(1.0, 4),
    ):
        with pytest.raises(ValueError):
            bad()
    assert CIWAE_ELBO(4, ciwae_beta=1.0).ciwae_beta == 1.0
    assert build("trace", num_particles=2).vectorize_particles


def test_meanfield_on_a_bottom_up_guide_samples_the_term_whose_parent_the_guide_drew_later():
    """p(z2) p(z1|z2) p(x|z1) with the guide q(z1|x) q(z2|z1): z1's prior depends on a z2 drawn after it, so its
    term is sampled, log p(z1|z2) − log q(z1|x); z2's is −KL(q(z2|z1) ‖ p(z2)) in closed form. At the guide's draws:

        ELBO = log p(x|z1) + log p(z1|z2) − log q(z1|x) − KL(q(z2|z1) ‖ N(0, 1))"""
    x = torch.tensor([0.4, -1.2, 2.1], dtype=torch.float64)
    a, b = torch.tensor(0.6, dtype=torch.float64), torch.tensor(-0.8, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros_like(x), 1.0))
            z1 = pyro.sample("z1", dist.Normal(0.5 * z2, 0.9))
            pyro.sample("x", dist.Normal(z1, 0.7), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(a * x, 0.8))
            pyro.sample("z2", dist.Normal(b * z1, 0.6))

    pyro.set_rng_seed(5)
    loss = MeanField_ELBO().differentiable_loss(model, guide, x)
    pyro.set_rng_seed(5)
    drawn = poutine.trace(guide).get_trace(x)
    z1, z2 = drawn.nodes["z1"]["value"], drawn.nodes["z2"]["value"]
    elbo = (
        dist.Normal(z1, 0.7).log_prob(x)
        + dist.Normal(0.5 * z2, 0.9).log_prob(z1)
        - dist.Normal(a * x, 0.8).log_prob(z1)
        - kl_divergence(dist.Normal(b * z1, 0.6), dist.Normal(0.0, 1.0))
    ).sum()
    assert torch.allclose(-loss, elbo, rtol=1e-12, atol=1e-12), (-loss, elbo)


def test_stl_on_a_guide_with_two_sites_differentiates_log_w_with_the_densities_parameters_held_fixed():
    """STL's log w for q(z1|x) q(z2|z1) at the guide's draws: log p(x, z1(φ), z2(φ)) − log q_φ̄(z1(φ), z2(φ)), φ̄ = φ
    fixed in the guide's densities, the draws z1 = a x + σ_s ε1, z2 = b z1 + σ_t ε2 moving with φ (through z1 into
    q(z2|z1)'s mean too)."""
    two = TwoSiteGuide()
    x = torch.tensor([0.5, -1.0, 2.0])
    pyro.set_rng_seed(2)
    log_w, _, guide_trace = STL_ELBO(num_particles=3).log_weights(two.model, two.guide, (x,), {})
    params = [two.a, two.s, two.b, two.t]
    got = torch.autograd.grad(log_w.sum(), params)

    softplus = torch.nn.functional.softplus
    a, s, b, t = (p.detach() for p in params)
    z1_drawn, z2_drawn = guide_trace.nodes["z1"]["value"].detach(), guide_trace.nodes["z2"]["value"].detach()
    z1 = two.a * x + softplus(two.s) * (z1_drawn - a * x) / softplus(s)
    z2 = two.b * z1 + softplus(two.t) * (z2_drawn - b * z1_drawn) / softplus(t)
    log_p = dist.Normal(0.0, 1.0).log_prob(z1) + dist.Normal(z1, 1.0).log_prob(z2) + dist.Normal(z2, 1.0).log_prob(x)
    log_q = dist.Normal(a * x, softplus(s)).log_prob(z1) + dist.Normal(b * z1, softplus(t)).log_prob(z2)
    want = torch.autograd.grad((log_p - log_q).sum(), params)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want)), (got, want)
