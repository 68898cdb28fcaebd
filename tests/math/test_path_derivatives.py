"""STL and DReG through the package's own VAE, for every guide, against the path derivative built by hand.

The path derivative of log w = log p(x|z) + β [log p(z) − log q_φ(z|x)] is its
gradient through z = g_φ(ε) only, with the parameters of q held fixed. The
reference computes exactly that: the live guide draws z (so z depends on φ),
and log q is evaluated by a frozen deep copy of the encoder and guide head at
that live z. Both sides use the same ε (the same seed), so they agree to
float64 rounding; a dropped detach, a missing square or a wrong weight does not.
"""

import copy

import pyro
import pytest
import torch

from pyro_vae.config.spec import load_spec
from pyro_vae.infer.estimators import STL_ELBO, DReG_ELBO, bound_and_backward
from pyro_vae.model import VAE

GUIDES = ["diagonal-normal", "low-rank-normal", "full-normal", "iaf"]
B, N, D = 6, 60, 10


pytestmark = pytest.mark.usefixtures("float64")


GUIDE_KEYS = {"low-rank-normal": ["model.guide.rank=2"], "iaf": ["model.guide.hidden=[8]"]}  # each part's own keys


def setup(guide: str, kl_weight: float):
    torch.manual_seed(0)
    spec = load_spec(
        None,
        [
            "model.latent_dim=3",
            "model.encoder.hidden=[16]",
            "model.decoder.hidden=[16]",
            f"model.guide.type={guide}",
            *GUIDE_KEYS.get(guide, []),
        ],
    )
    vae = VAE.from_spec(spec.model, D)
    x = torch.bernoulli(torch.full((B, D), 0.4), generator=torch.Generator().manual_seed(1))
    return vae, x


def reference(vae: VAE, x: torch.Tensor, k: int, kl_weight: float, seed: int, power: int):
    """−(N/B) Σ_b Σ_k c_kb · log w_kb(z_kb(φ)) with log q frozen, c = (1 − β) w̃ + β w̃^power (power 1: STL)."""
    frozen = copy.deepcopy(vae)
    for p in frozen.parameters():
        p.requires_grad_(False)
    pyro.set_rng_seed(seed)
    z = vae.posterior(x).rsample((k,))  # live: depends on φ
    log_q = frozen.posterior(x).log_prob(z)
    log_w = vae.likelihood_distribution(z).log_prob(x) + kl_weight * (vae.prior_distribution().log_prob(z) - log_q)
    weights = torch.softmax(log_w.detach(), 0)
    c = (1 - kl_weight) * weights + kl_weight * weights**power
    return -(N / B) * (c * log_w).sum()


def gradients(vae: VAE, loss_or_elbo, x, seed, kl_weight: float = 1.0):
    params = vae.encoder_parameters()
    if isinstance(loss_or_elbo, torch.Tensor):
        return torch.autograd.grad(loss_or_elbo, params, allow_unused=True)
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    bound_and_backward(loss_or_elbo, vae.model, vae.guide, x, num_data=N, kl_weight=kl_weight)
    return [p.grad for p in params]


def flat(grads):
    return torch.cat([torch.zeros(1) if g is None else g.flatten() for g in grads])


@pytest.mark.parametrize("guide", GUIDES)
def test_stl_is_the_path_derivative(guide):
    vae, x = setup(guide, 1.0)
    ours = flat(gradients(vae, STL_ELBO(1), x, seed=3))
    ref = flat(gradients(vae, reference(vae, x, 1, 1.0, seed=3, power=1), x, seed=3))
    assert ours.abs().max() > 1e-6
    assert torch.allclose(ours, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kl_weight", [1.0, 0.5])
@pytest.mark.parametrize("guide", GUIDES)
def test_dreg_is_the_weighted_path_derivative(guide, kl_weight):
    vae, x = setup(guide, kl_weight)
    ours = flat(gradients(vae, DReG_ELBO(4), x, seed=4, kl_weight=kl_weight))
    ref = flat(gradients(vae, reference(vae, x, 4, kl_weight, seed=4, power=2), x, seed=4))
    assert ours.abs().max() > 1e-6
    assert torch.allclose(ours, ref, rtol=1e-8, atol=1e-10)
