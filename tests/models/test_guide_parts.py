"""How the guides are built and what they return: covariances, variance bounds, batch shapes, spec checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import softplus

from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.parts import guides

FEATURES, LATENT = 6, 3
BOUNDS = [-1.0, 0.5]  # every variance in [e^-1, e^0.5]


def built(kind: str, bounds: list[float] | None = BOUNDS) -> guides.Guide:
    torch.manual_seed(0)
    if kind == "diagonal":
        return guides.DiagonalNormal(FEATURES, LATENT, 0.01, bounds)
    if kind == "low-rank":
        return guides.LowRankNormal(FEATURES, LATENT, 2, 0.01, bounds)
    if kind == "full":
        return guides.FullNormal(FEATURES, LATENT, 0.01, bounds)
    return guides.InverseAutoregressive(FEATURES, LATENT, 2, [8], 0.01, bounds)


def spread_features() -> torch.Tensor:
    """Features that push the raw scales far both ways: some variances above e^0.5, some below e^-1."""
    return torch.cat([torch.full((1, FEATURES), 40.0), torch.full((1, FEATURES), -40.0), torch.zeros(1, FEATURES)])


@pytest.mark.parametrize("kind", ["diagonal", "low-rank", "full", "iaf"])
def test_every_guide_keeps_its_variances_within_the_bounds(kind):
    """The diagonal σ², the low-rank diagonal part, the Cholesky diagonal squared, the IAF's base σ²."""
    guide = built(kind)
    with torch.no_grad():
        for layer in guide.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.linspace(-1, 1, layer.weight.numel()).reshape(layer.weight.shape))
        q = guide.gaussian(spread_features())
        if kind == "low-rank":
            variance = q.cov_diag
        elif kind == "full":
            variance = q.scale_tril.diagonal(dim1=-2, dim2=-1) ** 2
        else:
            variance = q.variance
    low, high = math.exp(BOUNDS[0]), math.exp(BOUNDS[1])
    assert (variance >= low * (1 - 1e-5)).all() and (variance <= high * (1 + 1e-5)).all()
    assert torch.isclose(variance, torch.tensor(low)).any() and torch.isclose(variance, torch.tensor(high)).any()


def test_low_rank_covariance_is_f_f_transpose_plus_the_squared_diagonal():
    guide = built("low-rank", None)
    h = torch.randn(4, FEATURES)
    with torch.no_grad():
        q = guide.gaussian(h)
        factor = guide.factor(h).reshape(4, LATENT, 2)
        sigma = softplus(guide.raw_diag(h)) + 0.01
        want = factor @ factor.transpose(-1, -2) + torch.diag_embed(sigma**2)
    assert torch.allclose(q.covariance_matrix, want, atol=1e-5)
    assert torch.allclose(q.mean, guide.loc(h))


def test_full_normal_cholesky_factor_is_lower_triangular_with_the_positive_scale_on_its_diagonal():
    guide = built("full", None)
    h = torch.randn(4, FEATURES)
    with torch.no_grad():
        q = guide.gaussian(h)
        entries = guide.tril(h)
    rows, cols = torch.tril_indices(LATENT, LATENT)
    off = rows != cols
    assert torch.equal(q.scale_tril[:, rows[off], cols[off]], entries[:, off])
    assert torch.allclose(q.scale_tril.diagonal(dim1=-2, dim2=-1), softplus(entries[:, ~off]) + 0.01)
    assert torch.equal(q.scale_tril, q.scale_tril.tril())


def test_the_cholesky_indices_are_not_part_of_the_saved_state():
    """Rebuilt from the latent dim: a checkpoint holds the network's weights only."""
    keys = set(built("full").state_dict())
    assert keys == {"loc.weight", "loc.bias", "tril.weight", "tril.bias"}


@pytest.mark.parametrize("kind", ["diagonal", "low-rank", "full", "iaf"])
def test_features_with_several_batch_dims_give_a_guide_of_that_batch_shape(kind):
    """h of shape (K, B, features): q has batch shape (K, B) and event shape (d,), each row its own q."""
    guide = built(kind)
    h = torch.randn(5, 4, FEATURES)
    with torch.no_grad():
        q = guide.gaussian(h)
        assert q.batch_shape == (5, 4) and q.event_shape == (LATENT,)
        one = guide.gaussian(h[2, 1])
        assert torch.allclose(q.mean[2, 1], one.mean) and torch.allclose(q.variance[2, 1], one.variance)


def test_the_flow_guide_needs_two_latent_dimensions():
    with pytest.raises(UserInputError, match=r"^'model\.guide\.type' iaf needs model\.latent_dim >= 2"):
        guides.InverseAutoregressive(FEATURES, 1, 2, [8], 0.01)
    assert guides.InverseAutoregressive(FEATURES, 2, 2, [8], 0.01).base.loc.out_features == 2


def test_the_flow_guides_networks_have_the_hidden_widths_asked_for():
    guide = guides.InverseAutoregressive(FEATURES, LATENT, 3, [7, 9], 0.01)
    assert len(guide.flows) == 3
    for flow in guide.flows:
        assert [layer.out_features for layer in flow.nn.layers] == [7, 9, 2 * LATENT]


@pytest.mark.parametrize("rank", [1, 3])
def test_a_rank_up_to_the_latent_dim_is_accepted(rank):
    spec = load_spec(None, ["model.latent_dim=3", "model.guide.type=low-rank-normal", f"model.guide.rank={rank}"])
    assert spec.model.guide.options.rank == rank


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.latent_dim=3", "model.guide.type=low-rank-normal", "model.guide.rank=4"],
            "'model.guide.rank' is 4; it must be between 1 and model.latent_dim (3)",
        ),
        (
            ["model.guide.type=iaf", "model.guide.hidden=[]"],
            "'model.guide.hidden' is []; a iaf needs at least one hidden layer, e.g. [64]",
        ),
        (
            ["model.prior.type=flow", "model.prior.hidden=[]"],
            "'model.prior.hidden' is []; a flow needs at least one hidden layer, e.g. [64]",
        ),
    ],
)
def test_the_guide_options_refused_with_their_key_and_range(overrides, message):
    with pytest.raises(UserInputError) as info:
        load_spec(None, overrides)
    assert str(info.value) == message


@pytest.mark.parametrize("kind", ["diagonal", "low-rank", "full"])
def test_a_gaussian_guides_moments_are_its_mean_and_marginal_standard_deviations(kind):
    guide = built(kind)
    h = torch.randn(4, FEATURES)
    with torch.no_grad():
        mean, std = guide.moments(h)
        q = guide.gaussian(h)
        marginal = q.covariance_matrix.diagonal(dim1=-2, dim2=-1) if kind != "diagonal" else q.base_dist.scale**2
    assert torch.equal(mean, q.mean) and torch.allclose(std, marginal.sqrt())


def test_the_flow_guides_moments_are_those_of_its_draws():
    """No closed form: the mean and standard deviation over 256 draws of q (by default), per example."""
    guide = built("iaf")
    h = torch.randn(4, FEATURES)
    with torch.no_grad():
        for asked in ({}, {"num_samples": 50}):
            torch.manual_seed(8)
            mean, std = guide.moments(h, **asked)
            torch.manual_seed(8)
            z = guide(h).sample((asked.get("num_samples", 256),))
            assert mean.shape == std.shape == (4, LATENT)
            assert torch.equal(mean, z.mean(0)) and torch.equal(std, z.std(0))
