"""Numerical checks of the mathematics in the README's mathematics table, on the closed forms of
pyro_vae.infer.gaussian.

Statistical tests compare a Monte Carlo estimate with its exact value and allow
4 standard errors (SE = sample std / √L): a two-sided normal tail of 6e-5 per
comparison, so a correct formula passes, while every formula break tried
moves the estimate by many SE. Seeds are fixed, so each run is the same draw.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyro_vae.infer.gaussian import LinearGaussian, diagonal_normal_kl, gaussian_diagonal_kl, log_density

NUM_SE = 4.0


@pytest.fixture(autouse=True)
def float64_and_seed():
    """float64 so that exact identities hold to ~1e-10; one seed per test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(previous)


def mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean over dim 0 and its standard error std / √L."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


def linear_gaussian(data_dim: int, latent_dim: int, seed: int = 0) -> LinearGaussian:
    # noise 0.5: σ² = 0.25 is exact in binary, so no rounding enters the covariances.
    return LinearGaussian.random(data_dim, latent_dim, noise=0.5, generator=torch.Generator().manual_seed(seed))


# --- Gaussian KL -------------------------------------------------------------------------

# (μq, σq, μp, σp), including σ = 1e-3 and σ = 1e3 on either side, and q = p (KL = 0).
KL_PAIRS = torch.tensor(
    [
        [0.3, 1.0, -0.5, 2.0],
        [1.0, 1e-3, 0.0, 1.0],
        [0.0, 1.0, 0.2, 1e-3],
        [2.0, 1e3, -1.0, 1.0],
        [0.0, 1.0, 5.0, 1e3],
        [0.1, 1e-3, 0.0, 1e3],
        [0.0, 1e3, 0.0, 1e-3],
        [0.7, 0.4, 0.7, 0.4],
    ]
)


def test_diagonal_normal_kl_matches_torch():
    loc_q, scale_q, loc_p, scale_p = KL_PAIRS.T
    expected = kl_divergence(dist.Normal(loc_q, scale_q), dist.Normal(loc_p, scale_p))
    torch.testing.assert_close(diagonal_normal_kl(loc_q, scale_q, loc_p, scale_p), expected, rtol=1e-12, atol=1e-12)


def test_diagonal_normal_kl_matches_monte_carlo():
    loc_q, scale_q, loc_p, scale_p = KL_PAIRS.T
    q, p = dist.Normal(loc_q, scale_q), dist.Normal(loc_p, scale_p)
    z = q.sample((20_000,))
    estimate, se = mean_and_se(q.log_prob(z) - p.log_prob(z))
    exact = diagonal_normal_kl(loc_q, scale_q, loc_p, scale_p)
    # Within 4 SE; the absolute 1e-9 covers rounding where q = p makes the SE exactly 0.
    assert torch.all((estimate - exact).abs() <= NUM_SE * se + 1e-9), (estimate, exact, se)


@pytest.mark.parametrize("batch", [(), (4,)], ids=["shared", "per-example"])
def test_diagonal_gaussian_log_density_matches_the_multivariate_normal(batch):
    # K draws of B = 4 examples against a diagonal Gaussian shared by all examples (a prior) or one per
    # example (a guide); scales from 1e-3 to 1e3; reference: torch's full-covariance MultivariateNormal
    torch.manual_seed(0)
    scale = torch.logspace(-3, 3, 5).repeat(*batch, 1) * (torch.rand(*batch, 5) + 0.5)
    loc = torch.randn(*batch, 5)
    p = dist.Normal(loc, scale).to_event(1)
    z = loc + scale * torch.randn(7, 4, 5)
    reference = dist.MultivariateNormal(loc, covariance_matrix=torch.diag_embed(scale**2)).log_prob(z)
    value = log_density(p, z)
    assert value.shape == (7, 4)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-10)


def test_log_density_of_any_other_distribution_is_its_log_prob():
    q = dist.MultivariateNormal(torch.randn(4, 3), scale_tril=torch.eye(3) * 0.5)
    z = q.sample((6,))
    torch.testing.assert_close(log_density(q, z), q.log_prob(z), rtol=0, atol=0)


def full_and_low_rank_guides(batch: int, dim: int) -> list[torch.distributions.Distribution]:
    """A batch of full-covariance and of low-rank-plus-diagonal Gaussians, as Pyro classes."""
    tril = torch.randn(batch, dim, dim).tril(-1) + torch.diag_embed(torch.rand(batch, dim) + 0.3)
    return [
        dist.MultivariateNormal(torch.randn(batch, dim), scale_tril=tril),
        dist.LowRankMultivariateNormal(
            torch.randn(batch, dim), torch.randn(batch, dim, 2), torch.rand(batch, dim) + 0.1
        ),
    ]


