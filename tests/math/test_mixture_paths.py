"""Which mixtures take the GEMM density: one (K, d) set of components or broadcast copies of it, nothing else."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.parts import mixtures
from pyro_vae.parts.mixtures import DiagonalNormalMixture, _unbroadcast

K, D = 5, 3


def test_unbroadcast_gives_the_core_of_broadcast_copies():
    core = torch.randn(K, D)
    assert torch.equal(_unbroadcast(core, core=2), core)
    for copies in (core.expand(4, K, D), core[None], core.expand(2, 1, K, D), core[None].expand(1, 4, K, D)[0]):
        got = _unbroadcast(copies, core=2)
        assert got is not None and got.shape == (K, D) and torch.equal(got, core)
    logits = torch.randn(K)
    assert torch.equal(_unbroadcast(logits.expand(6, K), core=1), logits)


def test_unbroadcast_refuses_distinct_entries_and_too_few_dims():
    core = torch.randn(K, D)
    assert _unbroadcast(core + torch.arange(4.0).reshape(4, 1, 1), core=2) is None  # a real (4, K, d) tensor
    assert _unbroadcast(torch.stack([core, core]).expand(3, 2, K, D), core=2) is None  # distinct along one dim
    assert _unbroadcast(core.expand(2, K, D).contiguous()[None].expand(4, 2, K, D), core=2) is None
    assert _unbroadcast(torch.randn(D), core=2) is None


def plain(loc, scale, logits):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


@pytest.mark.parametrize("distinct", ["loc", "scale", "logits"])
def test_one_distinct_parameter_per_batch_entry_takes_the_plain_density(distinct):
    """Each of μ, σ, logits alone differing between batch entries is enough to leave the GEMM density."""
    g = torch.Generator().manual_seed(0)
    shared = {
        "loc": torch.randn(K, D, generator=g),
        "scale": 0.5 + torch.rand(K, D, generator=g),
        "logits": torch.randn(K, generator=g),
    }
    params = {name: value.expand(4, *value.shape) for name, value in shared.items()}
    params[distinct] = params[distinct] + torch.rand(4, *shared[distinct].shape, generator=g)
    # Categorical normalizes the logits it is given: broadcast copies of them come from expand only
    mixing = dist.Categorical(logits=params["logits"] if distinct == "logits" else shared["logits"]).expand((4,))
    mixture = DiagonalNormalMixture(mixing, dist.Normal(params["loc"], params["scale"]).to_event(1))
    z = torch.randn(7, 4, D, generator=g)
    want = plain(params["loc"], params["scale"], params["logits"]).log_prob(z)
    assert torch.allclose(mixture.log_prob(z), want, atol=1e-5)


@pytest.mark.parametrize("batch", [(), (4,), (2, 4)])
def test_shared_components_take_the_gemm_density(batch, monkeypatch):
    """(K, d) components, or Pyro's broadcast copies of them, never call ``MixtureSameFamily.log_prob``."""
    g = torch.Generator().manual_seed(1)
    loc, scale, logits = (
        torch.randn(K, D, generator=g),
        0.5 + torch.rand(K, D, generator=g),
        torch.randn(K, generator=g),
    )
    fast = mixtures.gaussian_mixture(logits, dist.Normal(loc, scale).to_event(1)).expand(batch)
    z = torch.randn(6, *batch, D, generator=g)
    want = plain(loc, scale, logits).expand(batch).log_prob(z)

    def refused(self, value):
        raise AssertionError("the plain mixture density was used")

    monkeypatch.setattr(dist.MixtureSameFamily, "log_prob", refused)
    got = fast.log_prob(z)
    assert got.shape == (6, *batch) and torch.allclose(got, want, atol=1e-5)


def test_a_value_outside_the_support_is_refused_when_validating():
    mixture = mixtures.gaussian_mixture(torch.zeros(K), dist.Normal(torch.zeros(K, D), 1.0).to_event(1))
    with pytest.raises(ValueError):
        DiagonalNormalMixture(
            mixture.mixture_distribution, mixture.component_distribution, validate_args=True
        ).log_prob(torch.zeros(4, D + 1))
