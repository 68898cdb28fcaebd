r"""Binary latent units: the ``bernoulli`` prior, and the ``bernoulli`` and ``relaxed-bernoulli`` guides.

With ``model.prior.type: bernoulli`` and ``model.guide.type: bernoulli`` the
VAE's one latent site z ∈ {0, 1}^d is a layer of d binary units::

    p(z)     = Π_i Bernoulli(z_i; σ(a_i))           a learned (``probs: learned``) or σ(a) = ``probs``
    q(z|x)   = Π_i Bernoulli(z_i; σ(l_i(h)))         l = W h + c, h the encoder's features

which with ``model.latent_dim: 200`` and a Bernoulli likelihood is the
one-layer sigmoid belief network trained by NVIL (Mnih & Gregor 2014) and
VIMCO (Mnih & Rezende 2016), the decoder's output layer making p(x|z) =
Π_j Bernoulli(x_j; σ(dec(z)_j)).

The ``bernoulli`` guide cannot be reparameterized: its gradient needs a
score-function estimator (``trace``, ``tracegraph``, ``vimco:K``, ``rws:K``)
or the exact sum (``enum``, for d ≤ :data:`MAX_ENUMERATED_UNITS`: the site's
distribution enumerates its 2^d configurations, :class:`BernoulliUnits`).

``relaxed-bernoulli`` is the straight-through Gumbel-sigmoid (Concrete)
relaxation of the same guide (Maddison et al. 2017; Jang et al. 2017;
``pyro.distributions.RelaxedBernoulliStraightThrough``): a draw is
z = round(s), s = σ((l + log u − log(1 − u)) / τ), u ~ U(0, 1), τ = ``temperature``,
and the gradient flows through s as if z were s. The draw z is exactly
binary and its log q is the Bernoulli mass log q(z|x) of the guide above
(:class:`StraightThroughBernoulli`), so every value reported (ELBO, bounds,
log-likelihood) is that of the Bernoulli guide: only the gradient is changed,
and it is **biased**: ∂z/∂l is replaced by ∂s/∂l, so the expected gradient is
not the ELBO's gradient at any τ (the bias shrinks as τ → 0 while the
variance of ∂s/∂l grows as 1/τ).

``encode`` (the guide's ``moments``) gives the Bernoulli means σ(l) and
standard deviations √(σ(l)(1 − σ(l))); the active-unit count and the latent
pictures use those means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits

from pyro_vae.config import registry
from pyro_vae.config.spec import GuideSpec, PriorSpec, accepts
from pyro_vae.errors import UserInputError
from pyro_vae.parts.guides import Guide

#: the most binary units whose 2^d joint configurations ``enum`` sums out
MAX_ENUMERATED_UNITS = 10
LEARNED = "learned"
BINARY_PRIOR = "bernoulli"
BINARY_GUIDES = ("bernoulli", "relaxed-bernoulli")


class BernoulliUnits(dist.Independent):
    """d independent Bernoulli units from logits (…, d): event shape (d,).

    Equal to ``Bernoulli(logits=logits).to_event(1)``, and, for d ≤
    :data:`MAX_ENUMERATED_UNITS`, enumerable: ``enumerate_support`` lists the 2^d
    binary vectors (configuration c has unit i set where bit i of c is 1), so
    Pyro's parallel enumeration sums the site out exactly.
    """

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        super().__init__(dist.Bernoulli(logits=logits, validate_args=validate_args), 1, validate_args=validate_args)

    @property
    def logits(self) -> torch.Tensor:
        return self.base_dist.logits

    @property
    def has_enumerate_support(self) -> bool:  # type: ignore[override]  # a property of the units' count
        return self.event_shape[0] <= MAX_ENUMERATED_UNITS

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """The 2^d configurations, shape ``(2^d, *batch_shape, d)`` (batch dims of size 1 unless ``expand``)."""
        units = self.event_shape[0]
        if not self.has_enumerate_support:
            raise NotImplementedError(
                f"{units} binary units have 2^{units} configurations; at most 2^{MAX_ENUMERATED_UNITS} are enumerated"
            )
        codes = torch.arange(2**units, device=self.logits.device)
        bits = torch.arange(units, device=self.logits.device)
        values = ((codes[:, None] >> bits) & 1).to(self.logits.dtype)
        values = values.reshape((2**units,) + (1,) * len(self.batch_shape) + (units,))
        return values.expand((2**units,) + self.batch_shape + (units,)) if expand else values

    def expand(self, batch_shape, _instance=None) -> "BernoulliUnits":
        shape = torch.Size(batch_shape) + self.event_shape
        return BernoulliUnits(self.logits.expand(shape), validate_args=self._validate_args)


class StraightThroughBernoulli(dist.RelaxedBernoulliStraightThrough):
    """Pyro's straight-through relaxed Bernoulli whose ``log_prob`` is the Bernoulli mass of the (binary) draw.

    log q(z) = z log σ(l) + (1 − z) log σ(−l), differentiable in z (∂/∂z = l),
    so the straight-through gradient reaches log q as well as the model.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -binary_cross_entropy_with_logits(logits, value, reduction="none")