@pytest.mark.parametrize("prior_batch", [(), (4,)], ids=["shared-prior", "batched-prior"])
def test_registered_gaussian_kl_matches_torch_mvn_kl(prior_batch):
    prior = dist.Normal(torch.randn(*prior_batch, 3), torch.rand(*prior_batch, 3) + 0.5)
    prior_as_mvn = dist.MultivariateNormal(prior.loc, covariance_matrix=torch.diag_embed(prior.scale**2))
    for q in full_and_low_rank_guides(batch=4, dim=3):
        closed_form = kl_divergence(q, prior.to_event(1))
        assert closed_form.shape == (4,)
        torch.testing.assert_close(closed_form, kl_divergence(q, prior_as_mvn), rtol=1e-10, atol=1e-10)


def test_registered_gaussian_kl_matches_monte_carlo():
    prior = dist.Normal(torch.randn(3), torch.rand(3) + 0.5).to_event(1)
    for q in full_and_low_rank_guides(batch=4, dim=3):
        z = q.sample((20_000,))
        estimate, se = mean_and_se(q.log_prob(z) - prior.log_prob(z))
        assert torch.all((estimate - kl_divergence(q, prior)).abs() <= NUM_SE * se), (estimate, se)


def test_trace_mean_field_elbo_uses_the_registered_kl():
    """With z the only site the mean-field loss is exactly KL(q ‖ p): no sampling noise."""
    prior = dist.Normal(torch.randn(3), torch.rand(3) + 0.5).to_event(1)

    def model():
        with pyro.plate("data", 4):
            pyro.sample("z", prior)

    for q in full_and_low_rank_guides(batch=4, dim=3):

        def guide(q=q):
            with pyro.plate("data", 4):
                pyro.sample("z", q)

        loss = TraceMeanField_ELBO().loss(model, guide)
        assert loss == pytest.approx(gaussian_diagonal_kl(q, prior).sum().item(), rel=1e-12)


# --- marginal likelihood -------------------------------------------------------------------


def test_log_marginal_equals_integral_over_z():
    """latent_dim = 1: ∫ p(x, z) dz by the trapezoid rule on a fine float64 grid."""
    model = linear_gaussian(data_dim=3, latent_dim=1)
    x = model.sample(5, generator=torch.Generator().manual_seed(1))
    # Step 1e-3 over [−20, 20]: the prior N(0, 1) puts < 1e-80 mass outside, and the
    # trapezoid rule on a smooth Gaussian integrand is accurate far below 1e-10.
    z = torch.linspace(-20.0, 20.0, 40_001)
    log_joint = model.log_joint(x[:, None, :], z[None, :, None])  # (examples, grid)
    peak = log_joint.max(-1, keepdim=True).values
    integral = torch.trapezoid((log_joint - peak).exp(), z, dim=-1)
    torch.testing.assert_close(model.log_marginal(x), peak.squeeze(-1) + integral.log(), rtol=1e-10, atol=1e-10)


def test_log_marginal_equals_joint_over_posterior_at_any_z():
    """log p(x) = log p(x, z) − log p(z | x) for every z, here 7 random z per example."""
    model = linear_gaussian(data_dim=5, latent_dim=3)
    x = model.sample(4, generator=torch.Generator().manual_seed(1))
    z = 3.0 * torch.randn(7, 4, 3)
    identity = model.log_joint(x, z) - model.posterior(x).log_prob(z)
    torch.testing.assert_close(identity, model.log_marginal(x).expand(7, 4), rtol=1e-10, atol=1e-10)


# --- the ELBO: Jensen's bound and the evidence decomposition -------------------------------


def diagonal_guide(loc: torch.Tensor, scale: torch.Tensor):
    """q(z) = N(loc, diag(scale²)) per example, as a Pyro guide for LinearGaussian.model."""

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def pyro_elbo(
    model: LinearGaussian, guide, x: torch.Tensor, particles: int = 400, repeats: int = 25
) -> tuple[float, float]:
    """Trace_ELBO's estimate of Σ_examples ELBO, and its SE from the spread over repeats."""
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    estimates = torch.tensor([-elbo.loss(model.model, guide, x) for _ in range(repeats)])
    mean, se = mean_and_se(estimates)
    return mean.item(), se.item()


def random_guides(model: LinearGaussian, x: torch.Tensor) -> list:
    """Guides far from the posterior (random m, s) and near it (its marginals, perturbed)."""
    posterior = model.posterior(x)
    exact_loc, exact_scale = posterior.mean, posterior.variance.sqrt()
    shape = exact_loc.shape
    far = [diagonal_guide(torch.randn(shape), torch.rand(shape) * 2 + 0.05) for _ in range(3)]
    near = [
        diagonal_guide(exact_loc + 0.05 * torch.randn(shape), exact_scale * (1 + 0.1 * torch.randn(shape)))
        for _ in range(3)
    ]
    return far + near


