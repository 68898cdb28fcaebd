"""Priors p(z), chosen by ``model.prior.type``.

Each is a module whose ``forward()`` returns a distribution over z with event
shape (d,) and empty batch shape; the model's data plate broadcasts it.

- ``standard-normal``: N(0, I).
- ``learned-normal``: N(μ, diag σ²) with learnable μ, σ.
- ``mog``: Σ_k π_k N(μ_k, diag σ_k²), K = ``components``, all learnable.
- ``vamp``: the VampPrior p(z) = (1/K) Σ_k q_φ(z | u_k) at K learnable
  pseudo-inputs u_k (Tomczak & Welling 2018). It shares the encoder with the
  guide; with a flow guide its components are the guide's Gaussian part. As
  in the paper's code, u_k = hardtanh(a_k) into the training data's range
  [min x, max x] (``pseudo_input_activation: hardtanh``), a_k ~ N(0.05, 0.01²)
  at the start, so a pseudo-input is always a possible input of the encoder.
- ``flow``: N(0, I) pushed through ``flows`` masked autoregressive transforms
  (Papamakarios et al. 2017), so log p(z) costs one network pass per flow:
  ``log p(z) = log N(f(z); 0, I) + log |det ∂f/∂z|``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.nn.functional import softplus

from pyro_vae.config import registry
from pyro_vae.config.spec import PriorSpec, accepts
from pyro_vae.errors import UserInputError
from pyro_vae.parts.distributions import DiagonalNormal
from pyro_vae.parts.guides import AutoregressiveConfig
from pyro_vae.parts.mixtures import gaussian_mixture


class StandardNormal(nn.Module):
    loc: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return DiagonalNormal(self.loc, self.scale)


class LearnedNormal(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.full((latent_dim,), 0.5413))  # softplus⁻¹(1)

    def forward(self) -> dist.TorchDistribution:
        return DiagonalNormal(self.loc, softplus(self.raw_scale))


class MixtureOfGaussians(nn.Module):
    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        # means near 0: the mixture starts close to N(0, I), so a latent dimension the decoder does not use
        # costs no KL from the first step; N(0, I) means (components ~10 apart in 50-d) made every unused
        # dimension pay until Adam pulled the means together (MNIST, 10 epochs: test ELBO −120.4 vs −109.3)
        self.loc = nn.Parameter(0.1 * torch.randn(components, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((components, latent_dim), 0.5413))

    def forward(self) -> dist.TorchDistribution:
        return gaussian_mixture(self.logits, dist.Normal(self.loc, softplus(self.raw_scale)).to_event(1))


class VampPrior(nn.Module):
    data_range: torch.Tensor  # a buffer

    def __init__(
        self,
        data_dim: int,
        pseudo_inputs: int,
        encoder: nn.Module,
        guide: nn.Module,
        data_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(pseudo_inputs, data_dim))
        # hardtanh bounds of the pseudo-inputs, kept in the checkpoint; None: unbounded
        self.bounded = data_range is not None
        self.register_buffer("data_range", torch.tensor(data_range if self.bounded else (0.0, 0.0)))
        # shared with the guide, not owned: keep them out of this module's parameters
        self._posterior = (encoder, guide)

    def inputs(self) -> torch.Tensor:
        """The K pseudo-inputs u_k as the encoder sees them, (K, D)."""
        if not self.bounded:
            return self.pseudo_inputs
        return torch.clamp(self.pseudo_inputs, self.data_range[0], self.data_range[1])  # hardtanh

    def forward(self) -> dist.TorchDistribution:
        encoder, guide = self._posterior
        components = guide.gaussian(encoder(self.inputs()))  # type: ignore[operator]  # the guide's own method
        return gaussian_mixture(self.pseudo_inputs.new_zeros(self.pseudo_inputs.shape[0]), components)


class MaskedAutoregressiveFlow(nn.Module):
    loc: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, latent_dim: int, flows: int, hidden: list[int]):
        super().__init__()
        if latent_dim < 2:
            raise UserInputError("'model.prior.type' flow needs model.latent_dim >= 2")
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.flows = nn.ModuleList(T.affine_autoregressive(latent_dim, hidden_dims=hidden) for _ in range(flows))
        for transform in self.flows:
            # the last layer gives each flow's shift and log-scale: zero makes it the identity, so the prior
            # starts at N(0, I) (as the mog prior does) and unused latent dimensions cost no KL from the start
            last = cast(nn.Linear, transform.arn.layers[-1])  # type: ignore[union-attr,index]  # a ModuleList's items
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self) -> dist.TorchDistribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # the inverse of an IAF is a MAF: density evaluation is one parallel pass
        return dist.TransformedDistribution(base, [flow.inv for flow in self.flows])


@registry.register("prior", "standard-normal")
def standard_normal(spec: PriorSpec, latent_dim: int, **parts) -> nn.Module:
    return StandardNormal(latent_dim)


@registry.register("prior", "learned-normal")
def learned_normal(spec: PriorSpec, latent_dim: int, **parts) -> nn.Module:
    return LearnedNormal(latent_dim)


@dataclass
class MixtureConfig:
    """``mog``: K, the number of components."""

    components: int = field(default=10, metadata=accepts(1))


@registry.register("prior", "mog", config=MixtureConfig)
def mixture_of_gaussians(spec: PriorSpec, latent_dim: int, **parts) -> nn.Module:
    return MixtureOfGaussians(latent_dim, spec.options.components)


@dataclass
class VampConfig:
    """``vamp``: K pseudo-inputs, and whether they are clamped into the data's range."""

    pseudo_inputs: int = field(default=100, metadata=accepts(1))
    pseudo_input_activation: str = field(default="hardtanh", metadata=accepts(choices=("hardtanh", "none")))


@registry.register("prior", "vamp", config=VampConfig)
def vamp(
    spec: PriorSpec,
    latent_dim: int,
    *,
    data_dim: int,
    encoder: nn.Module,
    guide: nn.Module,
    data_range: tuple[float, float] = (0.0, 1.0),
    **parts,
) -> nn.Module:
    bounds = data_range if spec.options.pseudo_input_activation == "hardtanh" else None
    return VampPrior(data_dim, spec.options.pseudo_inputs, encoder, guide, bounds)


@registry.register("prior", "flow", config=AutoregressiveConfig)
def flow(spec: PriorSpec, latent_dim: int, **parts) -> nn.Module:
    return MaskedAutoregressiveFlow(latent_dim, spec.options.flows, spec.options.hidden)
