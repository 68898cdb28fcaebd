"""Amortized guides q_φ(z|x), chosen by ``model.guide.type``.

Each turns encoder features h into a reparameterized distribution over z with
event shape (d,), so z = μ_φ(x) + L_φ(x) ε with ε ~ N(0, I) (the
reparameterization trick of the README's mathematics table), optionally pushed through a flow:

- ``diagonal-normal``: L = diag(σ_φ(x)), the mean-field guide.
- ``low-rank-normal``: Σ = F Fᵀ + diag(σ²) with F of shape (d, ``rank``).
- ``full-normal``: L a lower-triangular Cholesky factor with positive diagonal.
- ``iaf``: the diagonal Gaussian followed by ``flows`` inverse autoregressive
  transforms conditioned on h (Kingma et al. 2016), each
  z ← μ_t(z, h) + σ_t(z, h) ⊙ z with an autoregressive network, so
  log q(z) = log q₀(z₀) − Σ_t Σ_i log σ_t,i.

``log_variance_bounds: [low, high]`` clamps every variance the guide's head
produces (the diagonal σ², the low-rank guide's diagonal part, the squared
diagonal of the Cholesky factor, the IAF's base σ²) to [e^low, e^high], as the
VampPrior paper's encoder does with a hard-tanh on log σ² in [−6, 2]
(Tomczak & Welling 2018): a floor under σ that keeps a posterior from
collapsing onto a point while the decoder still ignores z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.nn.functional import softplus

from pyro_vae.config import registry
from pyro_vae.config.spec import GuideSpec, accepts, section_at
from pyro_vae.errors import UserInputError
from pyro_vae.parts import distributions


class Guide(nn.Module):
    """Base: ``forward(h)`` gives q(z|x); ``gaussian(h)`` its Gaussian part."""

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return self.gaussian(h)

    def gaussian(self, h: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def moments(self, h: torch.Tensor, num_samples: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and marginal standard deviations of q(z|x)."""
        q = self.gaussian(h)
        return q.mean, q.variance.sqrt()


def positive_scale(raw: torch.Tensor, min_scale: float, log_variance_bounds: list[float] | None) -> torch.Tensor:
    """σ = softplus(raw) + min_scale, clamped to [e^(low/2), e^(high/2)] when bounds are given."""
    scale = softplus(raw) + min_scale
    if log_variance_bounds is None:
        return scale
    low, high = log_variance_bounds
    return scale.clamp(math.exp(low / 2), math.exp(high / 2))


class DiagonalNormal(Guide):
    def __init__(
        self, feature_dim: int, latent_dim: int, min_scale: float, log_variance_bounds: list[float] | None = None
    ):
        super().__init__()
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.raw_scale = nn.Linear(feature_dim, latent_dim)
        self.min_scale, self.log_variance_bounds = min_scale, log_variance_bounds

    def gaussian(self, h: torch.Tensor) -> dist.TorchDistribution:
        scale = positive_scale(self.raw_scale(h), self.min_scale, self.log_variance_bounds)
        return distributions.DiagonalNormal(self.loc(h), scale)


class LowRankNormal(Guide):
    def __init__(
        self,
        feature_dim: int,
        latent_dim: int,
        rank: int,
        min_scale: float,
        log_variance_bounds: list[float] | None = None,
    ):
        super().__init__()
        self.latent_dim, self.rank = latent_dim, rank
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.factor = nn.Linear(feature_dim, latent_dim * rank)
        self.raw_diag = nn.Linear(feature_dim, latent_dim)
        self.min_scale, self.log_variance_bounds = min_scale, log_variance_bounds

    def gaussian(self, h: torch.Tensor) -> dist.TorchDistribution:
        factor = self.factor(h).reshape(*h.shape[:-1], self.latent_dim, self.rank)
        diag = positive_scale(self.raw_diag(h), self.min_scale, self.log_variance_bounds) ** 2
        return dist.LowRankMultivariateNormal(self.loc(h), factor, diag)


