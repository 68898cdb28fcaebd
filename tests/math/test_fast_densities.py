"""The parts' distributions: without gradients, the grouped and one-pass densities equal the plain ones.

:mod:`pyro_vae.parts.distributions`: Σ_d log σ(s_d l_d) as logs of grouped
products (at most 64 factors each, the rare underflowing rows recomputed with
``logsigmoid``), the diagonal Gaussian in one pass; with gradients, binary or
not, Pyro's own ``log_prob``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits, logsigmoid

from pyro_vae.parts import distributions
from pyro_vae.parts.distributions import BernoulliImage, DiagonalNormal


def plain_bernoulli(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_d log Bernoulli(x_d | l_d) in float64, x broadcast against the logits."""
    logits, x = torch.broadcast_tensors(logits.double(), x.double())
    return -binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


@pytest.mark.parametrize(
    ("dim", "largest", "expected"),
    [(784, 64, 56), (64, 64, 64), (97, 64, 1), (65, 64, 13), (6, 64, 6), (1, 64, 1), (12, 5, 4), (98, 8, 7)],
)
def test_group_size_is_the_largest_divisor_within_the_bound(dim, largest, expected):
    assert distributions.group_size(dim, largest) == expected


def test_group_size_defaults_to_groups_of_at_most_64():
    assert distributions.group_size(128) == 64 and distributions.group_size(130) == 26


def test_is_binary_only_for_zeros_and_ones():
    assert distributions.is_binary(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert distributions.is_binary(torch.zeros(3)) and distributions.is_binary(torch.ones(3))
    for other in ([0.0, 0.5], [1.0, 2.0], [0.0, -1.0], [2.0, 2.0]):
        assert not distributions.is_binary(torch.tensor(other)), other
    assert isinstance(distributions.is_binary(torch.ones(2)), bool)


@pytest.mark.parametrize("dim", [784, 392, 200, 97, 30, 12, 9, 8, 2, 1])
def test_sum_of_log_sigmoids_for_every_width(dim):
    """Widths with no, one, two or three halvings before the groups, short and long rows."""
    torch.manual_seed(dim)
    t = torch.randn(5, dim) * 3
    want = logsigmoid(t.double()).sum(-1)
    got = distributions._sum_log_sigmoid(t.clone(), lambda index: t[index])
    assert got.shape == (5,)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


def test_only_rows_where_a_group_underflows_are_recomputed():
    """Groups of 56 logits for D = 784 (8 pairwise factors, then 7): −84 nats per group stays normal, −112 does not.

    Row 0: log σ = −1.5 for every logit (−84 per group); row 1: log σ = −2 (−112 per group); row 2: −2 on the logits
    of one group only (positions i + 98k, i < 7), log σ ≈ 0 elsewhere. Rows 1 and 2 are recomputed, row 0 is not.
    """
    rows = torch.full((3, 784), 20.0)
    rows[0] = torch.log(torch.expm1(torch.tensor(1.5))).neg()  # log σ(t) = −1.5
    rows[1] = torch.log(torch.expm1(torch.tensor(2.0))).neg()
    one_group = (torch.arange(7)[:, None] + 98 * torch.arange(8)).flatten()
    rows[2, one_group] = rows[1, 0]
    asked = []

    def recompute(index):
        asked.append(index.clone())
        return rows[index]

    got = distributions._sum_log_sigmoid(rows.clone(), recompute)
    assert len(asked) == 1 and asked[0].tolist() == [1, 2]
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), logsigmoid(rows.double()).sum(-1), rtol=1e-5)


def test_no_row_is_recomputed_where_every_group_stays_normal():
    torch.manual_seed(7)
    t = torch.randn(4, 784)
    asked = []
    distributions._sum_log_sigmoid(t.clone(), lambda index: asked.append(index) or t[index])
    assert asked == []


def test_underflowing_rows_of_a_broadcast_batch_keep_their_place():
    """(K, B, D) logits against (B, D) data and the reverse, with confidently wrong rows among them."""
    torch.manual_seed(1)
    x = torch.bernoulli(torch.full((4, 64), 0.5))
    logits = torch.randn(3, 4, 64)
    logits[1, 2] = 30 * (1 - 2 * x[2])  # every logit wrong by 30: −1920 nats
    logits[2, 0] = 30 * (1 - 2 * x[0])
    for lo, v in ((logits, x), (logits[1], x.expand(3, 4, 64)), (logits[:, None], x.expand(2, 4, 64))):
        want = plain_bernoulli(lo, v)
        got = distributions.bernoulli_log_prob(lo, v)
        assert got.shape == want.shape
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    assert distributions.bernoulli_log_prob(logits, x)[1, 2] < -1900


