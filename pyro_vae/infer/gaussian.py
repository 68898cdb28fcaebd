"""Closed forms for Gaussians: the KL divergence and the linear-Gaussian model.

Gaussian KL (the README's mathematics table)::

    KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) = log σ2/σ1 − ½ + (σ1² + (μ1 − μ2)²) / (2 σ2²)

Full or low-rank Gaussian q against a diagonal Gaussian p (registered with
``torch.distributions.kl.register_kl``, so ``TraceMeanField_ELBO`` uses it)::

    KL(q ‖ p) = ½ [tr(Σp⁻¹ Σq) + (μp − μq)ᵀ Σp⁻¹ (μp − μq) − d + log|Σp| − log|Σq|]

Diagonal Gaussian log-density of many draws z (K, B, d) at once
(:func:`log_density`, the evaluation's log q(z|x) and log p(z))::

    log N(z; μ, diag σ²) = −½ Σᵢ ((zᵢ − μᵢ)/σᵢ)² − Σᵢ log σᵢ − (d/2) log 2π

with the per-draw work one subtract, one multiply by 1/σ and one sum of
squares; the σ terms are computed once per example, not once per draw.

Linear-Gaussian model, where everything the ELBO derivation needs is exact::

    z ~ N(0, I_d),   x | z ~ N(W z + b, σ² I_D)
    p(x)   = N(x; b, W Wᵀ + σ² I_D)
    p(z|x) = N(z; Σ Wᵀ (x − b) / σ², Σ),   Σ = (I_d + Wᵀ W / σ²)⁻¹

It is the test bed for every bound in the package: ELBO ≤ log p(x), the gap
log p(x) − ELBO = KL(q ‖ p(z|x)), and the IWAE bound rising toward log p(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, register_kl


def diagonal_normal_kl(
    loc_q: torch.Tensor, scale_q: torch.Tensor, loc_p: torch.Tensor, scale_p: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(loc_q, scale_q²) ‖ N(loc_p, scale_p²)) in nats.

    Sum over the last dimension for a diagonal multivariate Gaussian.
    """
    variance_ratio = (scale_q / scale_p) ** 2
    mean_term = ((loc_q - loc_p) / scale_p) ** 2
    return 0.5 * (variance_ratio + mean_term - 1.0) - torch.log(scale_q / scale_p)


