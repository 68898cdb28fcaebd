"""The estimators for discrete sites against their definitions, on a VAE of 3 binary units where every
expectation is a finite sum: the exact ELBO, IWAE-K bound and wake-sleep direction, and their gradients,
by enumerating the 2^3 configurations (2^(3K) for K particles)."""

import itertools
import math
import re

import pyro
import pytest
import torch

import pyro_vae  # noqa: F401  (fills the registry)
from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.evaluation.compare import measure
from pyro_vae.evaluation.estimator_tokens import parse_token
from pyro_vae.evaluation.gradient_stats import Moments, flat_gradient
from pyro_vae.infer.discrete_estimators import leave_one_out_signals
from pyro_vae.infer.estimators import bound_and_backward
from pyro_vae.model import VAE
from pyro_vae.parts.discrete import BernoulliUnits

UNITS, DATA_DIM, BATCH, NUM_DATA = 3, 5, 2, 6  # NUM_DATA / BATCH = 3: the subsampling scale is exercised
GROUPS, COPIES = 40, 50  # 2000 draws of the gradient, in 40 calls
Z = 5.0  # each coordinate within Z standard errors of the exact gradient


def small_vae(guide: str = "bernoulli", units: int = UNITS) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    spec = load_spec(
        None,
        [
            f"model.latent_dim={units}",
            "model.prior.type=bernoulli",
            f"model.guide.type={guide}",
            "model.encoder.hidden=[4]",
            "model.decoder.hidden=[4]",
        ],
    )
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 1.0]])
    vae = VAE.from_spec(spec.model, DATA_DIM, None, x)
    with torch.no_grad():  # a guide far from uniform, so the gradients are not small
        for p in vae.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return vae, x


def estimator(token: str, **options):
    """The estimator of a ``pyro-vae compare`` token, with ``options`` its own ``inference`` keys."""
    choice = parse_token(token)
    base = load_spec(None, [f"inference.estimator={choice.name}"] + [f"inference.{k}={v}" for k, v in options.items()])
    return choice.build(base.inference)


def configurations() -> torch.Tensor:
    return BernoulliUnits(torch.zeros(UNITS)).enumerate_support(expand=False)  # (2^d, d)