def test_bernoulli_image_without_gradients_equals_the_plain_density():
    torch.manual_seed(2)
    logits = torch.randn(6, 5, 40) * 4
    x = torch.bernoulli(torch.full((5, 40), 0.3))
    q = BernoulliImage(logits)
    assert q.event_shape == (40,) and q.batch_shape == (6, 5)
    assert torch.equal(q.logits, logits)
    with torch.no_grad():
        assert torch.allclose(q.log_prob(x).double(), plain_bernoulli(logits, x), rtol=1e-5, atol=1e-4)


def test_bernoulli_image_with_gradients_is_pyros_density_and_gradient():
    torch.manual_seed(3)
    logits = (torch.randn(4, 30) * 3).requires_grad_()
    x = torch.bernoulli(torch.full((4, 30), 0.5))
    value = BernoulliImage(logits).log_prob(x)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.allclose(value.double(), plain_bernoulli(logits.detach(), x), rtol=1e-6, atol=1e-5)
    assert torch.allclose(grad, x - torch.sigmoid(logits.detach()), atol=1e-6)
    assert torch.equal(logits.detach(), logits.data)  # the logits are not overwritten


def test_grey_levels_take_the_plain_formula():
    """Values in (0, 1) are not binary: −BCE(l, x), whose sign trick would not hold."""
    torch.manual_seed(4)
    logits, grey = torch.randn(3, 16), torch.rand(3, 16)
    with torch.no_grad():
        got = BernoulliImage(logits, validate_args=False).log_prob(grey)
    assert torch.allclose(got.double(), plain_bernoulli(logits, grey), rtol=1e-5, atol=1e-5)


def test_validation_is_the_callers_choice_and_survives_expand():
    logits = torch.zeros(2, 8)
    for validate in (True, False):
        for q in (BernoulliImage(logits, validate_args=validate), DiagonalNormal(logits, logits + 1, validate)):
            expanded = q.expand((3, 2))
            assert type(expanded) is type(q)
            assert expanded.batch_shape == (3, 2) and expanded.event_shape == (8,)
            for each in (q, expanded):
                assert each._validate_args is validate and each.base_dist._validate_args is validate
    nan = torch.tensor([[float("nan"), 0.0]])
    BernoulliImage(nan, validate_args=False), DiagonalNormal(nan, nan, validate_args=False)  # parameters not checked
    with pytest.raises(ValueError):
        BernoulliImage(nan, validate_args=True)
    with pytest.raises(ValueError):
        DiagonalNormal(nan, nan, validate_args=True)
    with torch.no_grad(), pytest.raises(ValueError):  # a value of one entry for 8 dims: refused, not broadcast
        BernoulliImage(logits, validate_args=True).log_prob(torch.ones(2, 1))
    with torch.no_grad(), pytest.raises(ValueError):
        DiagonalNormal(logits, logits + 1, validate_args=True).log_prob(torch.ones(2, 1))


def test_expanded_distributions_score_as_the_originals():
    torch.manual_seed(5)
    logits, loc, scale = torch.randn(1, 12), torch.randn(1, 12), torch.rand(1, 12) + 0.5
    x = torch.bernoulli(torch.full((4, 12), 0.5))
    with torch.no_grad():
        bern = BernoulliImage(logits).expand((4,))
        assert torch.allclose(bern.log_prob(x).double(), plain_bernoulli(logits, x), rtol=1e-5)
        normal = DiagonalNormal(loc, scale).expand((4,))
        want = torch.distributions.Normal(loc, scale).log_prob(x).sum(-1)
        assert torch.allclose(normal.log_prob(x), want, rtol=1e-5)