def test_elbo_is_below_log_marginal():
    """Jensen: E_q[log p(x, z) − log q(z)] ≤ log p(x), for every q tried."""
    model = linear_gaussian(data_dim=4, latent_dim=2)
    x = model.sample(3, generator=torch.Generator().manual_seed(1))
    log_px = model.log_marginal(x).sum().item()
    for guide in random_guides(model, x):
        elbo, se = pyro_elbo(model, guide, x)
        assert elbo <= log_px + NUM_SE * se, (elbo, log_px, se)


def test_evidence_decomposition():
    """log p(x) − ELBO = KL(q ‖ p(z | x)), the KL in closed form."""
    model = linear_gaussian(data_dim=4, latent_dim=2)
    x = model.sample(3, generator=torch.Generator().manual_seed(1))
    log_px = model.log_marginal(x).sum().item()
    posterior = model.posterior(x)
    for _ in range(4):
        loc = posterior.mean + 0.5 * torch.randn(3, 2)
        scale = posterior.variance.sqrt() * torch.empty(3, 2).uniform_(0.5, 2.0)
        q = torch.distributions.MultivariateNormal(loc, covariance_matrix=torch.diag_embed(scale**2))
        gap = kl_divergence(q, posterior).sum().item()
        elbo, se = pyro_elbo(model, diagonal_guide(loc, scale), x)
        assert abs(log_px - elbo - gap) <= NUM_SE * se, (log_px - elbo, gap, se)


def test_gap_vanishes_at_the_exact_posterior():
    """q = p(z | x) makes log p(x, z) − log q(z) constant in z: one sample gives log p(x)."""
    model = linear_gaussian(data_dim=4, latent_dim=2)
    x = model.sample(3, generator=torch.Generator().manual_seed(1))
    posterior = model.posterior(x)

    def exact_guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(posterior.mean, covariance_matrix=posterior.covariance_matrix))

    for _ in range(3):
        elbo = -Trace_ELBO(num_particles=1).loss(model.model, exact_guide, x)
        assert elbo == pytest.approx(model.log_marginal(x).sum().item(), rel=1e-10, abs=1e-10)


# --- Monte Carlo standard error -----------------------------------------------------------


def test_monte_carlo_standard_error_falls_like_one_over_sqrt_l():
    """Spread of the L-sample mean of log q − log p over many repeats: slope −½ on log-log."""
    q, p = dist.Normal(0.5, 0.8), dist.Normal(0.0, 1.0)
    repeats, sizes = 2000, [10, 100, 1000]
    log_sizes, log_stds, log_std_vars = [], [], []
    for size in sizes:
        z = q.sample((repeats, size))
        means = (q.log_prob(z) - p.log_prob(z)).mean(-1)
        centred = means - means.mean()
        variance = centred.pow(2).mean()
        kurtosis = centred.pow(4).mean() / variance**2
        log_sizes.append(math.log(size))
        log_stds.append(0.5 * math.log(variance.item()))
        # Delta method: Var[sample variance] ≈ (μ4 − σ⁴)/R, so Var[log std] ≈ (kurtosis − 1)/(4R).
        log_std_vars.append((kurtosis.item() - 1) / (4 * repeats))
    x, y, v = torch.tensor(log_sizes), torch.tensor(log_stds), torch.tensor(log_std_vars)
    weights = (x - x.mean()) / (x - x.mean()).pow(2).sum()  # least-squares slope = Σ wᵢ yᵢ
    slope = (weights * y).sum().item()
    slope_se = (weights.pow(2) * v).sum().sqrt().item()
    # slope_se ≈ 0.005 here (each log std is known to ~1/√(2R) ≈ 0.016 over a span of
    # ln 100 ≈ 4.6), so 4 SE ≈ 0.02: tight enough to tell −½ from any other power law.
    assert abs(slope + 0.5) <= NUM_SE * slope_se, (slope, slope_se)


# --- reparameterization ---------------------------------------------------------------------


@pytest.mark.parametrize("a, b, mu, sigma", [(1.0, 0.5, 0.3, 1.2), (-2.0, 1.0, -1.0, 0.4), (0.5, -3.0, 2.0, 2.5)])
def test_pathwise_gradient_matches_exact_gradient(a, b, mu, sigma):
    """z = μ + σ ε: ∇ of the MC mean of f(z) = a z² + b z matches ∇ E[f] = (2aμ + b, 2aσ)."""
    samples = 100_000
    # One (μ, σ) leaf per sample, so autograd returns every per-sample gradient; their
    # mean is the pathwise gradient of the L-sample estimate (1/L) Σ f(z_l).
    loc = torch.full((samples,), mu, requires_grad=True)
    scale = torch.full((samples,), sigma, requires_grad=True)
    z = dist.Normal(loc, scale).rsample()
    (a * z**2 + b * z).sum().backward()
    for grad, exact in [(loc.grad, 2 * a * mu + b), (scale.grad, 2 * a * sigma)]:
        estimate, se = mean_and_se(grad)
        assert abs(estimate.item() - exact) <= NUM_SE * se.item(), (estimate, exact, se)
