"""Likelihoods p_θ(x|z), chosen by ``model.likelihood.type``.

Each is a module that turns the decoder's D outputs into a Pyro distribution
over the flat example x with event shape (D,):

- ``bernoulli``: x_i ∈ {0, 1}, decoder gives logits.
- ``continuous-bernoulli``: x_i ∈ [0, 1] (Loaiza-Ganem & Cunningham 2019), logits;
  the normalizing constant C(λ) makes it a proper density on the unit interval.
- ``gaussian``: N(μ_i, σ_i²), decoder gives μ; σ fixed (``scale: 0.1``) or learned per
  dimension (``scale: learned``).
- ``laplace``: Laplace(μ_i, b_i), same scale options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyro_vae.config import registry
from pyro_vae.config.spec import LikelihoodSpec, accepts
from pyro_vae.parts.distributions import BernoulliImage

LEARNED = "learned"
MEAN_CLAMP = 1e-3  # data-mean initialization: means of 0 or 1 are moved this far inside (0, 1)


class Likelihood(nn.Module):
    """Base: ``forward(out)`` is the distribution; ``mean(out)`` the expected x."""

    support_name = "real numbers"

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self.forward(out).mean

    def holds(self, data: torch.Tensor) -> bool:
        """Whether every value of ``data`` is in the support."""
        return bool(torch.isfinite(data).all())

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The decoder output whose likelihood has mean ``mean`` (D,): the inverse of :meth:`mean`.

        The decoder's output bias starts here (``model.decoder.init_bias: data-mean``),
        so that before the first step p(x|z) already draws the average example.
        """
        return mean.clone()


class Bernoulli(Likelihood):
    support_name = "0 and 1 only (binarize the data, or use continuous-bernoulli)"

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliImage(out)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def holds(self, data: torch.Tensor) -> bool:
        return bool(((data == 0) | (data == 1)).all())

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """logit(m) of the mean clamped to [MEAN_CLAMP, 1 − MEAN_CLAMP] (a never-lit pixel gets a finite logit)."""
        return torch.logit(mean.clamp(MEAN_CLAMP, 1 - MEAN_CLAMP))


class ContinuousBernoulli(Likelihood):
    support_name = "the interval [0, 1]"

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=out).to_event(1)

    def holds(self, data: torch.Tensor) -> bool:
        return bool(((data >= 0) & (data <= 1)).all())

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The logits l with E[x] = m under CB(λ = σ(l)), by bisection (the CB mean rises monotonically in l).

        Means beyond the reach of float32's CB (about 0.063 to 0.937) get the nearest end.

        E[x] = λ/(2λ − 1) + 1/(2 atanh(1 − 2λ)) for λ ≠ ½ (Loaiza-Ganem & Cunningham 2019, eq. 6).
        """
        target = mean.clamp(MEAN_CLAMP, 1 - MEAN_CLAMP).double()
        # torch clamps λ to [ε, 1 − ε] of float32, so the CB mean only reaches about (0.063, 0.937):
        # a mean outside gets the nearest end
        limit = float(torch.logit(torch.tensor(1 - torch.finfo(torch.float32).eps, dtype=torch.float64)))
        low, high = torch.full_like(target, -limit), torch.full_like(target, limit)
        for _ in range(80):
            middle = (low + high) / 2
            below = dist.ContinuousBernoulli(logits=middle).mean < target
            low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        return ((low + high) / 2).to(mean.dtype)


class LocationScale(Likelihood):
    """Gaussian or Laplace with a fixed scale or a learned scale per dimension."""

    fixed_scale: torch.Tensor  # a buffer, with a fixed scale

    def __init__(self, family: type, data_dim: int, scale: float | str, min_scale: float):
        super().__init__()
        self.family = family
        self.min_scale = min_scale
        if scale == LEARNED:
            self.raw_scale = nn.Parameter(torch.zeros(data_dim))
        else:
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    def scale(self) -> torch.Tensor:
        if hasattr(self, "raw_scale"):
            return softplus(self.raw_scale) + self.min_scale
        return self.fixed_scale

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return self.family(out, self.scale()).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


@registry.register("likelihood", "bernoulli")
def bernoulli(spec: LikelihoodSpec, data_dim: int) -> Likelihood:
    return Bernoulli()


@registry.register("likelihood", "continuous-bernoulli")
def continuous_bernoulli(spec: LikelihoodSpec, data_dim: int) -> Likelihood:
    return ContinuousBernoulli()


@dataclass
class ScaleConfig:
    """``gaussian``, ``laplace``: a fixed scale, or ``learned`` (softplus(raw) + ``min_scale`` per dimension)."""

    scale: Union[float, str] = field(default=1.0, metadata=accepts(0, open_low=True, choices=(LEARNED,)))
    min_scale: float = field(default=1e-3, metadata=accepts(0, open_low=True))


@registry.register("likelihood", "gaussian", config=ScaleConfig)
def gaussian(spec: LikelihoodSpec, data_dim: int) -> Likelihood:
    return LocationScale(dist.Normal, data_dim, spec.options.scale, spec.options.min_scale)


@registry.register("likelihood", "laplace", config=ScaleConfig)
def laplace(spec: LikelihoodSpec, data_dim: int) -> Likelihood:
    return LocationScale(dist.Laplace, data_dim, spec.options.scale, spec.options.min_scale)
