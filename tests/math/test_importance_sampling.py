"""The importance-sampled log-likelihood of ``evaluate`` against the exact log p(x), and its diagnostics.

The package's VAE is made into the linear-Gaussian model (linear decoder W z + b,
Gaussian likelihood with σ fixed, standard-normal prior), with a full-covariance
guide set near the exact posterior N(A x + c, L Lᵀ) (its Cholesky factor 10 %
wider). Then every example's importance weights vary a little, the estimate's
bias −Var(w)/(2K) is far below its Monte Carlo error, and the paired
per-example difference to the exact log p(x) must be within 3 standard errors
of zero. An aggregation error (a missing −log K, a mean of weights taken in the
wrong space, a sum instead of a mean over examples) is many standard errors.
"""

import math

import pytest
import torch
from torch.nn.functional import softplus

from pyro_vae import evaluation
from pyro_vae.config.spec import load_spec
from pyro_vae.evaluation import diagnostics
from pyro_vae.infer.gaussian import LinearGaussian
from pyro_vae.model import VAE

D, d, NOISE = 5, 2, 0.5


pytestmark = pytest.mark.usefixtures("float64")


def linear_gaussian_vae(widen: float):
    lg = LinearGaussian.random(D, d, NOISE, torch.Generator().manual_seed(0))
    spec = load_spec(
        None,
        [
            f"model.latent_dim={d}",
            "model.encoder.hidden=[]",
            "model.decoder.hidden=[]",
            "model.guide.type=full-normal",
            "model.likelihood.type=gaussian",
            f"model.likelihood.scale={NOISE}",
        ],
    )
    vae = VAE.from_spec(spec.model, D)
    cov = lg.posterior_covariance()
    gain = cov @ lg.weight.T / NOISE**2
    chol = widen * torch.linalg.cholesky(cov)
    with torch.no_grad():
        decoder = vae.decoder.net[-1]
        decoder.weight.copy_(lg.weight), decoder.bias.copy_(lg.bias)
        head = vae.guide_head
        head.loc.weight.copy_(gain), head.loc.bias.copy_(-gain @ lg.bias)
        head.tril.weight.zero_()
        entries = chol[head.rows, head.cols].clone()
        diagonal = head.rows == head.cols
        entries[diagonal] = torch.log(torch.expm1(entries[diagonal] - head.min_scale))  # softplus⁻¹
        head.tril.bias.copy_(entries)
    assert torch.allclose(softplus(head.tril.bias[diagonal]) + head.min_scale, chol.diagonal())
    return lg, vae


def test_log_likelihood_is_within_three_paired_standard_errors_of_the_exact_log_px():
    lg, vae = linear_gaussian_vae(widen=1.1)
    x = lg.sample(400, torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    result = evaluation.evaluate(vae, x, num_samples=200, per_example=True)
    difference = result["per_example"]["log_likelihood"] - lg.log_marginal(x)
    se = difference.std() / math.sqrt(len(difference))
    assert 0 < se < 0.01  # near-posterior: a tight check
    assert abs(difference.mean()) < 3 * se
    assert result["log_likelihood"] == pytest.approx(lg.log_marginal(x).mean().item(), abs=3 * se.item() + 1e-9)
    # the ELBO's gap is KL(q ‖ p(z|x)) > 0, resolved at this precision
    assert (result["per_example"]["elbo"] - lg.log_marginal(x)).mean() < -10 * se
    assert result["ess"]["mean_fraction"] > 0.9 and result["log_likelihood_reliable"] is True


def test_a_poor_proposal_is_flagged_by_pareto_k():
    lg, vae = linear_gaussian_vae(widen=0.25)  # q far narrower than p(z|x): heavy-tailed weights
    x = lg.sample(100, torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    result = evaluation.evaluate(vae, x, num_samples=200)
    assert result["pareto_k"]["share_above_0.7"] > 0.5
    assert result["log_likelihood_reliable"] is False
    assert result["ess"]["p5_fraction"] < 0.2
    assert "Pareto k̂ > 0.7" in diagnostics.warning(result, "test")


def test_effective_sample_fraction_is_one_for_equal_weights_and_one_over_k_for_one_particle():
    equal = torch.zeros(10, 3)
    single = torch.full((10, 3), -1e4)
    single[4] = 0.0
    assert torch.allclose(diagnostics.effective_sample_fraction(equal), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(diagnostics.effective_sample_fraction(single), torch.full((3,), 0.1, dtype=torch.float64))
    two = torch.log(torch.tensor([[1.0], [3.0]]))  # (1 + 3)² / (1 + 9) / 2 = 0.8
    assert diagnostics.effective_sample_fraction(two).item() == pytest.approx(0.8)


def test_equal_weights_give_minus_infinite_pareto_k_and_a_reliable_log_likelihood():
    khat = diagnostics.pareto_k(torch.zeros(1000, 2))
    assert torch.equal(khat, torch.full((2,), -math.inf, dtype=torch.float64))
    summary = diagnostics.summarize(diagnostics.effective_sample_fraction(torch.zeros(1000, 2)), khat, 1000)
    assert summary["log_likelihood_reliable"] is True and summary["pareto_k"]["share_above_0.7"] == 0.0


def test_pareto_k_of_equal_and_varied_examples_side_by_side():
    log_w = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))
    log_w[:, 1] = 0.0  # all K weights equal
    log_w[:, 3] = torch.linspace(-5.0, 0.0, 1000).clamp(max=-1.0)  # the largest weights tied, the rest varied
    khat = diagnostics.pareto_k(log_w)
    assert khat[1] == -math.inf and khat[3] == -math.inf
    varied = diagnostics.pareto_k(log_w[:, [0, 2]])  # the same fit as without the equal examples
    assert torch.isfinite(varied).all() and torch.equal(khat[[0, 2]], varied)
    summary = diagnostics.summarize(diagnostics.effective_sample_fraction(log_w), khat, 1000)
    assert summary["log_likelihood_reliable"] is True and summary["pareto_k"]["max"] == varied.max().item()
