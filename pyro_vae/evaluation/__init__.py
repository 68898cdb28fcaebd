"""Bounds and importance-sampled log-likelihood, weight diagnostics, results tables, estimator comparison.

``pyro_vae.evaluation`` names the scoring functions of :mod:`pyro_vae.evaluation.bounds`.
"""

from pyro_vae.evaluation.bounds import (
    active_units,
    evaluate,
    kl_note,
    layer_active_units,
    log_weight_terms,
    rows_per_pass,
    test_elbo,
)

__all__ = [
    "evaluate",
    "test_elbo",
    "log_weight_terms",
    "active_units",
    "rows_per_pass",
    "kl_note",
    "layer_active_units",
]
