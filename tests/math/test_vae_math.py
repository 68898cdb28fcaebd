"""The ELBO mathematics checked through the package's own VAE (the README's mathematics table).

The linear-Gaussian VAE (linear decoder, Gaussian likelihood with the true σ,
full-covariance guide on a linear encoder) can represent the true model and
its exact posterior, so every bound has an exact target. Statistical checks
use fixed seeds and a tolerance of 4 standard errors of the estimator.
"""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import evaluation
from pyro_vae.config.spec import Spec
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE

Z = 4.0  # standard errors


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


@pytest.fixture(scope="module")
def linear_gaussian():
    spec = Spec.from_dict(
        {
            "data": {
                "name": "linear-gaussian",
                "linear_gaussian": {"data_dim": 6, "latent_dim": 2, "noise": 0.5, "num_train": 400, "num_test": 200},
            },
            "model": {
                "latent_dim": 2,
                "encoder": {"hidden": []},
                "decoder": {"hidden": []},
                "guide": {"type": "full-normal", "min_scale": 1e-6},
                "likelihood": {"type": "gaussian", "scale": 0.5},
            },
        }
    )
    data = load_dataset(spec.data)
    torch.manual_seed(0)
    vae = VAE.from_spec(spec.model, data.data_dim)
    exact = data.exact
    with torch.no_grad():
        linear = vae.decoder.net[0]
        linear.weight.copy_(exact.weight)
        linear.bias.copy_(exact.bias)
    return vae, data


def set_exact_posterior(vae, exact):
    """Encoder weights that make q(z|x) the exact posterior p(z|x)."""
    cov = exact.posterior_covariance()
    chol = torch.linalg.cholesky(cov)
    gain = cov @ exact.weight.T / exact.noise**2
    head = vae.guide_head
    with torch.no_grad():
        head.loc.weight.copy_(gain)
        head.loc.bias.copy_(-gain @ exact.bias)
        entries = chol.clone()
        entries.diagonal().copy_(inverse_softplus(chol.diagonal() - head.min_scale))
        head.tril.weight.zero_()
        head.tril.bias.copy_(entries[head.rows, head.cols])


def test_elbo_is_below_log_evidence_and_the_gap_is_the_posterior_kl(linear_gaussian):
    vae, data = linear_gaussian
    torch.manual_seed(1)
    x = data.test
    log_px = data.exact.log_marginal(x)
    for _ in range(3):  # three random encoders
        for p in vae.guide_head.parameters():
            torch.nn.init.normal_(p, std=0.3)
        log_lik, log_prior, log_q = evaluation.log_weight_terms(vae, x, 400)
        log_w = (log_lik + log_prior - log_q).double()
        elbo = log_w.mean()
        stderr = (log_w.var(0).mean() / log_w.numel()).sqrt()  # 400 draws for each example
        gap = torch.distributions.kl_divergence(vae.posterior(x), data.exact.posterior(x)).detach()
        assert elbo <= log_px.mean() + Z * stderr
        assert gap.mean().item() > 10 * stderr  # a real gap, not noise
        # log p(x) − ELBO = KL(q ‖ p(z|x)), per example, averaged
        assert (log_px.mean() - elbo).item() == pytest.approx(gap.mean().item(), abs=Z * stderr.item())


def test_gap_vanishes_when_the_guide_is_the_exact_posterior(linear_gaussian):
    vae, data = linear_gaussian
    set_exact_posterior(vae, data.exact)
    x = data.test
    torch.manual_seed(2)
    log_lik, log_prior, log_q = evaluation.log_weight_terms(vae, x, 1)
    # with q = p(z|x), log p(x, z) − log q(z|x) = log p(x) for every z: even one draw is exact
    assert torch.allclose((log_lik + log_prior - log_q)[0], data.exact.log_marginal(x), atol=1e-4)
    gap = torch.distributions.kl_divergence(vae.posterior(x), data.exact.posterior(x))
    assert gap.abs().max().item() < 1e-5


def test_importance_sampled_log_likelihood_rises_toward_the_exact_log_evidence(linear_gaussian):
    vae, data = linear_gaussian
    torch.manual_seed(3)
    for p in vae.guide_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = data.test
    exact = data.exact.log_marginal(x).mean().item()
    results = [evaluation.evaluate(vae, x, num_samples=k) for k in (1, 10, 100, 2000)]
    lls = [r["log_likelihood"] for r in results]
    assert lls[-1] >= results[-1]["elbo"]
    assert all(a < b for a, b in zip(lls, lls[1:])), lls
    assert lls[-1] <= exact + Z * results[-1]["log_likelihood_stderr"] / 10
    assert exact - lls[-1] < 0.1 * (exact - lls[0])


def digits_vae(seed=0):
    spec = Spec.from_dict({"model": {"latent_dim": 4, "encoder": {"hidden": [64]}, "decoder": {"hidden": [64]}}})
    data = load_dataset(spec.data, seed)
    torch.manual_seed(seed)
    return VAE.from_spec(spec.model, data.data_dim, data.image_shape), data


def draws(elbo, vae, x, n, **kwargs):
    return torch.tensor([elbo.loss(vae.model, vae.guide, x, **kwargs) for _ in range(n)], dtype=torch.float64)


def test_trace_and_meanfield_agree_and_meanfield_varies_less():
    pyro.clear_param_store()
    vae, data = digits_vae()
    x = data.test[:64]
    torch.manual_seed(4)
    trace = draws(Trace_ELBO(max_plate_nesting=1), vae, x, 400)
    meanfield = draws(TraceMeanField_ELBO(max_plate_nesting=1), vae, x, 400)
    stderr = math.sqrt(trace.var() / 400 + meanfield.var() / 400)
    assert abs(trace.mean() - meanfield.mean()) < Z * stderr
    assert meanfield.var() < trace.var()


def test_minibatch_estimate_is_unbiased_for_the_full_data_elbo():
    pyro.clear_param_store()
    vae, data = digits_vae(seed=5)
    x = data.test
    n, batch = x.shape[0], 20
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    torch.manual_seed(6)
    with torch.no_grad():
        full = -draws(elbo, vae, x, 200).mean().item() / n
        full_se = draws(elbo, vae, x, 200).std().item() / n / math.sqrt(200)
        estimates = torch.tensor(
            [-elbo.loss(vae.model, vae.guide, x[torch.randperm(n)[:batch]], num_data=n) / n for _ in range(2000)],
            dtype=torch.float64,
        )
    stderr = math.sqrt(estimates.var().item() / len(estimates) + full_se**2)
    assert abs(estimates.mean().item() - full) < Z * stderr
    # the scaling matters: without num_data the batch sum is B/N of the total
    unscaled = -elbo.loss(vae.model, vae.guide, x[:batch]) / n
    assert abs(unscaled - full) > 0.5 * abs(full)
