r"""VAEs with several stochastic layers (``model.latents``): z_L → … → z_1 → x.

model (top-down, every site inside the data plate, site ``z{l}`` scaled by its β_l)::

    z_L ~ p(z_L)                                   (``model.prior``)
    z_l ~ N(μ_l(z_{l+1}), diag σ_l(z_{l+1})²)      l = L−1, …, 1   (an MLP of z_{l+1}: ``latents[·].hidden``)
    x   ~ p_θ(x | z_1)                             (``model.decoder``, ``model.likelihood``)

guide, ``model.guide_structure``:

* ``bottom-up`` (Burda et al. 2016): q(z_1 | x) q(z_2 | z_1) … q(z_L | z_{L−1}); q(z_1|x) is
  ``model.guide`` on the encoder's features, each q(z_{l+1} | z_l) a diagonal Gaussian whose mean and scale come
  from an MLP of z_l with the widths of p(z_l | z_{l+1}).
* ``ladder`` (Sønderby et al. 2016): a deterministic bottom-up pass d_1 = enc(x), d_{l+1} = MLP(d_l) gives
  Gaussian estimates N(μ̂_l, σ̂_l²) of every layer; sampling then runs top-down, z_L ~ N(μ̂_L, σ̂_L²) and, for
  l < L, the estimate merged with the model's conditional prior N(μ_p, σ_p²) = p(z_l | z_{l+1}) by precision::

      σ_q⁻² = σ̂_l⁻² + σ_p⁻²,       μ_q = (μ̂_l σ̂_l⁻² + μ_p σ_p⁻²) σ_q²

  (the top-down networks are the model's own conditional priors).

The top layer's prior is any registered prior; the VampPrior (Tomczak & Welling 2018) needs the ``ladder`` guide:
its components are q(z_L | u_k) at the pseudo-inputs u_k, and only the ladder gives q(z_L | x) in closed form (the
Gaussian estimate N(μ̂_L, σ̂_L²) of the bottom-up pass d_L(x)), so p(z_L) = (1/K) Σ_k N(μ̂_L(u_k), σ̂_L(u_k)²).

With ``model.condition: label`` (K classes, one-hot e_y; :mod:`pyro_vae.conditional`) the label enters every
network: the top prior is p(z_L | y) (:class:`~pyro_vae.conditional.ConditionalNormal`), each conditional prior
p(z_l | z_{l+1}, y) an MLP of [z_{l+1}, e_y], the decoder p(x | z_1, y) takes [z_1, e_y], q(z_1 | x, y) the
guide head on [enc(x), e_y], each bottom-up step q(z_{l+1} | z_l, y) an MLP of [z_l, e_y], and each ladder step
d_{l+1} = MLP([d_l, e_y]). The importance-sampled estimate then estimates log p(x | y).

β: the ``kl_weight`` argument (train.beta times its warm-up) times the layer's ``latents[i].kl_weight`` scales
that layer's sites in both programs, so log w = log p(x|z_1) + Σ_l β_l [log p(z_l | z_{l+1}) − log q(z_l | ·)].
"""

from __future__ import annotations

import dataclasses
from typing import cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn.functional import softplus

from pyro_vae.conditional import check_label_argument, with_label
from pyro_vae.config.spec import LayerSpec, ModelSpec, PriorSpec
from pyro_vae.model import VAE
from pyro_vae.parts import contracts, distributions
from pyro_vae.parts.networks import mlp

MIN_SCALE = 1e-4  # σ floor of the conditional Gaussians