def bernoulli_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean p = σ(l) and standard deviation √(p(1 − p)) of Bernoulli units."""
    p = torch.sigmoid(logits)
    return p, (p * (1 - p)).sqrt()


class BernoulliPrior(nn.Module):
    """p(z) = Π_i Bernoulli(σ(a_i)): a learned (a parameter) or fixed (a buffer)."""

    def __init__(self, latent_dim: int, probs: Union[float, str]):
        super().__init__()
        if probs == LEARNED:
            self.logits = nn.Parameter(torch.zeros(latent_dim))
        else:
            self.register_buffer("logits", torch.full((latent_dim,), float(torch.logit(torch.tensor(float(probs))))))

    def forward(self) -> dist.TorchDistribution:
        return BernoulliUnits(self.logits)


class BernoulliGuide(Guide):
    """q(z|x) = Π_i Bernoulli(σ(l_i)), l = Linear(h)."""

    def __init__(self, feature_dim: int, latent_dim: int):
        super().__init__()
        self.logits = nn.Linear(feature_dim, latent_dim)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliUnits(self.logits(h))

    def gaussian(self, h: torch.Tensor) -> dist.TorchDistribution:
        """The guide's distribution itself (it has no Gaussian part)."""
        return self.forward(h)

    def moments(self, h: torch.Tensor, num_samples: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """σ(l) and √(σ(l)(1 − σ(l)))."""
        return bernoulli_moments(self.logits(h))


class RelaxedBernoulliGuide(BernoulliGuide):
    """The Bernoulli guide drawn by the straight-through relaxation at temperature τ (module docstring)."""

    temperature: torch.Tensor  # a buffer

    def __init__(self, feature_dim: int, latent_dim: int, temperature: float):
        super().__init__(feature_dim, latent_dim)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return StraightThroughBernoulli(self.temperature, logits=self.logits(h)).to_event(1)


def check_binary_pair(spec) -> None:
    """Binary units on both sides: the ``bernoulli`` prior with a binary guide, a binary guide with that prior."""
    prior, guide = spec.model.prior.type, spec.model.guide.type
    if (prior == BINARY_PRIOR) != (guide in BINARY_GUIDES):
        raise UserInputError(
            f"'model.prior.type' is {prior!r} and 'model.guide.type' is {guide!r}; binary latent units need the "
            f"{BINARY_PRIOR!r} prior with one of the guides {', '.join(map(repr, BINARY_GUIDES))}"
        )


@dataclass
class BernoulliPriorConfig:
    """``bernoulli`` prior: the units' probability, ``learned`` (a parameter per unit, starting at 0.5) or fixed."""

    probs: Union[float, str] = field(default=LEARNED, metadata=accepts(0, 1, open_low=True, choices=(LEARNED,)))

    def check(self, key: str, spec) -> None:
        if isinstance(self.probs, float) and self.probs >= 1:
            raise UserInputError(f"'{key}.probs' is {self.probs}; it must be 'learned' or a number in (0, 1)")
        check_binary_pair(spec)


@dataclass
class BinaryGuideConfig:
    """``bernoulli`` guide: no keys of its own; it needs the ``bernoulli`` prior."""

    def check(self, key: str, spec) -> None:
        check_binary_pair(spec)


@registry.register("prior", "bernoulli", config=BernoulliPriorConfig)
def bernoulli_prior(spec: PriorSpec, latent_dim: int, **parts) -> nn.Module:
    return BernoulliPrior(latent_dim, spec.options.probs)


@registry.register("guide", "bernoulli", config=BinaryGuideConfig)
def bernoulli_guide(spec: GuideSpec, feature_dim: int, latent_dim: int) -> Guide:
    return BernoulliGuide(feature_dim, latent_dim)


@dataclass
class RelaxedConfig(BinaryGuideConfig):
    """``relaxed-bernoulli``: τ > 0, the temperature of the relaxation (module docstring); it needs the ``bernoulli``
    prior."""

    temperature: float = field(default=0.5, metadata=accepts(0, open_low=True))


@registry.register("guide", "relaxed-bernoulli", config=RelaxedConfig)
def relaxed_bernoulli_guide(spec: GuideSpec, feature_dim: int, latent_dim: int) -> Guide:
    return RelaxedBernoulliGuide(feature_dim, latent_dim, spec.options.temperature)
