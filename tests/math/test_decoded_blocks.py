"""p(x | z) by blocks of rows (:mod:`pyro_vae.parts.decoded`) is the distribution of all of z at once.

Without gradients on a CPU, the model's observed site scores many draws block
by block, each block through the parts' own decoder and likelihood; every
entry must be what one call on all of z gives.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.parts import decoded
from pyro_vae.parts.decoded import DecodedInBlocks, _take, block_slices
from pyro_vae.parts.distributions import BernoulliImage
from pyro_vae.parts.networks import MLPDecoder

LATENT, DATA_DIM = 3, 12


@pytest.mark.parametrize(
    ("shape", "rows"),
    [((50, 3), 20), ((1, 45), 8), ((3, 4, 5), 6), ((7,), 3), ((2, 3), 100), ((4, 2, 3), 1), ((), 4)],
)
def test_blocks_cover_every_entry_once_in_order_and_hold_at_most_rows_entries_where_possible(shape, rows):
    seen = torch.zeros(shape, dtype=torch.long)
    order = torch.arange(seen.numel()).view(shape)
    last = -1
    for index in block_slices(torch.Size(shape), rows):
        block = order[index]
        assert block.numel() <= max(rows, 1)
        assert block.flatten()[0] == last + 1  # blocks follow each other in memory order
        last = int(block.flatten()[-1])
        seen[index] += 1
    assert bool((seen == 1).all())


def tanh_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, DATA_DIM))


def bernoulli(decoder: nn.Module):
    return lambda z: BernoulliImage(decoder(z))


def gaussian(decoder: nn.Module):
    return lambda z: dist.Normal(decoder(z), 0.7).to_event(1)


@pytest.mark.parametrize("likelihood", [bernoulli, gaussian])
@pytest.mark.parametrize(
    ("z_shape", "x_shape"),
    [
        ((40, 6, LATENT), (6, DATA_DIM)),  # K particles of B examples: blocks of particles
        ((1, 90, LATENT), (90, DATA_DIM)),  # one particle: blocks of examples
        ((3, 10, 4, LATENT), (4, DATA_DIM)),  # an enumerated dim before the particles
        ((3, 10, 4, LATENT), (1, 4, DATA_DIM)),  # a value with a dim of size 1 among the batch dims
        ((40, 6, LATENT), (40, 6, DATA_DIM)),  # a value of every row
    ],
)
def test_the_blocks_log_prob_is_the_whole_distribution_s(likelihood, z_shape, x_shape):
    decoder = tanh_network()
    make = likelihood(decoder)
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(z_shape, generator=generator)
    x = torch.bernoulli(torch.full(x_shape, 0.3), generator=generator)
    with torch.no_grad():
        blocked = DecodedInBlocks.of(make, z, rows=7)
        assert isinstance(blocked, DecodedInBlocks)
        assert blocked.batch_shape == z.shape[:-1] and blocked.event_shape == (DATA_DIM,)
        expected = make(z).log_prob(x)
        got = blocked.log_prob(x)
    assert got.shape == expected.shape == z.shape[:-1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("value_shape", "index", "expected"),
    [
        ((1, 10, 4, 2), (2, 5, slice(0, 3)), (0, 5, slice(0, 3))),  # a size-1 dim at an int: dropped, as z's is
        ((1, 4, 2), (2, slice(5, 6)), (slice(None),)),  # a size-1 dim at a slice: kept whole, size 1
        ((10, 1, 2), (2, slice(5, 6)), (slice(5, 6),)),  # a dim the value lacks (the first) is skipped
    ],
)
def test_a_block_of_the_value_broadcasts_against_the_block_of_z_as_the_whole_did(value_shape, index, expected):
    value = torch.arange(torch.Size(value_shape).numel(), dtype=torch.float32).view(value_shape)
    got = _take(value, index, batch_dims=3, event_dims=1)
    assert got.shape == value[expected].shape and torch.equal(got, value[expected])


def test_z_of_one_batch_dim_is_taken_in_blocks_and_another_device_whole():
    decoder = tanh_network()
    make = bernoulli(decoder)
    z, x = torch.randn(100, LATENT), torch.ones(DATA_DIM)
    with torch.no_grad():
        blocked = DecodedInBlocks.of(make, z, rows=7)
        assert isinstance(blocked, DecodedInBlocks)
        torch.testing.assert_close(blocked.log_prob(x), make(z).log_prob(x), rtol=0, atol=1e-5)

        def normal(block):
            return dist.Normal(block, 1.0, validate_args=False).to_event(1)

        elsewhere = torch.empty(100, 3, LATENT, device="meta")  # not a CPU: one launch per kernel
        assert not isinstance(DecodedInBlocks.of(normal, elsewhere, rows=7), DecodedInBlocks)


def test_a_block_s_decoder_sees_only_its_rows():
    calls = []
    decoder = tanh_network()

    def make(z):
        calls.append(z.shape[:-1].numel())
        return BernoulliImage(decoder(z))

    z, x = torch.randn(30, 4, LATENT), torch.ones(4, DATA_DIM)
    with torch.no_grad():
        DecodedInBlocks.of(make, z, rows=8).log_prob(x)
    assert calls[0] == 1  # the probe of one row for the shapes
    assert max(calls[1:]) <= 8 and sum(calls[1:]) == 120


def test_the_whole_distribution_is_used_where_blocks_would_not_help():
    decoder = tanh_network()
    make = bernoulli(decoder)
    z = torch.randn(20, 3, LATENT)
    assert isinstance(DecodedInBlocks.of(make, z, rows=5), BernoulliImage)  # a gradient is recorded
    with torch.no_grad():
        assert isinstance(DecodedInBlocks.of(make, z, rows=60), BernoulliImage)  # all rows fit in one block
        assert isinstance(DecodedInBlocks.of(make, z, rows=5), DecodedInBlocks)

        def broadcasting(block):  # a likelihood whose batch shape is not the rows': scored whole
            return dist.Normal(decoder(block).unsqueeze(0).expand(2, *block.shape[:-1], DATA_DIM), 1.0).to_event(1)

        assert isinstance(DecodedInBlocks.of(broadcasting, z, rows=5), dist.Independent)


def test_everything_but_log_prob_is_the_whole_distribution_s():
    decoder = tanh_network()
    make = bernoulli(decoder)
    z = torch.randn(20, 3, LATENT)
    with torch.no_grad():
        blocked = DecodedInBlocks.of(make, z, rows=5)
        whole = make(z)
        torch.testing.assert_close(blocked.mean, whole.mean)
        torch.testing.assert_close(blocked.variance, whole.variance)
        assert blocked.sample((2,)).shape == (2, 20, 3, DATA_DIM)
        wider = blocked.expand(torch.Size([4, 20, 3]))
        assert isinstance(wider, DecodedInBlocks) and wider.rows == blocked.rows
        x = torch.ones(DATA_DIM)
        torch.testing.assert_close(wider.log_prob(x), make(z.expand(4, 20, 3, LATENT)).log_prob(x))
        other = torch.ones(2, 20, 3, DATA_DIM)  # a value with more batch dims: scored by the whole distribution
        torch.testing.assert_close(blocked.log_prob(other), whole.log_prob(other))


def test_the_default_block_is_used_by_the_vae_s_model():
    from pyro_vae.config.spec import load_spec
    from pyro_vae.model import VAE

    spec = load_spec(None, [f"model.latent_dim={LATENT}", "model.encoder.hidden=[5]", "model.decoder.hidden=[5]"])
    vae = VAE.from_spec(spec.model, DATA_DIM)
    with torch.no_grad():
        many = vae.likelihood_distribution(torch.randn(decoded.ROWS + 1, 1, LATENT))
        few = vae.likelihood_distribution(torch.randn(decoded.ROWS, 1, LATENT))
    assert isinstance(many, DecodedInBlocks) and not isinstance(few, DecodedInBlocks)


@pytest.mark.parametrize("hidden", [[8], [8, 6], [8, 6, 5]])
@pytest.mark.parametrize("shape", [(5, LATENT), (4, 3, LATENT), (2, 3, 4, LATENT)])
def test_the_tanh_decoder_without_gradients_is_the_network_as_sigmoids(hidden, shape):
    """tanh(a) = 2σ(2a) − 1 folded into each layer's addmm: the same function as the tanh network."""
    torch.manual_seed(3)
    decoder = MLPDecoder(LATENT, hidden, DATA_DIM, "tanh")
    z = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), decoder.net(z), rtol=0, atol=2e-6)
        wide = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)  # not contiguous
        torch.testing.assert_close(decoder(wide), decoder.net(wide), rtol=0, atol=2e-6)
