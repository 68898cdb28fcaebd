"""Mixtures of diagonal Gaussians whose density costs matrix products, not an n×K×d tensor.

The ``mog`` and ``vamp`` priors are p(z) = Σ_k π_k N(z; μ_k, diag σ_k²). Evaluated
the plain way (``MixtureSameFamily.log_prob``), every point z is broadcast
against every component: an n×K×d tensor and a handful of elementwise passes
over it. With K = 500 pseudo-inputs, d = 50 and the n = 10⁷ draws of a K = 1000
log-likelihood estimate on the MNIST test set that is 2.5·10¹¹ elements per pass.
Expanding the square gives the same density from two (n×d)·(d×K) products::

    log N(z; μ_k, diag σ_k²) = −½ Σ_j z_j² w_kj + Σ_j z_j μ_kj w_kj − ½ Σ_j μ_kj² w_kj
                               − Σ_j log σ_kj − (d/2) log 2π,          w_kj = σ_kj⁻²

    log p(z) = logsumexp_k [log π_k + log N(z; μ_k, diag σ_k²)].

The expansion subtracts terms of size Σ_j z_j² w_kj from each other, which in
float32 loses up to ~10⁻⁷ of that size (tenths of a nat when σ is 0.01 and
|z| is 3); the quadratic form is therefore formed in float64, and the
log-sum-exp over components, which has no such cancellation, runs in the
value's dtype.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import Independent, Normal


class DiagonalNormalMixture(dist.MixtureSameFamily):
    """``MixtureSameFamily`` of ``Normal(loc, scale).to_event(1)`` components, with a GEMM log-density.

    Sampling, moments and everything else are ``MixtureSameFamily``'s. The fast
    density applies when the components have shape (K, d) or are broadcast
    copies of one (K, d) set (what a Pyro plate makes of the prior); otherwise
    it is ``MixtureSameFamily.log_prob``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        normal = self.component_distribution.base_dist
        loc, scale = _unbroadcast(normal.loc, core=2), _unbroadcast(normal.scale, core=2)
        logits = _unbroadcast(self.mixture_distribution.logits, core=1)
        if loc is None or scale is None or logits is None:
            return super().log_prob(value)
        d = loc.shape[-1]
        loc, scale = loc.double(), scale.double()
        precision = scale.pow(-2)  # w_kj, (K, d)
        points = value.reshape(-1, d).double()  # (n, d)
        quadratic = (
            points.pow(2) @ precision.T - 2 * points @ (loc * precision).T + (loc.pow(2) * precision).sum(-1)
        )  # Σ_j (z_j − μ_kj)² w_kj, (n, K)
        log_components = (-0.5 * quadratic - scale.log().sum(-1)).to(value.dtype) - 0.5 * d * math.log(2 * math.pi)
        log_density = torch.logsumexp(log_components + torch.log_softmax(logits, dim=-1), dim=-1)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return log_density.reshape(value.shape[:-1]).expand(shape)


def _unbroadcast(tensor: torch.Tensor, core: int) -> torch.Tensor | None:
    """The last ``core`` dimensions of ``tensor`` if its leading ones are broadcast copies, else None."""
    leading = tensor.dim() - core
    if leading < 0 or any(tensor.stride(i) != 0 and tensor.shape[i] != 1 for i in range(leading)):
        return None
    return tensor[(0,) * leading]


def gaussian_mixture(logits: torch.Tensor, components: dist.TorchDistribution) -> dist.MixtureSameFamily:
    """Σ_k softmax(logits)_k · component_k: the GEMM density for diagonal Gaussians, the plain one otherwise."""
    mixing = dist.Categorical(logits=logits)
    diagonal = (
        isinstance(components, Independent)
        and isinstance(components.base_dist, Normal)
        and components.reinterpreted_batch_ndims == 1
        and components.batch_shape == logits.shape
    )
    return (DiagonalNormalMixture if diagonal else dist.MixtureSameFamily)(mixing, components)
