r"""How far an importance-weighted number can be trusted: effective sample size and Pareto k̂.

For one example with K log weights log w_k = log p(x, z_k) − log q(z_k|x), z_k ~ q:

- **effective sample size** of the normalized weights w̃_k = w_k / Σ_j w_j::

      ESS = 1 / Σ_k w̃_k² = (Σ_k w_k)² / Σ_k w_k²,      reported as ESS / K ∈ [1/K, 1]

  1 when every particle weighs the same (q is the posterior), 1/K when one
  particle carries all the weight.
- **Pareto k̂** (Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed
  Importance Sampling", JMLR 2024): the shape of a generalized Pareto
  distribution fitted to the largest weights. The weights' variance is finite
  for k̂ < ½; for k̂ > 0.7 the importance-sampling estimate is not to be
  trusted at any practical K (its error falls too slowly). Computed by ArviZ's
  ``psislw`` (``arviz_stats``), per example.

The summaries over examples: ESS/K's mean and 5th percentile, k̂'s median and
maximum, and the share of examples with k̂ > 0.7. A log-likelihood whose share
exceeds ``UNRELIABLE_SHARE`` is flagged (``log_likelihood_reliable: false``);
with fewer than ``MIN_PARETO_WEIGHTS`` weights per example k̂ is not estimated
(NaN per example; null in the summaries and ``log_likelihood_reliable``).

Equal weights: where the M weights PSIS fits (the largest, M = ⌊min(K/5, 3√K)⌋)
are all equal, which is always so when all K are (q equal to the posterior),
k̂ = −∞. Their exceedances over the cutoff are all zero: the limit of a
generalized Pareto with bounded support (k < 0) as k → −∞. The weights are
bounded, their variance finite, so such an example counts as reliable (k̂ ≤ 0.7);
it is left out of the median and maximum, which cover finite k̂ only (null when
no example has one).
"""

from __future__ import annotations

import math

import numpy as np
import torch

PARETO_K_THRESHOLD = 0.7
MIN_PARETO_WEIGHTS = 25  # PSIS fits min(K/5, 3√K) tail weights; with fewer than this k̂ is not estimated (NaN)
UNRELIABLE_SHARE = 0.1  # flag a log-likelihood when more than this share of examples has k̂ > 0.7


def effective_sample_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """ESS / K per example, for log weights of shape (K, ...)."""
    k = log_w.shape[0]
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / k


def tail_size(num_weights: int) -> int:
    """M, the number of largest weights PSIS fits: ⌊3√K⌋ for K > 225, else ⌊K/5⌋ (= ⌊min(K/5, 3√K)⌋)."""
    return int(math.floor(3 * math.sqrt(num_weights))) if num_weights > 225 else num_weights // 5


def constant_tail(flat: np.ndarray) -> np.ndarray:
    """Per row of log weights (E, K): whether the M largest are all equal (:func:`tail_size`)."""
    tail = np.sort(flat, axis=-1)[:, -tail_size(flat.shape[-1]) :]
    return tail[:, -1] - tail[:, 0] < np.finfo(float).tiny


def pareto_k(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k̂ per example, for log weights of shape (K, ...) (ArviZ's PSIS fit of the largest weights).

    −∞ where the largest weights are all equal (see the module docstring); NaN for K < ``MIN_PARETO_WEIGHTS``.
    """
    from arviz_stats.base.array import array_stats

    if log_w.shape[0] < MIN_PARETO_WEIGHTS:
        return torch.full(log_w.shape[1:], math.nan, dtype=torch.float64)
    values = log_w.detach().double().cpu().numpy()
    flat = np.moveaxis(values, 0, -1).reshape(-1, values.shape[0])
    equal = constant_tail(flat)
    khat = np.full(flat.shape[0], -np.inf)
    if not equal.all():
        # arviz_stats' psislw takes LOO's log-likelihoods, whose importance weights are their negatives: −log w
        _, fitted = array_stats.psislw(-flat[~equal], r_eff=1.0, axis=-1)
        khat[~equal] = np.asarray(fitted, dtype=np.float64)
    return torch.from_numpy(khat).reshape(values.shape[1:])


def summarize(ess_fraction: torch.Tensor, khat: torch.Tensor, num_weights: int) -> dict:
    """The JSON summaries of per-example ESS/K and k̂ (see the module docstring)."""
    ess_fraction, khat = ess_fraction.double().flatten(), khat.double().flatten()
    finite = khat[torch.isfinite(khat)]
    assessed = bool(khat.numel()) and not bool(torch.isnan(khat).all())
    share = float((~(khat <= PARETO_K_THRESHOLD)).double().mean()) if assessed else math.nan
    return {
        "ess": {
            "mean_fraction": float(ess_fraction.mean()),
            "p5_fraction": float(torch.quantile(ess_fraction, 0.05)),
            "num_weights": num_weights,
        },
        "pareto_k": {
            "median": float(finite.median()) if finite.numel() else None,
            "max": float(finite.max()) if finite.numel() else None,
            "share_above_0.7": share if assessed else None,
        },
        "log_likelihood_reliable": bool(share <= UNRELIABLE_SHARE) if assessed else None,
    }


def warning(summary: dict, what: str) -> str | None:
    """One line saying that ``what`` is not to be trusted, when the k̂ share is high; else None."""
    share = summary["pareto_k"]["share_above_0.7"]
    if summary["log_likelihood_reliable"] is not False:
        return None
    return (
        f"{what}: {100 * share:.0f}% of the examples have Pareto k̂ > 0.7 (median k̂ "
        f"{summary['pareto_k']['median']:.2f}); the importance-sampled estimate is not reliable there. "
        f"A guide closer to the posterior (a flow or full-covariance guide, more training) or more samples help"
    )
