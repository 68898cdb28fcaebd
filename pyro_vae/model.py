"""The VAE as a Pyro program: ``model(x)`` and ``guide(x)`` built from the parts.

model::

    θ   ← pyro.module(decoder, prior, likelihood)
    for each example i in the data plate (size N, minibatch of B, scale N/B):
        z_i ~ p(z)                          (``model.prior``)
        x_i ~ p_θ(x | z_i) = lik(dec_θ(z_i)) (``model.likelihood``)

guide::

    φ   ← pyro.module(encoder, guide head)
    for each example i in the same plate:
        z_i ~ q_φ(z | x_i), reparameterized (``model.guide``)

so one ``svi.step(x, num_data=N)`` on a minibatch estimates the full-data ELBO

    ELBO = Σ_i E_q[log p_θ(x_i|z)] − KL(q_φ(z|x_i) ‖ p(z)).

``kl_weight`` β, an argument of both programs (``svi.step(x, num_data=N,
kl_weight=0.5)``; Pyro passes the same arguments to model and guide), scales
the z sites (``poutine.scale``; β = 0 masks them): the objective becomes
E_q[log p(x|z)] − β KL, the β-VAE. Both programs register their modules with
``pyro.module`` on every call, as Pyro's own examples do, so ``SVI`` with a
``pyro.optim`` optimizer finds the parameters in the param store; the
package's trainer steps ``torch.optim`` over ``vae.parameters()`` instead.

Under ``model.condition: label`` both programs also take ``y``, the labels
(B,), and the prior, decoder and guide take the one-hot label
(:mod:`pyro_vae.conditional`); an unconditional VAE's programs take no ``y``.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae import conditional
from pyro_vae.config.spec import SEMISUPERVISED, ModelSpec
from pyro_vae.errors import UserInputError
from pyro_vae.parts import contracts
from pyro_vae.parts.decoded import DecodedInBlocks


class VAE(nn.Module):
    """Encoder, decoder, prior, guide head and likelihood, with the Pyro model and guide."""

    traceable = True  # the programs' structure never depends on tensor values (pyro_vae.training.compiled)

    def __init__(
        self,
        encoder: contracts.Encoder,
        decoder: contracts.Decoder,
        guide_head: contracts.Guide,
        prior: contracts.Prior,
        likelihood: contracts.Likelihood,
        latent_dim: int,
        num_classes: int = 0,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.guide_head, self.prior, self.likelihood = guide_head, prior, likelihood
        self.latent_dim = latent_dim
        self.num_classes = num_classes  # K of a conditional VAE (the one-hot label's width); 0: unconditional

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
    ) -> "VAE":
        """Build every part through the registry, each checked against its contract (:mod:`pyro_vae.parts.contracts`).

        A part that lacks a member, or whose shapes disagree with ``data_dim`` and
        ``spec.latent_dim`` on a probe batch, is a one-line UserInputError naming it.

        ``train`` (N, D), the training split, sets what depends on the data: the
        decoder's output bias where :func:`output_bias_start` gives ``data-mean``
        (the likelihood's output for the mean training example, so p(x|z) starts
        at the mean image) and the VampPrior's pseudo-input range [min x, max x].
        Where it gives ``zero``, or without ``train`` (a checkpoint is about to
        be loaded), the bias starts at zero and the range at [0, 1].

        With ``model.latents`` the result is a :class:`pyro_vae.hierarchy.HierarchicalVAE`: these parts
        sit on z_1 (``spec.latent_dim``) and the prior is that of the top layer.

        ``num_classes``, the data's number of classes, is needed under
        ``model.condition: label``: the decoder then takes [z, e_y], the guide
        head [features, e_y], and the prior (of the top layer) is :class:`pyro_vae.conditional.ConditionalNormal`.

        Under ``model.condition: semisupervised`` the result is a
        :class:`pyro_vae.semisupervised.SemiSupervisedVAE` (M2) whose labeled examples' log q(y|x) weighs
        ``classifier_weight`` (ω) in its objective, and whose training batches, with ``strata`` = (N_l, N_u),
        are stratified by label (:mod:`pyro_vae.training.batches`).
        """
        if spec.condition == SEMISUPERVISED and cls is VAE:
            from pyro_vae.semisupervised import SemiSupervisedVAE  # M2 subclasses this one

            return SemiSupervisedVAE.from_spec(
                spec, data_dim, image_shape, train, num_classes, classifier_weight, strata
            )
        if spec.latents and cls is VAE:
            from pyro_vae.hierarchy import HierarchicalVAE  # the layered VAE subclasses this one

            return HierarchicalVAE.from_spec(spec, data_dim, image_shape, train, num_classes)
        d = spec.latent_dim
        top = spec.latents[0].dim if spec.latents else d  # the prior's layer: z_L (z_1 = z for one layer)
        k = conditional.label_width(spec.condition, num_classes)
        data_range = (0.0, 1.0) if train is None else (float(train.min()), float(train.max()))
        encoder = contracts.build("encoder", spec.encoder.type, spec.encoder, "encoder", data_dim, None, image_shape)
        features = contracts.probe_encoder(spec.encoder.type, encoder, data_dim)
        decoder = contracts.build("decoder", spec.decoder.type, spec.decoder, "decoder", d + k, data_dim, image_shape)
        output = contracts.probe_decoder(spec.decoder.type, decoder, d + k, data_dim)
        guide_head = contracts.build("guide", spec.guide.type, spec.guide, encoder.output_dim + k, d)
        contracts.probe_guide(spec.guide.type, guide_head, conditional.padded(features, k), d)
        prior = (
            conditional.ConditionalNormal(k, top)
            if k
            else contracts.build(
                "prior",
                spec.prior.type,
                spec.prior,
                top,
                data_dim=data_dim,
                encoder=encoder,
                guide=guide_head,
                data_range=data_range,
            )
        )
        if not k:
            contracts.probe_prior(spec.prior.type, prior, top)
        likelihood = contracts.build("likelihood", spec.likelihood.type, spec.likelihood, data_dim)
        contracts.probe_likelihood(spec.likelihood.type, likelihood, output, data_dim)
        with torch.no_grad():
            if train is not None and output_bias_start(spec) == "data-mean":
                decoder.output_bias.copy_(likelihood.output_for_mean(train.mean(0)))
            else:
                decoder.output_bias.zero_()
        return cls.assemble(spec, encoder, decoder, guide_head, prior, likelihood, k)

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
    ) -> "VAE":
        """The VAE of the built parts for ``spec`` (``num_classes``: the label's width of a conditional VAE)."""
        return cls(encoder, decoder, guide_head, prior, likelihood, spec.latent_dim, num_classes)

    @property
    def conditions_on_labels(self) -> bool:
        """Whether its figures are conditional on the examples' labels (log p(x | y)): a conditional VAE's are."""
        return bool(self.num_classes)

    # -- the distributions, usable without Pyro's effect handlers ------------------
    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """q_φ(z | x) (q_φ(z | x, y) given labels ``y``), batch shape (B,), event shape (d,)."""
        h = conditional.with_label(self.encoder(x), y, self.num_classes)
        return self.guide_head(h)  # type: ignore[return-value]  # the parts return Pyro distributions

    def prior_distribution(self, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(z), event shape (d,); given labels ``y`` (B,), p(z | y) with batch shape (B,)."""
        if y is not None:
            label = conditional.one_hot(y, self.num_classes)
            return self.prior(label)  # type: ignore[call-arg,return-value]  # the conditional prior takes the label
        return self.prior()  # type: ignore[return-value]  # the parts return Pyro distributions

    def likelihood_distribution(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p_θ(x | z) (p_θ(x | z, y) given labels ``y``), batch shape z.shape[:-1], event shape (D,)."""
        return DecodedInBlocks.of(self._decoded, conditional.with_label(z, y, self.num_classes))

    def _decoded(self, z: torch.Tensor) -> dist.TorchDistribution:
        return self.likelihood(self.decoder(z))  # type: ignore[return-value]  # the parts return Pyro distributions

    # -- the Pyro program ---------------------------------------------------------
    def _plate(self, x: torch.Tensor, num_data: int | None) -> pyro.plate:
        batch = x.shape[0]
        if num_data is None or num_data == batch:
            return pyro.plate("data", batch, dim=-1)
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device), dim=-1)

    @staticmethod
    def _kl_scale(kl_weight):
        """β on the z sites; β = 0 masks them (Pyro's scale must be positive), leaving E_q[log p(x|z)]."""
        if isinstance(kl_weight, (int, float)) and kl_weight == 1.0:
            return contextlib.nullcontext()
        if isinstance(kl_weight, (int, float)) and kl_weight == 0.0:
            return poutine.mask(mask=False)
        return poutine.scale(scale=kl_weight)  # a float in (0, ∞), or a traced step's tensor β

    def register(self, programs: tuple[str, ...] = ("model", "guide")) -> None:
        """``pyro.module`` for the modules of the model (decoder, prior, likelihood) and of the guide."""
        names = {
            "model": (("decoder", self.decoder), ("prior", self.prior), ("likelihood", self.likelihood)),
            "guide": (("encoder", self.encoder), ("guide", self.guide_head)),
        }
        for program in programs:
            for name, module in names[program]:
                pyro.module(name, module)  # type: ignore[arg-type]  # every part is an nn.Module (contracts)

    def model(
        self, x: torch.Tensor, num_data: int | None = None, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(z) p_θ(x|z) (p(z|y) p_θ(x|z,y) given labels ``y``) over a minibatch scaled to ``num_data`` examples,
        the z sites weighted by β."""
        conditional.check_label_argument(self.num_classes, y)
        self.register(("model",))
        with self._plate(x, num_data):
            with self._kl_scale(kl_weight):
                z = pyro.sample("z", self.prior_distribution(y))
            return pyro.sample("x", self.likelihood_distribution(z, y), obs=x)

    def guide(
        self, x: torch.Tensor, num_data: int | None = None, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q_φ(z|x) (q_φ(z|x,y) given labels ``y``) over the same plate, with the same β."""
        conditional.check_label_argument(self.num_classes, y)
        self.register(("guide",))
        with self._plate(x, num_data):
            with self._kl_scale(kl_weight):
                return pyro.sample("z", self.posterior(x, y))

    # -- what users expect of a VAE object ----------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of q(z|x) (q(z|x,y) given labels ``y``), each (B, d)."""
        conditional.check_label_argument(self.num_classes, y)
        return self.guide_head.moments(conditional.with_label(self.encoder(x), y, self.num_classes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z = posterior mean] (and y, given labels ``y``): the decoder's mean at the encoder's mean."""
        mean, _ = self.encode(x, y)
        return self.likelihood.mean(self.decoder(conditional.with_label(mean, y, self.num_classes)))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, y: torch.Tensor | None = None) -> torch.Tensor:
        """n draws z ~ p(z), then E[x|z] (``mean=True``) or x ~ p(x|z); given labels ``y`` (n of them), the i-th
        draw is z ~ p(z|y_i), then x from p(x|z,y_i)."""
        conditional.check_label_argument(self.num_classes, y)
        if y is not None and y.shape != (n,):
            raise ValueError(f"sample({n}) takes {n} labels y, got shape {tuple(y.shape)}")
        z = self.prior_distribution().sample((n,)) if y is None else self.prior_distribution(y).sample()
        out = self.decoder(conditional.with_label(z, y, self.num_classes))
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()

    def encoder_parameters(self) -> list[nn.Parameter]:
        """φ: the guide's parameters (encoder and guide head)."""
        return [*self.encoder.parameters(), *self.guide_head.parameters()]  # type: ignore[attr-defined]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """θ: the model's own parameters (decoder, prior, likelihood)."""
        return [*self.decoder.parameters(), *self.prior.parameters(), *self.likelihood.parameters()]  # type: ignore[attr-defined]


# the activations measured on MNIST to train better from the mean-image start than from zero (docs/init.md)
DATA_MEAN_ACTIVATIONS = frozenset({"tanh", "gelu", "silu", "gated"})


def output_bias_start(spec: ModelSpec) -> str:
    """How the decoder's output bias starts: ``data-mean`` or ``zero``, from ``model.decoder.init_bias``.

    ``auto`` is ``data-mean`` when both the encoder's and the decoder's
    activation are in :data:`DATA_MEAN_ACTIVATIONS`, ``zero`` otherwise (ReLU,
    softplus, and the activations not measured). Why: at the mean-image start
    the reconstruction term is already at its best for a decoder that ignores
    z, so the first Adam steps follow the KL term, pulling the encoder onto the
    prior and the decoder towards ignoring z (posterior collapse for the first
    hundred or so steps). A ReLU unit gets there by going silent on every input,
    where its gradient is zero, and stays silent for the rest of training; a
    softplus unit by a pre-activation far below zero, where its gradient
    vanishes. tanh, GELU, SiLU and gated units keep a gradient and come back. From the
    zero start the decoder first draws the mean image through its hidden units,
    which keeps them active.
    """
    choice = spec.decoder.init_bias
    if choice != "auto":
        return choice
    both = {spec.encoder.activation, spec.decoder.activation}
    return "data-mean" if both <= DATA_MEAN_ACTIVATIONS else "zero"


def check_likelihood_support(vae: VAE, data: torch.Tensor, likelihood_name: str, what: str) -> None:
    """Refuse to train when the data fall outside the likelihood's support."""
    if not vae.likelihood.holds(data):
        raise UserInputError(
            f"'model.likelihood.type' {likelihood_name!r} needs values in {vae.likelihood.support_name}; "
            f"{what} has values in [{data.min():.3g}, {data.max():.3g}]"
        )