def exact_terms(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log q(z|x_b) and log w(z, x_b) = log p(x_b, z) − log q(z|x_b) for every configuration z, each (2^d, B)."""
    z = configurations()[:, None, :]
    log_q = vae.posterior(x).log_prob(z)
    log_p = vae.prior_distribution().log_prob(z) + vae.likelihood_distribution(z).log_prob(x)
    return log_q, log_p - log_q


def tuples(k: int) -> torch.Tensor:
    """Every K-tuple of configuration indices, (2^(dK), K)."""
    return torch.tensor(list(itertools.product(range(2**UNITS), repeat=k)))


def exact_elbo(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """(N/B) Σ_b Σ_z q(z|x_b) log w(z, x_b)."""
    log_q, log_w = exact_terms(vae, x)
    return NUM_DATA / BATCH * (log_q.exp() * log_w).sum()


def exact_iwae(vae: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """(N/B) Σ_b E[log (1/K) Σ_k w_k], the expectation over K independent draws as a sum over K-tuples."""
    log_q, log_w = exact_terms(vae, x)
    index = tuples(k)
    bound = torch.logsumexp(log_w[index], dim=1) - math.log(k)  # (T, B)
    return NUM_DATA / BATCH * (log_q[index].sum(1).exp() * bound).sum()


def exact_rws_surrogate(vae: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """A function whose gradient is RWS's expected one: θ by E[IWAE-K]'s, φ by E[Σ_k w̃_k ∇ log q(z_k)]."""
    log_q, log_w = exact_terms(vae, x)
    index = tuples(k)
    chance = log_q[index].sum(1).exp().detach()
    log_w_theta = (log_w + log_q - log_q.detach())[index]  # log p − log qᵈ: no φ gradient through q
    bound = torch.logsumexp(log_w_theta, dim=1) - math.log(k)
    wake_phi = (torch.softmax(log_w[index].detach(), dim=1) * log_q[index]).sum(1)
    return NUM_DATA / BATCH * (chance * (bound + wake_phi)).sum()


def exact_gradient(vae: VAE, objective: torch.Tensor) -> torch.Tensor:
    vae.zero_grad(set_to_none=True)
    objective.backward()
    gradient = flat_gradient(list(vae.parameters())).clone()
    vae.zero_grad(set_to_none=True)
    return gradient


def sampled_gradients(vae: VAE, x: torch.Tensor, elbo, groups: int = GROUPS, copies: int = COPIES) -> Moments:
    """Mean and variance over ``groups`` of the estimator's gradient of the bound (−loss), each group the average
    of ``copies`` independent draws: one call on the batch repeated ``copies`` times (each copy draws its own z),
    the plate scaled to ``copies`` · N examples, divided by ``copies``."""
    pyro.set_rng_seed(1)
    moments = Moments()
    batch = x.repeat(copies, 1)
    for _ in range(groups):
        vae.zero_grad(set_to_none=True)
        bound_and_backward(elbo, vae.model, vae.guide, batch, num_data=NUM_DATA * copies)
        moments.add(-flat_gradient(list(vae.parameters())) / copies)
    vae.zero_grad(set_to_none=True)
    return moments


def assert_within_standard_errors(moments: Moments, exact: torch.Tensor) -> None:
    error = (moments.mean - exact.double()).abs()
    standard_error = (moments.variance / moments.count).sqrt()
    worst = int(torch.argmax(error / (standard_error + 1e-12)))
    assert bool((error <= Z * standard_error + 1e-5 * (1 + exact.abs().double())).all()), (
        f"coordinate {worst}: mean {moments.mean[worst]:.4f}, exact {exact[worst]:.4f}, "
        f"standard error {standard_error[worst]:.4f}"
    )
    assert bool((standard_error > 0).any()), "no coordinate varies: the draws did not differ"


@pytest.mark.parametrize("baseline, particles", [("none", 1), ("average", 1), ("neural", 1), ("neural", 2)])
def test_tracegraph_with_each_baseline_is_unbiased_for_the_elbo_gradient(baseline, particles):
    vae, x = small_vae()
    exact = exact_gradient(vae, exact_elbo(vae, x))
    elbo = estimator("tracegraph", baseline=baseline, num_particles=particles)
    assert_within_standard_errors(sampled_gradients(vae, x, elbo), exact)
    if baseline != "none":  # a plain number: nothing of the draws it was averaged from (Pyro's provenance) is kept
        assert type(elbo.averages["z"]) is torch.Tensor


def test_trace_is_unbiased_for_the_elbo_gradient():
    vae, x = small_vae()
    exact = exact_gradient(vae, exact_elbo(vae, x))
    assert_within_standard_errors(sampled_gradients(vae, x, estimator("trace")), exact)


def test_vimco_is_unbiased_for_the_iwae_gradient():
    vae, x = small_vae()
    exact = exact_gradient(vae, exact_iwae(vae, x, 3))
    assert_within_standard_errors(sampled_gradients(vae, x, estimator("vimco:3")), exact)


def test_rws_follows_its_definition_in_expectation():
    vae, x = small_vae()
    exact = exact_gradient(vae, exact_rws_surrogate(vae, x, 3))
    assert_within_standard_errors(sampled_gradients(vae, x, estimator("rws:3")), exact)


def test_the_particle_estimators_report_the_iwae_bound():
    vae, x = small_vae()
    with torch.no_grad():
        exact = exact_iwae(vae, x, 2).item()
    batch = x.repeat(COPIES, 1)
    for token in ("vimco:2", "rws:2"):
        elbo = estimator(token)
        pyro.set_rng_seed(2)
        values = torch.tensor(
            [-elbo.loss(vae.model, vae.guide, batch, num_data=NUM_DATA * COPIES) / COPIES for _ in range(GROUPS)]
        )
        assert abs(values.mean().item() - exact) <= Z * values.std().item() / math.sqrt(GROUPS), token


def test_enum_gives_the_exact_elbo_and_its_gradient_without_noise():
    vae, x = small_vae()
    exact_value = exact_elbo(vae, x)
    exact = exact_gradient(vae, exact_value)
    elbo = estimator("enum")
    vae.zero_grad(set_to_none=True)
    loss = bound_and_backward(elbo, vae.model, vae.guide, x, num_data=NUM_DATA)
    gradient = -flat_gradient(list(vae.parameters()))
    assert torch.allclose(-loss, exact_value.detach(), rtol=1e-5)
    assert torch.allclose(gradient, exact, rtol=1e-4, atol=1e-5)


def test_leave_one_out_signal_replaces_each_weight_by_the_geometric_mean_of_the_others():
    log_w = torch.tensor([[0.0, -1.0], [-2.0, 0.5], [1.0, -3.0]])  # (K = 3, B = 2)
    signals = leave_one_out_signals(log_w, dim=0)
    for k in range(3):
        others = torch.cat([log_w[:k], log_w[k + 1 :]])
        replaced = torch.cat([log_w[:k], others.mean(0, keepdim=True), log_w[k + 1 :]])
        expected = torch.logsumexp(log_w, 0) - torch.logsumexp(replaced, 0)
        assert torch.allclose(signals[k], expected)


def test_a_baseline_lowers_the_encoder_gradient_variance():
    vae, x = small_vae()
    variance = {}
    for baseline in ("none", "average", "neural"):
        row = measure(estimator("tracegraph", baseline=baseline), vae, x, NUM_DATA, repeats=20, seed=0)
        variance[baseline] = row["grad_var_encoder"]
    assert variance["average"] < 0.5 * variance["none"]
    assert variance["neural"] < 0.5 * variance["none"]


def test_enum_refuses_a_layer_too_wide_to_sum_out_in_one_line():
    vae, x = small_vae(units=12)
    with pytest.raises(UserInputError, match=r"^estimator 'enum' cannot sum out site 'z' .*event shape \(12,\)"):
        bound_and_backward(estimator("enum"), vae.model, vae.guide, x, num_data=NUM_DATA)


@pytest.mark.parametrize(
    "token", ["meanfield", "dreg:2", "stl", "iwae:2", "renyi:2:0.5", "tail-adaptive:2", "piwae:2:2"]
)
def test_a_reparameterized_estimator_refuses_a_discrete_site_naming_it_and_the_alternatives(token):
    vae, x = small_vae()
    elbo = estimator(token)
    message = (
        f"{type(elbo).__name__} needs reparameterized latent sites; site 'z' (BernoulliUnits) is discrete: "
        "use one of trace, tracegraph, vimco:K, rws:K, enum, or model.guide.type: relaxed-bernoulli"
    )
    with pytest.raises(UserInputError, match=f"^{re.escape(message)}$"):
        bound_and_backward(elbo, vae.model, vae.guide, x, num_data=NUM_DATA)


def test_the_neural_baseline_leaves_the_draws_of_the_run_as_they_are():
    vae, x = small_vae()
    losses = {}
    for baseline in ("average", "neural"):
        elbo = estimator("tracegraph", baseline=baseline)
        pyro.set_rng_seed(3)
        losses[baseline] = [bound_and_backward(elbo, vae.model, vae.guide, x, num_data=NUM_DATA) for _ in range(3)]
        vae.zero_grad(set_to_none=True)
    assert losses["average"] == losses["neural"]