def test_diagonal_normal_is_the_plain_density_with_and_without_gradients():
    torch.manual_seed(6)
    loc, scale = torch.randn(5, 3), (torch.rand(5, 3) + 0.2).requires_grad_()
    z = torch.randn(7, 5, 3)
    q = DiagonalNormal(loc, scale)
    assert q.event_shape == (3,) and q.batch_shape == (5,)
    want = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    with torch.no_grad():
        assert torch.allclose(q.log_prob(z), want, rtol=1e-5, atol=1e-5)
    got = q.log_prob(z)
    assert got.requires_grad
    (grad,) = torch.autograd.grad(got.sum(), scale)
    (want_grad,) = torch.autograd.grad(want.sum(), scale)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_blocks_of_the_bernoulli_density_give_the_same_rows_as_one_block():
    """(K, B, D) logits of more than BLOCK_BYTES go through in blocks of particles: every row bit for bit as one
    block, an underflowing row recomputed in its own block's place."""
    torch.manual_seed(7)
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    rows = distributions.BLOCK_BYTES // (3 * 784 * 4)
    logits = torch.randn(2 * rows + 5, 3, 784)
    logits[rows + 2, 1] = 30 * (1 - 2 * x[1])  # confidently wrong in the second block: −23,520 nats
    whole = distributions._block_log_prob(logits, x * 2 - 1, logits.shape)
    got = distributions.bernoulli_log_prob(logits, x)
    assert got.shape == (2 * rows + 5, 3)
    assert torch.equal(got, whole)
    assert torch.allclose(got.double(), plain_bernoulli(logits, x), rtol=1e-5, atol=1e-3)
    assert got[rows + 2, 1] < -23000


def test_one_unbatched_image_without_gradients_is_the_plain_density():
    """Logits and value of shape (D,): no batch dim to block over, one row scored as is."""
    torch.manual_seed(8)
    logits, x = torch.randn(784) * 3, torch.bernoulli(torch.full((784,), 0.3))
    with torch.no_grad():
        got = BernoulliImage(logits).log_prob(x)
    assert got.shape == ()
    assert torch.allclose(got.double(), plain_bernoulli(logits, x), rtol=1e-6)


def test_blocks_keep_the_logits_dtype():
    """float64 logits in several blocks: every row in float64, not rounded through a float32 buffer."""
    torch.manual_seed(9)
    x = torch.bernoulli(torch.full((2, 784), 0.3))
    rows = distributions.BLOCK_BYTES // (2 * 784 * 8)
    logits = torch.randn(2 * rows + 3, 2, 784, dtype=torch.float64)
    got = distributions.bernoulli_log_prob(logits, x.double())
    assert got.dtype == torch.float64
    assert torch.allclose(got, plain_bernoulli(logits, x), rtol=1e-12, atol=1e-9)


def test_blocks_stay_on_the_logits_device_whatever_the_default_device():
    """The blocked rows are written into a tensor on the logits' device, not on torch's default device."""
    torch.manual_seed(10)
    x = torch.bernoulli(torch.full((2, 784), 0.3))
    logits = torch.randn(2 * distributions.BLOCK_BYTES // (2 * 784 * 4) + 3, 2, 784)
    want = distributions._block_log_prob(logits, x * 2 - 1, logits.shape)
    with torch.device("meta"):
        got = distributions.bernoulli_log_prob(logits, x)
    assert got.device == logits.device and torch.equal(got, want)


@pytest.mark.parametrize("grad", [False, True])
def test_the_kl_of_two_diagonal_normals_is_torchs_bit_for_bit_expanded_or_not(grad):
    """A guide expanded over K particles against a prior expanded over (K, B): without gradients the KL is
    computed once per example and broadcast; the values, and with gradients the gradients, are torch's."""
    torch.manual_seed(8)
    loc, scale = torch.randn(4, 6, requires_grad=True), (torch.rand(4, 6) + 0.3).requires_grad_()
    q = DiagonalNormal(loc, scale).expand((50, 4))
    p = DiagonalNormal(torch.zeros(6), torch.ones(6)).expand((50, 4))
    plain = torch.distributions.Normal
    want = torch.distributions.kl_divergence(plain(q.base_dist.loc, q.base_dist.scale), plain(torch.zeros(6), 1.0))
    with torch.set_grad_enabled(grad):
        got = torch.distributions.kl_divergence(q, p)
    assert got.shape == (50, 4) and got.requires_grad is grad
    assert torch.equal(got.detach(), want.sum(-1).detach())
    if grad:
        assert torch.equal(torch.autograd.grad(got.sum(), scale)[0], torch.autograd.grad(want.sum(), scale)[0])
    with pytest.raises(ValueError, match="event shapes differ"):
        torch.distributions.kl_divergence(q, DiagonalNormal(torch.zeros(5), torch.ones(5)))
