"""The importance weights' diagnostics piece by piece: PSIS's tail size, equal tails, k̂ per example, the summaries."""

from __future__ import annotations

import math

import pytest
import torch
from arviz_stats.base.array import array_stats

from pyro_vae.evaluation import diagnostics


@pytest.mark.parametrize("k, m", [(25, 5), (100, 20), (225, 45), (226, 45), (400, 60), (1000, 94), (5000, 212)])
def test_tail_size_is_the_smaller_of_k_over_5_and_3_root_k(k, m):
    assert diagnostics.tail_size(k) == m == math.floor(min(k / 5, 3 * math.sqrt(k)))


def test_a_constant_tail_is_one_whose_m_largest_weights_are_equal():
    """K = 100: M = 20. The 20 largest tied (the rest anything) is a constant tail; 19 tied and one below is not."""
    rows = torch.linspace(-3.0, -1.0, 100).repeat(4, 1).double()
    rows[0, 80:] = 0.0  # the 20 largest equal
    rows[1, 81:] = 0.0  # 19 equal, the 20th largest below them
    rows[1, 80] = -1e-3
    rows[2] = rows[2].flip(0)  # distinct weights, in another order
    rows[3, 80:] = 0.0  # 19 equal and the largest above them
    rows[3, 99] = 1e-3
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert diagnostics.constant_tail(rows[:, order].numpy()).tolist() == [True, False, False, False]


def test_pareto_k_is_psis_of_the_negative_log_weights_per_example():
    """(K, 2, 3) log weights: one k̂ per example, each ArviZ's fit of that example's K weights."""
    log_w = torch.randn(200, 2, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.0, 3.0])
    khat = diagnostics.pareto_k(log_w)
    assert khat.shape == (2, 3) and khat.dtype == torch.float64
    for i in range(2):
        for j in range(3):
            _, want = array_stats.psislw(-log_w[:, i, j].double().numpy(), r_eff=1.0)
            assert khat[i, j].item() == pytest.approx(float(want), abs=1e-12)
    assert khat[0, 2] > khat[0, 0]  # wider log weights, heavier tail


def test_pareto_k_needs_25_weights():
    assert torch.isnan(diagnostics.pareto_k(torch.randn(24, 3))).all()
    assert diagnostics.pareto_k(torch.randn(24, 3)).shape == (3,)
    assert diagnostics.pareto_k(torch.randn(24, 3)).dtype == torch.float64
    assert torch.isfinite(diagnostics.pareto_k(torch.randn(25, 3, generator=torch.Generator().manual_seed(1)))).all()


def test_summaries_of_ess_and_k_hat():
    ess = torch.linspace(0.0, 1.0, 21)
    khat = torch.tensor([0.1, 0.9, -math.inf, 0.5, 0.75] + [0.2] * 16)
    summary = diagnostics.summarize(ess, khat, 300)
    assert summary["ess"] == {
        "mean_fraction": pytest.approx(0.5),
        "p5_fraction": pytest.approx(0.05),
        "num_weights": 300,
    }
    finite = khat[torch.isfinite(khat)]
    assert summary["pareto_k"]["median"] == pytest.approx(finite.double().median().item())
    assert summary["pareto_k"]["max"] == pytest.approx(0.9)
    assert summary["pareto_k"]["share_above_0.7"] == pytest.approx(2 / 21)
    assert summary["log_likelihood_reliable"] is True


@pytest.mark.parametrize("above, reliable", [(2, True), (3, False)])
def test_the_log_likelihood_is_unreliable_when_more_than_a_tenth_of_the_examples_have_k_hat_above_07(above, reliable):
    khat = torch.tensor([0.8] * above + [0.7] * (20 - above), dtype=torch.float64)  # 0.7 itself is not above
    summary = diagnostics.summarize(torch.ones(20), khat, 100)
    assert summary["pareto_k"]["share_above_0.7"] == pytest.approx(above / 20)
    assert summary["log_likelihood_reliable"] is reliable
    assert (diagnostics.warning(summary, "x") is None) is reliable


def test_without_k_hat_the_summaries_say_null():
    summary = diagnostics.summarize(torch.ones(4), torch.full((4,), math.nan), 10)
    assert summary["pareto_k"] == {"median": None, "max": None, "share_above_0.7": None}
    assert summary["log_likelihood_reliable"] is None
    assert diagnostics.warning(summary, "x") is None
    equal = diagnostics.summarize(torch.ones(3), torch.full((3,), -math.inf), 1000)
    assert equal["pareto_k"] == {"median": None, "max": None, "share_above_0.7": 0.0}


def test_a_nan_k_hat_among_others_counts_as_not_below_07():
    summary = diagnostics.summarize(torch.ones(4), torch.tensor([0.1, math.nan, 0.2, 0.3]), 100)
    assert summary["pareto_k"]["share_above_0.7"] == pytest.approx(0.25)
    assert summary["log_likelihood_reliable"] is False


def test_the_warning_names_what_the_share_and_the_median():
    summary = diagnostics.summarize(torch.ones(4), torch.tensor([0.9, 1.2, 0.3, 0.8]), 100)
    assert diagnostics.warning(summary, "test set") == (
        "test set: 75% of the examples have Pareto k̂ > 0.7 (median k̂ 0.80); the importance-sampled estimate is "
        "not reliable there. A guide closer to the posterior (a flow or full-covariance guide, more training) or "
        "more samples help"
    )