class FullNormal(Guide):
    def __init__(
        self, feature_dim: int, latent_dim: int, min_scale: float, log_variance_bounds: list[float] | None = None
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.tril = nn.Linear(feature_dim, latent_dim * (latent_dim + 1) // 2)
        self.min_scale, self.log_variance_bounds = min_scale, log_variance_bounds
        self.register_buffer("rows", torch.tril_indices(latent_dim, latent_dim)[0], persistent=False)
        self.register_buffer("cols", torch.tril_indices(latent_dim, latent_dim)[1], persistent=False)

    def gaussian(self, h: torch.Tensor) -> dist.TorchDistribution:
        d = self.latent_dim
        entries = self.tril(h)
        scale_tril = entries.new_zeros(*h.shape[:-1], d, d)
        scale_tril[..., self.rows, self.cols] = entries
        diagonal = positive_scale(scale_tril.diagonal(dim1=-2, dim2=-1), self.min_scale, self.log_variance_bounds)
        scale_tril = scale_tril.tril(-1) + torch.diag_embed(diagonal)
        return dist.MultivariateNormal(self.loc(h), scale_tril=scale_tril)


class InverseAutoregressive(Guide):
    def __init__(
        self,
        feature_dim: int,
        latent_dim: int,
        flows: int,
        hidden: list[int],
        min_scale: float,
        log_variance_bounds: list[float] | None = None,
    ):
        super().__init__()
        if latent_dim < 2:
            raise UserInputError(
                "'model.guide.type' iaf needs model.latent_dim >= 2 (an autoregressive flow on one dimension is affine)"
            )
        self.base = DiagonalNormal(feature_dim, latent_dim, min_scale, log_variance_bounds)
        self.flows = nn.ModuleList(
            T.conditional_affine_autoregressive(latent_dim, feature_dim, hidden_dims=hidden) for _ in range(flows)
        )

    def gaussian(self, h: torch.Tensor) -> dist.TorchDistribution:
        return self.base.gaussian(h)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        conditioned = [flow.condition(h) for flow in self.flows]  # type: ignore[operator]  # a ModuleList's items
        return dist.TransformedDistribution(self.gaussian(h), conditioned)

    def moments(self, h: torch.Tensor, num_samples: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Monte Carlo moments: the flow has no closed-form mean."""
        z = self.forward(h).sample((num_samples,))
        return z.mean(0), z.std(0)


@registry.register("guide", "diagonal-normal")
def diagonal_normal(spec: GuideSpec, feature_dim: int, latent_dim: int) -> Guide:
    return DiagonalNormal(feature_dim, latent_dim, spec.min_scale, spec.log_variance_bounds)


@dataclass
class LowRankConfig:
    """``low-rank-normal``: the rank of F, at most ``model.latent_dim``."""

    rank: int = field(default=2, metadata=accepts(1))

    def check(self, key: str, spec) -> None:
        latent_dim = spec.model.latent_dim
        if self.rank > latent_dim:
            raise UserInputError(
                f"'{key}.rank' is {self.rank}; it must be between 1 and model.latent_dim ({latent_dim})"
            )


@registry.register("guide", "low-rank-normal", config=LowRankConfig)
def low_rank_normal(spec: GuideSpec, feature_dim: int, latent_dim: int) -> Guide:
    return LowRankNormal(feature_dim, latent_dim, spec.options.rank, spec.min_scale, spec.log_variance_bounds)


@registry.register("guide", "full-normal")
def full_normal(spec: GuideSpec, feature_dim: int, latent_dim: int) -> Guide:
    return FullNormal(feature_dim, latent_dim, spec.min_scale, spec.log_variance_bounds)


@dataclass
class AutoregressiveConfig:
    """A flow of ``flows`` autoregressive transforms, each a MADE with ``hidden`` widths (``iaf``; the ``flow``
    prior)."""

    flows: int = field(default=2, metadata=accepts(1, 64))
    hidden: list[int] = field(default_factory=lambda: [64], metadata=accepts(1))

    def check(self, key: str, spec) -> None:
        if not self.hidden:
            raise UserInputError(
                f"'{key}.hidden' is []; a {section_at(spec, key).type} needs at least one hidden layer, e.g. [64]"
            )


@registry.register("guide", "iaf", config=AutoregressiveConfig)
def inverse_autoregressive(spec: GuideSpec, feature_dim: int, latent_dim: int) -> Guide:
    return InverseAutoregressive(
        feature_dim, latent_dim, spec.options.flows, spec.options.hidden, spec.min_scale, spec.log_variance_bounds
    )