class ConditionalGaussian(nn.Module):
    """u ↦ N(μ(u), diag σ(u)²): an MLP of u, then linear heads for μ and σ = softplus(·) + ``min_scale``."""

    def __init__(self, input_dim: int, hidden: list[int], output_dim: int, activation: str, min_scale: float):
        super().__init__()
        self.net = mlp([input_dim, *hidden], activation, final_activation=True)
        width = hidden[-1] if hidden else input_dim
        self.loc, self.raw_scale = nn.Linear(width, output_dim), nn.Linear(width, output_dim)
        self.min_scale = min_scale

    def moments(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ(u), σ(u)), each (…, output_dim)."""
        h = self.net(u)
        return self.loc(h), softplus(self.raw_scale(h)) + self.min_scale

    def forward(self, u: torch.Tensor) -> dist.TorchDistribution:
        return distributions.DiagonalNormal(*self.moments(u))

    def gaussian(self, u: torch.Tensor) -> dist.TorchDistribution:
        """The same N(μ(u), diag σ(u)²), under the name a guide head gives its Gaussian (the VampPrior's call)."""
        return self(u)


def precision_merge(
    loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor
) -> dist.TorchDistribution:
    """N(μ_q, σ_q²) with σ_q⁻² = σ⁻² + σ_p⁻² and μ_q = (μ σ⁻² + μ_p σ_p⁻²) σ_q² (Sønderby et al. 2016, eq. 19-20)."""
    precision, prior_precision = scale.pow(-2), prior_scale.pow(-2)
    variance = 1.0 / (precision + prior_precision)
    return distributions.DiagonalNormal((loc * precision + prior_loc * prior_precision) * variance, variance.sqrt())


class HierarchicalVAE(VAE):
    """A :class:`~pyro_vae.model.VAE` whose latent is the stack z_L, …, z_1 (module docstring).

    ``encoder``, ``guide_head`` (q(z_1|x) or the ladder's estimate of z_1), ``decoder`` and ``likelihood`` are
    the one-layer parts on z_1; ``prior`` is p(z_L). ``conditionals[i]`` is p(z_l | z_{l+1}) for the layers
    below the top (top-down order); ``upward[i]`` is the guide's step to z_{l+1} from z_l (``bottom-up``) or
    from d_l (``ladder``, which adds ``estimates``). ``dims`` and ``kl_weights`` are top-down. With
    ``num_classes`` K > 0 the model is conditional: the conditional priors and the guide's steps take [·, e_y]
    too (the parts built by :meth:`VAE.from_spec` already take the label).
    """

    def __init__(
        self,
        encoder: contracts.Encoder,
        decoder: contracts.Decoder,
        guide_head: contracts.Guide,
        prior: contracts.Prior,
        likelihood: contracts.Likelihood,
        layers: list[LayerSpec],
        structure: str,
        min_scale: float = MIN_SCALE,
        num_classes: int = 0,
    ):
        super().__init__(encoder, decoder, guide_head, prior, likelihood, layers[-1].dim, num_classes)
        k = num_classes
        self.structure = structure
        self.dims = [layer.dim for layer in layers]
        self.kl_weights = [layer.kl_weight for layer in layers]
        below = list(zip(layers[:-1], layers[1:]))  # (z_{l+1}, z_l) pairs, top-down
        self.conditionals = nn.ModuleList(
            ConditionalGaussian(upper.dim + k, lower.hidden or [], lower.dim, lower.activation, min_scale)
            for upper, lower in below
        )
        if structure == "bottom-up":
            self.upward = nn.ModuleList(
                ConditionalGaussian(
                    lower.dim + k, list(reversed(lower.hidden or [])), upper.dim, lower.activation, min_scale
                )
                for upper, lower in reversed(below)
            )
        else:
            width, upward, estimates = encoder.output_dim, [], []
            for upper, lower in reversed(below):  # d_{l+1} = MLP(d_l), the widths of p(z_l | z_{l+1}) reversed
                widths = [width + k, *reversed(lower.hidden or [])]
                upward.append(mlp(widths, lower.activation, final_activation=True))
                width = widths[-1]
                estimates.append(ConditionalGaussian(width, [], upper.dim, lower.activation, min_scale))
            self.upward, self.estimates = nn.ModuleList(upward), nn.ModuleList(estimates)

    @classmethod
    def assemble(
        cls,
        spec: ModelSpec,
        encoder: contracts.Encoder,
        decoder: contracts.Decoder,
        guide_head: contracts.Guide,
        prior: contracts.Prior,
        likelihood: contracts.Likelihood,
        num_classes: int = 0,
    ) -> "HierarchicalVAE":
        """The layered VAE of the one-layer parts (:meth:`VAE.from_spec`, the prior on z_L) and ``spec.latents``;
        ``num_classes`` K > 0 (the label's width under ``model.condition: label``) makes every layer conditional."""
        layers, structure, floor = spec.latents, spec.guide_structure, spec.guide.min_scale
        return cls(encoder, decoder, guide_head, prior, likelihood, layers, structure, floor, num_classes)

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        data_dim: int,
        image_shape: tuple[int, int, int] | None = None,
        train: torch.Tensor | None = None,
        num_classes: int | None = None,
        classifier_weight: float = 0.0,
        strata: tuple[int, int] | None = None,
    ) -> "HierarchicalVAE":
        """:meth:`VAE.from_spec` for layers; a ``vamp`` top prior is built on the ladder's estimate of z_L.

        ``classifier_weight`` and ``strata`` are M2's, which the spec check keeps to one layer: no use here.

        The VampPrior's components q(z_L | u_k) come from networks the layered VAE builds itself (the bottom-up
        pass and the top estimate), so the parts are built with a standard-normal top prior first, then the
        VampPrior on :meth:`top_features` and the top estimate replaces it (checked like every prior).
        """
        if spec.prior.type != "vamp":
            return cast(HierarchicalVAE, super().from_spec(spec, data_dim, image_shape, train, num_classes))
        placeholder = dataclasses.replace(spec, prior=PriorSpec())
        vae = cast(HierarchicalVAE, super().from_spec(placeholder, data_dim, image_shape, train, num_classes))
        data_range = (0.0, 1.0) if train is None else (float(train.min()), float(train.max()))
        top, estimate = vae.dims[0], vae._gaussians(vae.estimates)[-1]
        vae.prior = contracts.build(
            "prior",
            "vamp",
            spec.prior,
            top,
            data_dim=data_dim,
            encoder=vae.top_features,
            guide=estimate,
            data_range=data_range,
        )
        contracts.probe_prior("vamp", vae.prior, top)
        return vae

    def top_features(self, x: torch.Tensor) -> torch.Tensor:
        """d_L(x): the ladder's deterministic bottom-up pass d_1 = enc(x), d_(l+1) = MLP(d_l) (unconditional)."""
        h = self.encoder(x)
        for upward in self.upward:
            h = upward(h)
        return h

    @property
    def sites(self) -> list[str]:
        """The latent sites top-down: ``z{L}``, …, ``z1``."""
        return [f"z{len(self.dims) - i}" for i in range(len(self.dims))]

    def _scaled(self, kl_weight, layer: int):
        """β_l = ``kl_weight`` × the layer's own factor, on that layer's sites (β_l = 0 masks them)."""
        factor = self.kl_weights[layer]
        return self._kl_scale(kl_weight if factor == 1.0 else kl_weight * factor)

    def register(self, programs: tuple[str, ...] = ("model", "guide")) -> None:
        """``pyro.module`` for the one-layer parts and the layers' networks (the ladder's guide uses the model's
        conditional priors too)."""
        super().register(programs)
        if "model" in programs or self.structure == "ladder":
            pyro.module("conditionals", self.conditionals)
        if "guide" in programs:
            pyro.module("upward", self.upward)
            if self.structure == "ladder":
                pyro.module("estimates", self.estimates)

    def model(
        self, x: torch.Tensor, num_data: int | None = None, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(z_L) Π_l p(z_l | z_{l+1}) p_θ(x | z_1) over the plate, each layer's sites weighted by its β_l
        (given labels ``y``: p(z_L | y) Π_l p(z_l | z_{l+1}, y) p_θ(x | z_1, y))."""
        check_label_argument(self.num_classes, y)
        self.register(("model",))
        with self._plate(x, num_data):
            with self._scaled(kl_weight, 0):
                z = pyro.sample(self.sites[0], self.prior_distribution(y))
            for layer, conditional in enumerate(self.conditionals, start=1):
                with self._scaled(kl_weight, layer):
                    z = pyro.sample(self.sites[layer], conditional(self._labelled(z, y)))
            return pyro.sample("x", self.likelihood_distribution(z, y), obs=x)

    def guide(
        self, x: torch.Tensor, num_data: int | None = None, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q(z_1 | x) q(z_2 | z_1) … (``bottom-up``) or the ladder's top-down q, over the same plate and β_l
        (given labels ``y``, every factor also conditioned on y)."""
        check_label_argument(self.num_classes, y)
        self.register(("guide",))
        with self._plate(x, num_data):
            if self.structure == "bottom-up":
                return self._bottom_up(x, kl_weight, y)
            return self._ladder(x, kl_weight, y)

    def _labelled(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """[h, e_y] for a conditional VAE given labels ``y``; h otherwise."""
        return with_label(h, y, self.num_classes)

    def _bottom_up(self, x: torch.Tensor, kl_weight, y: torch.Tensor | None) -> torch.Tensor:
        bottom = len(self.dims) - 1
        with self._scaled(kl_weight, bottom):
            z = first = pyro.sample(self.sites[bottom], self.posterior(x, y))
        for step, upward in enumerate(self.upward, start=1):
            with self._scaled(kl_weight, bottom - step):
                z = pyro.sample(self.sites[bottom - step], upward(self._labelled(z, y)))
        return first

    def _ladder(self, x: torch.Tensor, kl_weight, y: torch.Tensor | None) -> torch.Tensor:
        h = self.encoder(x)
        first = self.guide_head(self._labelled(h, y))
        estimates = [(first.mean, first.stddev)]  # bottom-up: z_1, z_2, …
        for upward, estimate in zip(self.upward, self._gaussians(self.estimates)):
            h = upward(self._labelled(h, y))
            estimates.append(estimate.moments(h))
        estimates.reverse()  # top-down
        with self._scaled(kl_weight, 0):
            z = pyro.sample(self.sites[0], distributions.DiagonalNormal(*estimates[0]))
        for layer, conditional in enumerate(self._gaussians(self.conditionals), start=1):
            with self._scaled(kl_weight, layer):
                prior_moments = conditional.moments(self._labelled(z, y))
                z = pyro.sample(self.sites[layer], precision_merge(*estimates[layer], *prior_moments))
        return z

    @staticmethod
    def _gaussians(modules: nn.ModuleList) -> list[ConditionalGaussian]:
        return [cast(ConditionalGaussian, module) for module in modules]

    # -- what users expect of a VAE object ----------------------------------------
    @torch.no_grad()
    def layer_means(
        self, x: torch.Tensor, num_samples: int = 64, y: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """E_q[z_l | x] (E_q[z_l | x, y] given labels ``y``) per layer (top-down names), each (B, d_l): the mean of
        q(z_l | its parents) averaged over ``num_samples`` draws of the parents (exact for the first layer the
        guide draws)."""
        plate = pyro.plate("layer_means", num_samples, dim=-2)
        with poutine.block(), pyro.validation_enabled(False):
            trace = poutine.trace(plate(self.guide)).get_trace(x, y=y)
        return {name: cast(dist.TorchDistribution, trace.nodes[name]["fn"]).mean.mean(0) for name in self.sites}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of z_1's guide: q(z_1|x) (``bottom-up``), the ladder's bottom-up estimate
        (given labels ``y``, of q(z_1|x,y))."""
        check_label_argument(self.num_classes, y)
        return self.guide_head.moments(self._labelled(self.encoder(x), y))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z_1 = E_q[z_1 | x]] (:meth:`layer_means`; given labels ``y``, E[x | z_1 = E_q[z_1 | x, y], y])."""
        check_label_argument(self.num_classes, y)
        z = self.layer_means(x, y=y)[self.sites[-1]]
        return self.likelihood.mean(self.decoder(self._labelled(z, y)))

    @torch.no_grad()
    def sample_layers(self, n: int, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Ancestral draws z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}): ``n`` of each layer, top-down; given ``n``
        labels ``y``, the i-th draw is z_L ~ p(z_L | y_i), z_l ~ p(z_l | z_{l+1}, y_i)."""
        check_label_argument(self.num_classes, y)
        if y is not None and y.shape != (n,):
            raise ValueError(f"sample({n}) takes {n} labels y, got shape {tuple(y.shape)}")
        z = [self.prior_distribution().sample((n,)) if y is None else self.prior_distribution(y).sample()]
        for conditional in self.conditionals:
            z.append(conditional(self._labelled(z[-1], y)).sample())
        return z

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, y: torch.Tensor | None = None) -> torch.Tensor:
        """n ancestral draws through the layers, then E[x | z_1] (``mean=True``) or x ~ p(x | z_1); given ``n``
        labels ``y``, every layer and the decoder take the i-th draw's label."""
        out = self.decoder(self._labelled(self.sample_layers(n, y)[-1], y))
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()

    def encoder_parameters(self) -> list[nn.Parameter]:
        """φ: the encoder, the guide head and the guide's own layer networks."""
        own = [*self.upward.parameters()] + ([*self.estimates.parameters()] if self.structure == "ladder" else [])
        return [*super().encoder_parameters(), *own]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """θ: the decoder, p(z_L), the conditional priors and the likelihood."""
        return [*super().decoder_parameters(), *self.conditionals.parameters()]