def _diagonal_normal(p: Independent, event_shape: torch.Size) -> Normal:
    """The Normal inside p = Independent(Normal, 1); NotImplementedError for any other p."""
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError("closed-form KL needs p = Independent(Normal, 1)")
    if p.event_shape != event_shape:
        raise ValueError(f"event shapes differ: q {tuple(event_shape)}, p {tuple(p.event_shape)}")
    return p.base_dist


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with every broadcast (stride-0) leading dimension cut to size 1: the same values, broadcastable."""
    for dim in range(tensor.dim() - 1):
        if tensor.stride(dim) == 0 and tensor.shape[dim] > 1:
            tensor = tensor.narrow(dim, 0, 1)
    return tensor


def log_density(p: torch.distributions.Distribution, z: torch.Tensor) -> torch.Tensor:
    """log p(z) summed over the event, for draws z of shape (..., *p.batch_shape, d).

    A diagonal Gaussian (``Independent(Normal, 1)``) takes the formula in the
    module docstring, its σ terms computed once per distinct (μ, σ) (broadcast
    copies, such as a prior expanded over a plate, count once); any other p its
    own ``log_prob``. Equal up to float rounding.
    """
    if not (isinstance(p, Independent) and isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1):
        return p.log_prob(z)
    normal = p.base_dist
    loc, scale = compact(normal.loc), compact(normal.scale)
    standardized = (z - loc).mul_(scale.reciprocal())
    half_squares = torch.linalg.vector_norm(standardized, dim=-1).square_().mul_(0.5)
    constant = scale.log().sum(-1) + 0.5 * z.shape[-1] * math.log(2 * math.pi)
    # in place: the mul_ above already made the draws' shape the broadcast of z, μ and σ, which holds constant's
    return half_squares.add_(constant).neg_()


@register_kl(MultivariateNormal, Independent)
@register_kl(LowRankMultivariateNormal, Independent)
def gaussian_diagonal_kl(q: MultivariateNormal | LowRankMultivariateNormal, p: Independent) -> torch.Tensor:
    """KL(q ‖ p) in nats for a full or low-rank Gaussian q and a diagonal Gaussian p::

        KL = ½ [tr(Σp⁻¹ Σq) + (μp − μq)ᵀ Σp⁻¹ (μp − μq) − d + log|Σp| − log|Σq|]

    With Σp = diag(σp²) only the diagonal of Σq enters, and the terms regroup as
    the cross-entropy −E_q[log p(z)] = ½ Σᵢ [log 2πσp,ᵢ² + (Σq,ᵢᵢ + (μq,ᵢ − μp,ᵢ)²) / σp,ᵢ²]
    minus the entropy H(q) = ½ [d (1 + log 2π) + log|Σq|]. Batch shapes broadcast.
    """
    prior = _diagonal_normal(p, q.event_shape)
    variance_p = prior.scale**2
    squared_error = (q.mean - prior.loc) ** 2 + q.variance
    cross_entropy = 0.5 * (torch.log(2 * math.pi * variance_p) + squared_error / variance_p).sum(-1)
    return cross_entropy - q.entropy()


@dataclass
class LinearGaussian:
    """x = W z + b + σ ε with z ~ N(0, I_d), ε ~ N(0, I_D).

    ``weight`` has shape (D, d), ``bias`` shape (D,), ``noise`` is σ > 0.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    noise: float

    @classmethod
    def random(
        cls, data_dim: int, latent_dim: int, noise: float = 0.5, generator: torch.Generator | None = None
    ) -> "LinearGaussian":
        """A model with weights drawn from N(0, 1/d) and biases from N(0, 1)."""
        weight = torch.randn(data_dim, latent_dim, generator=generator) / latent_dim**0.5
        bias = torch.randn(data_dim, generator=generator)
        return cls(weight, bias, float(noise))

    @property
    def data_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n examples x of shape (n, D)."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        eps = torch.randn(n, self.data_dim, generator=generator)
        return z @ self.weight.T + self.bias + self.noise * eps

    def marginal(self) -> torch.distributions.MultivariateNormal:
        """p(x) = N(b, W Wᵀ + σ² I)."""
        cov = self.weight @ self.weight.T + self.noise**2 * torch.eye(self.data_dim)
        return torch.distributions.MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats, one value per example."""
        return self.marginal().log_prob(x)

    def posterior_covariance(self) -> torch.Tensor:
        """Σ = (I + Wᵀ W / σ²)⁻¹, the same for every x."""
        precision = torch.eye(self.latent_dim) + self.weight.T @ self.weight / self.noise**2
        return torch.linalg.inv(precision)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """E[z | x] = Σ Wᵀ (x − b) / σ², shape (n, d)."""
        return (x - self.bias) @ self.weight @ self.posterior_covariance().T / self.noise**2

    def posterior(self, x: torch.Tensor) -> torch.distributions.MultivariateNormal:
        """The exact posterior p(z | x), batched over the examples of x."""
        return torch.distributions.MultivariateNormal(
            self.posterior_mean(x), covariance_matrix=self.posterior_covariance()
        )

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log N(z; 0, I) + log N(x; W z + b, σ² I)."""
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        likelihood = dist.Normal(z @ self.weight.T + self.bias, self.noise).log_prob(x).sum(-1)
        return prior + likelihood

    def model(self, x: torch.Tensor) -> None:
        """The model as a Pyro program, one plate over the examples of x."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.weight.T + self.bias, self.noise).to_event(1), obs=x)
