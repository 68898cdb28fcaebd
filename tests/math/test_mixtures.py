"""The GEMM density of diagonal-Gaussian mixtures (``mog``, ``vamp``) against the plain one."""

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.parts.mixtures import BLOCK_ROWS, DiagonalNormalMixture, gaussian_mixture


def parameters(K=30, d=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(K, d, generator=g, dtype=dtype).requires_grad_()
    scale = (0.05 + torch.rand(K, d, generator=g, dtype=dtype)).requires_grad_()
    logits = torch.randn(K, generator=g, dtype=dtype).requires_grad_()
    return loc, scale, logits


def plain(loc, scale, logits):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


def assert_density_and_gradients_match(got, want, parameters, weights=1.0):
    """The fast density equals the plain one, and so do the gradients of Σ weights · log p for ``parameters``."""
    assert got.shape == want.shape
    # float32 rounding of the plain formula: relative 1e-6 of the largest |log p|
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.detach().abs().max()))
    got_grads = torch.autograd.grad((weights * got).sum(), parameters)
    want_grads = torch.autograd.grad((weights * want).sum(), parameters)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.detach().abs().max()))


@pytest.mark.parametrize("value_shape", [(6,), (40, 6), (3, 40, 6)])
def test_density_and_gradients_match_the_plain_mixture(value_shape):
    loc, scale, logits = parameters()
    fast = gaussian_mixture(logits, dist.Normal(loc, scale).to_event(1))
    assert isinstance(fast, DiagonalNormalMixture)
    z = 2 * torch.randn(value_shape, generator=torch.Generator().manual_seed(1))
    assert_density_and_gradients_match(fast.log_prob(z), plain(loc, scale, logits).log_prob(z), (loc, scale, logits))


def test_values_of_several_blocks_keep_their_order_and_gradients():
    """More points than one block of rows (two full blocks and a partial one): each point gets its own density."""
    loc, scale, logits = parameters(K=7, d=3)
    fast = gaussian_mixture(logits, dist.Normal(loc, scale).to_event(1))
    z = 2 * torch.randn(2, 2 * BLOCK_ROWS + 5, 3, generator=torch.Generator().manual_seed(5))
    got = fast.log_prob(z)
    assert got.shape == z.shape[:-1]
    weights = torch.rand(z.shape[:-1], generator=torch.Generator().manual_seed(6))  # a different weight per point
    assert_density_and_gradients_match(got, plain(loc, scale, logits).log_prob(z), (loc, scale, logits), weights)


def test_a_plate_broadcast_keeps_the_fast_density():
    """Inside a plate Pyro expands p(z) to the batch: stride-0 copies of the same (K, d) parameters."""
    loc, scale, logits = parameters()
    fast = gaussian_mixture(logits, dist.Normal(loc, scale).to_event(1)).expand((40,))
    assert isinstance(fast, DiagonalNormalMixture) and fast.batch_shape == (40,)
    z = torch.randn(5, 40, 6, generator=torch.Generator().manual_seed(2))
    want = plain(loc, scale, logits).expand((40,)).log_prob(z)
    assert torch.allclose(fast.log_prob(z), want, rtol=0, atol=1e-5 * float(want.detach().abs().max()))
    # a value without the batch dimension broadcasts to it
    assert fast.log_prob(z[0, 0]).shape == (40,)


def test_distinct_parameters_per_batch_entry_use_the_plain_density():
    loc, scale, logits = (t.detach() for t in parameters())
    batched_loc = loc + torch.arange(4.0).reshape(4, 1, 1)  # a real (4, K, d) tensor, not a broadcast copy
    mixture = DiagonalNormalMixture(
        dist.Categorical(logits=logits.expand(4, -1)), dist.Normal(batched_loc, scale.expand(4, -1, -1)).to_event(1)
    )
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    want = plain(batched_loc, scale.expand(4, -1, -1), logits.expand(4, -1)).log_prob(z)
    assert torch.allclose(mixture.log_prob(z), want, rtol=0, atol=1e-5 * float(want.detach().abs().max()))


def test_small_scales_and_far_points_stay_accurate():
    """σ = 0.01 and |z| ~ 3: the expanded square cancels ~10⁶ per dimension; float64 keeps it below 1e-3 nats."""
    loc, scale, logits = (t.detach() for t in parameters(d=50))
    scale = torch.full_like(scale, 0.01)
    z = loc[:8] + 0.02 * torch.randn(8, 50, generator=torch.Generator().manual_seed(4))
    exact = plain(loc.double(), scale.double(), logits.double()).log_prob(z.double())
    got = gaussian_mixture(logits, dist.Normal(loc, scale).to_event(1)).log_prob(z)
    assert (got.double() - exact).abs().max() < 1e-3


def test_non_diagonal_components_keep_the_plain_mixture():
    loc = torch.zeros(3, 4)
    components = dist.LowRankMultivariateNormal(loc, torch.ones(3, 4, 1), torch.ones(3, 4))
    mixture = gaussian_mixture(torch.zeros(3), components)
    assert type(mixture) is dist.MixtureSameFamily
