r"""The semi-supervised M2 VAE (Kingma, Rezende, Mohamed & Welling 2014), ``model.condition: semisupervised``.

With C classes, e_y the one-hot class, and the parts of the spec::

    model:  y ~ p(y) = Cat(1/C),  z ~ p(z) (``model.prior``),  x ~ p_θ(x | y, z) = lik(dec_θ([z, e_y]))
    guide:  y ~ q_φ(y | x) = Cat(softmax(cls_φ(x)))  (``model.classifier``: a network and a linear layer to C logits)
            z ~ q_φ(z | x, y) = head_φ([enc_φ(x), e_y])

For a labeled example (x, y) the bound is the conditional VAE's, plus log p(y)::

    L(x, y) = E_{q(z|x,y)}[log p(x|y,z) + log p(y) + log p(z) − log q(z|x,y)]  ≤  log p(x, y)

and for an unlabeled example y is a latent variable::

    U(x) = Σ_y q(y|x) L(x, y) + H(q(y|x))  ≤  log p(x).

The training objective over N examples of which the N_l in the labeled subset keep their labels
(``data.num_labeled``, :func:`pyro_vae.data.labeled_subset`) is Kingma et al.'s eq. (9)::

    J^α = Σ_labeled L(x, y) + Σ_unlabeled U(x) + ω Σ_labeled log q(y|x)

with ω the classifier's weight per labeled example (``model.classifier_weight``): ``kingma`` is
ω = α / N_l with Kingma et al.'s α = 0.1·N (their J^α adds α·E_{p̃_l}[log q(y|x)], the mean over
the labeled examples); Pyro's SS-VAE example (``examples/vae/ss_vae_M2.py``, ``--aux-loss``) uses
ω = 300 (its ``--aux-loss-multiplier`` default). ``train.beta`` weights the z sites only.

In the Pyro program, a minibatch of B examples is split by its labels
(−1 marks an example used without its label): the labeled ones in the plate ``labeled``, where y is
observed (``obs=y``) and the term ω log q(y|x) is the factor site ``classifier``; the others in the
plate ``unlabeled``, where the guide samples y from q(y|x) — the site that ``enum``
(:class:`~pyro_vae.infer.discrete_estimators.Enum_ELBO`, ``TraceEnum_ELBO`` with parallel
enumeration) sums out exactly, giving U(x) with no sampling noise from y. With batches drawn
uniformly from all N, both plates are scaled by N/B; with batches stratified by label
(``data.labeled_per_batch`` = B_l, :mod:`pyro_vae.training.batches`), the labeled plate by N_l/B_l
and the unlabeled one by N_u/B_u. Either way a step's loss is an unbiased estimate of −J^α over the
whole training set (nats summed over the N examples; per example ÷ N). The labeled share of a
uniform batch varies from batch to batch, so the program's structure depends on the labels: it
runs eagerly (never traced).

Every figure of the test set is that of log p(x), labels unseen: the per-epoch test ELBO samples y
from q(y|x) (:func:`pyro_vae.evaluation.test_elbo`); :func:`evaluate` sums y out exactly; the test
classification error is argmax_y q(y|x) against the labels (:func:`classification`).
"""

from __future__ import annotations

import math
from typing import Iterator

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae.config.spec import ModelSpec
from pyro_vae.errors import UserInputError
from pyro_vae.evaluation import diagnostics
from pyro_vae.infer.log_weights import log_weights
from pyro_vae.model import VAE, output_bias_start
from pyro_vae.parts import contracts
from pyro_vae.parts.decoded import DecodedInBlocks

KINGMA = "kingma"  # model.classifier_weight: Kingma et al.'s α = 0.1·N, divided among the N_l labeled examples
KINGMA_ALPHA = 0.1  # α / N in Kingma et al. 2014, section 4
UNLABELED = -1  # the label of an example used without its label
CLASSIFIER_SITE = "classifier"  # the factor site ω log q(y|x) of the labeled examples


def classifier_weight(setting: float | str, num_train: int, num_labeled: int) -> float:
    """ω, the weight of each labeled example's log q(y|x): the number given, or (``kingma``) 0.1·N / N_l."""
    if setting == KINGMA:
        return KINGMA_ALPHA * num_train / num_labeled
    return float(setting)


def joined(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[h, e_y] along the last dimension, h's and y's leading dimensions broadcast together (y enumerated: (C, 1))."""
    e = (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(h.dtype)
    shape = torch.broadcast_shapes(h.shape[:-1], e.shape[:-1])
    return torch.cat([h.expand(*shape, h.shape[-1]), e.expand(*shape, num_classes)], dim=-1)


class Classifier(nn.Module):
    """x ↦ the logits of q(y|x): a network of ``model.classifier`` and a linear layer to the C classes."""

    def __init__(self, network: contracts.Encoder, num_classes: int):
        super().__init__()
        self.network, self.head = network, nn.Linear(network.output_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.network(x))


class SemiSupervisedVAE(VAE):
    """M2: the VAE's encoder, decoder, guide head, prior and likelihood with the class y, and a classifier q(y|x)."""

    traceable = False  # the plates' sizes depend on which examples of a batch are labeled
    conditions_on_labels = False  # its figures are those of log p(x), labels unseen

    def __init__(self, *parts, classifier: Classifier, weight: float, strata: tuple[int, int] | None = None):
        """``strata``: (N_l, N_u) where training batches are stratified by label, else None (uniform batches)."""
        super().__init__(*parts)
        self.classifier, self.weight, self.strata = classifier, weight, strata

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        data_dim: int,
        image_shape: tuple[int, int, int] | None = None,
        train: torch.Tensor | None = None,
        num_classes: int | None = None,
        weight: float = 0.0,
        strata: tuple[int, int] | None = None,
    ) -> "SemiSupervisedVAE":
        """The parts through the registry, each probed as :meth:`VAE.from_spec` probes them; ω = ``weight``;
        ``strata`` = (N_l, N_u) where training batches are stratified by label.

        The decoder takes [z, e_y] and the guide head [enc(x), e_y]; the prior is ``model.prior`` (unconditional).
        Data without labels are a one-line UserInputError.
        """
        if not num_classes:
            raise UserInputError(
                "'model.condition' is 'semisupervised' but the data have no labels; datasets with labels: digits, "
                "mnist, fashion-mnist, or data.name file with a .npz of arrays x and labels"
            )
        d, k = spec.latent_dim, num_classes
        encoder = contracts.build("encoder", spec.encoder.type, spec.encoder, "encoder", data_dim, None, image_shape)
        features = contracts.probe_encoder(spec.encoder.type, encoder, data_dim)
        network = contracts.build(
            "encoder", spec.classifier.type, spec.classifier, "encoder", data_dim, None, image_shape
        )
        contracts.probe_encoder(spec.classifier.type, network, data_dim)
        decoder = contracts.build("decoder", spec.decoder.type, spec.decoder, "decoder", d + k, data_dim, image_shape)
        output = contracts.probe_decoder(spec.decoder.type, decoder, d + k, data_dim)
        guide_head = contracts.build("guide", spec.guide.type, spec.guide, encoder.output_dim + k, d)
        contracts.probe_guide(spec.guide.type, guide_head, joined(features, torch.zeros(1).long(), k), d)
        prior = contracts.build("prior", spec.prior.type, spec.prior, d, data_dim=data_dim)
        contracts.probe_prior(spec.prior.type, prior, d)
        likelihood = contracts.build("likelihood", spec.likelihood.type, spec.likelihood, data_dim)
        contracts.probe_likelihood(spec.likelihood.type, likelihood, output, data_dim)
        with torch.no_grad():
            if train is not None and output_bias_start(spec) == "data-mean":
                decoder.output_bias.copy_(likelihood.output_for_mean(train.mean(0)))
            else:
                decoder.output_bias.zero_()
        parts = (encoder, decoder, guide_head, prior, likelihood, d, k)
        return cls(*parts, classifier=Classifier(network, k), weight=weight, strata=strata)

    # -- the distributions ----------------------------------------------------------
    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y|x) for every class, (B, C), normalized."""
        return torch.log_softmax(self.classifier(x), dim=-1)

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """q(z | x, y); without ``y``, at the classifier's most probable class."""
        y = self.predict(x) if y is None else y
        return self.guide_head(joined(self.encoder(x), y, self.num_classes))  # type: ignore[return-value]

    def likelihood_distribution(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x | y, z); without ``y``, at y = 0 (every class of a grid is drawn by :meth:`sample` with its ``y``)."""
        y = torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device) if y is None else y
        return DecodedInBlocks.of(self._decoded, joined(z, y, self.num_classes))

    def class_prior(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> dist.Categorical:
        """p(y) = Cat(1/C) with batch shape ``shape``."""
        return dist.Categorical(logits=like.new_zeros(*shape, self.num_classes))

    # -- the Pyro program -------------------------------------------------------------
    def register(self, programs: tuple[str, ...] = ("model", "guide")) -> None:
        super().register(programs)
        if "guide" in programs:
            pyro.module("classifier", self.classifier)

    @staticmethod
    def parts_of(x: torch.Tensor, y: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """``(plate name, examples, labels)``: the labeled examples (if any), then the unlabeled ones (if any)."""
        if y is None:
            yield "unlabeled", x, None
            return
        labeled = y != UNLABELED
        if bool(labeled.any()):
            yield "labeled", x[labeled], y[labeled]
        if not bool(labeled.all()):
            yield "unlabeled", x[~labeled], None

    def _batch_scale(self, x: torch.Tensor, part: torch.Tensor, labeled: bool, num_data: int | None):
        """The scale of the sites of ``part`` (B_part of the batch's B examples): N/B for a uniform minibatch of B of
        the N examples; for a training batch stratified by label (``strata`` = (N_l, N_u); such a batch holds both
        parts), N_l/B_l on its B_l labeled examples and N_u/B_u on its B_u unlabeled ones; none without
        ``num_data``."""
        if num_data is None or num_data == x.shape[0]:
            return poutine.scale(scale=1.0)
        if self.strata is not None and num_data == sum(self.strata) and part.shape[0] < x.shape[0]:
            return poutine.scale(scale=self.strata[0 if labeled else 1] / part.shape[0])
        return poutine.scale(scale=num_data / x.shape[0])

    def model(
        self, x: torch.Tensor, num_data: int | None = None, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(y) p(z) p(x|y,z) over the labeled (y observed, plus the factor ω log q(y|x)) and unlabeled examples;
        returns ``x``."""
        self.register(("model",))
        for name, xs, ys in self.parts_of(x, y):
            suffix = "_labeled" if ys is not None else ""
            with self._batch_scale(x, xs, ys is not None, num_data), pyro.plate(name, xs.shape[0], dim=-1):
                label = pyro.sample(f"y{suffix}", self.class_prior(xs.shape[:1], xs), obs=ys)
                with self._kl_scale(kl_weight):
                    z = pyro.sample(f"z{suffix}", self.prior_distribution().expand([xs.shape[0]]))
                pyro.sample(f"x{suffix}", self.likelihood_distribution(z, label), obs=xs)
                if ys is not None and self.weight:
                    log_q = self.class_logits(xs).gather(-1, ys.unsqueeze(-1)).squeeze(-1)
                    pyro.factor(CLASSIFIER_SITE, self.weight * log_q)
        return x

    def guide(
        self, x: torch.Tensor, num_data: int | None = None, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q(z|x,y) for the labeled examples; q(y|x) q(z|x,y) for the unlabeled (y enumerable); returns the z drawn
        last (the unlabeled examples', where the batch has any)."""
        self.register(("guide",))
        draws: list[torch.Tensor] = []
        for name, xs, ys in self.parts_of(x, y):
            suffix = "_labeled" if ys is not None else ""
            with self._batch_scale(x, xs, ys is not None, num_data), pyro.plate(name, xs.shape[0], dim=-1):
                label = ys if ys is not None else pyro.sample("y", dist.Categorical(logits=self.classifier(xs)))
                q = self.guide_head(joined(self.encoder(xs), label, self.num_classes))
                with self._kl_scale(kl_weight):
                    draws.append(pyro.sample(f"z{suffix}", q))  # type: ignore[arg-type]  # a Pyro distribution
        return draws[-1]

    # -- what users expect ------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_y q(y|x), (B,)."""
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x, y) (y: the labels given, else argmax q(y|x)), each (B, d)."""
        y = self.predict(x) if y is None else y
        return self.guide_head.moments(joined(self.encoder(x), y, self.num_classes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | y, z = the mean of q(z|x,y)], y the labels given, else argmax q(y|x)."""
        y = self.predict(x) if y is None else y
        mean, _ = self.encode(x, y)
        return self.likelihood.mean(self.decoder(joined(mean, y, self.num_classes)))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, y: torch.Tensor | None = None) -> torch.Tensor:
        """n draws z ~ p(z) and y (the labels given, else y ~ p(y)), then E[x|y,z] (``mean``) or x ~ p(x|y,z)."""
        z = self.prior_distribution().sample((n,))
        y = self.class_prior((n,), z).sample() if y is None else y
        out = self.decoder(joined(z, y, self.num_classes))
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()

    def encoder_parameters(self) -> list[nn.Parameter]:
        """φ: the guide's parameters (encoder, guide head and classifier)."""
        return [*super().encoder_parameters(), *self.classifier.parameters()]


# -- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def test_error(vae: SemiSupervisedVAE, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 10_000) -> float:
    """The share of examples whose argmax_y q(y|x) is not their label."""
    wrong = sum(
        int((vae.predict(x[i : i + batch_size]) != labels[i : i + batch_size]).sum())
        for i in range(0, x.shape[0], batch_size)
    )
    return wrong / x.shape[0]


def classification(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """``{"test_error": …}`` for an M2 VAE on examples with labels; ``{}`` for any other VAE or without labels."""
    if not isinstance(vae, SemiSupervisedVAE) or labels is None:
        return {}
    was_training = vae.training
    vae.eval()
    error = test_error(vae, x, labels)
    vae.train(was_training)
    return {"test_error": error}


def class_log_weights(vae: SemiSupervisedVAE, x: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    """For each class c and K = ``num_samples`` draws z_{c,k} ~ q(z | x, c): the terms of
    log w_{c,k} = log p(c) + log p(z_{c,k}) + log p(x | c, z_{c,k}) − log q(z_{c,k} | x, c), each (C, K, B),
    from the labeled program (y = c for every example, the classifier's factor left out) through
    :func:`~pyro_vae.infer.log_weights.log_weights`: ``log_w``, ``log_likelihood`` (log p(x|c,z)) and ``kl``
    (KL(q(z|x,c) ‖ p(z)) in closed form where registered, else sampled) and ``log_prior_y`` (log p(c))."""
    model = poutine.block(vae.model, hide=[CLASSIFIER_SITE])
    out: dict[str, list[torch.Tensor]] = {"log_w": [], "log_likelihood": [], "kl": []}
    for c in range(vae.num_classes):
        y = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
        sites = log_weights(model, vae.guide, x, num_particles=num_samples, y=y)
        shape = sites.log_w.shape
        out["log_w"].append(sites.log_w)
        out["log_likelihood"].append(sites.model["x_labeled"].unweighted().expand(shape))
        out["kl"].append(sites.kl_terms()[0]["z_labeled"].expand(shape))
    return {name: torch.stack(values) for name, values in out.items()}


def summed_bounds(vae: SemiSupervisedVAE, x: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    r"""Per example, with y summed out exactly (q(y|x) from the classifier)::

        log W_k        = log Σ_c w_{c,k}      (E[W_k] = Σ_c E_{q(z|x,c)}[p(x,c,z)/q(z|x,c)] = p(x))
        log_likelihood = log (1/K) Σ_k W_k   (importance-sampled log p(x))
        elbo           = Σ_c q(c|x) [(1/K) Σ_k log w_{c,k} − log q(c|x)]   (U(x))
        reconstruction = Σ_c q(c|x) (1/K) Σ_k log p(x | c, z_{c,k})
        kl             = KL(q(y|x) ‖ p(y)) + Σ_c q(c|x) KL(q(z|x,c) ‖ p(z))

    so ``elbo`` = reconstruction − kl where each KL(q(z|x,c) ‖ p(z)) is closed form. ``log_W``: (K, B).
    """
    terms = class_log_weights(vae, x, num_samples)
    log_q = vae.class_logits(x)  # (B, C)
    q = log_q.exp().T.unsqueeze(1)  # (C, 1, B)
    log_q_c = log_q.T.unsqueeze(1)
    log_prior_y = -math.log(vae.num_classes)
    log_W = torch.logsumexp(terms["log_w"], 0)  # (K, B)
    kl_y = (q * (log_q_c - log_prior_y)).sum(0).squeeze(0)
    return {
        "log_W": log_W,
        "log_likelihood": torch.logsumexp(log_W, 0) - math.log(num_samples),
        "elbo": (q * (terms["log_w"] - log_q_c)).sum(0).mean(0),
        "reconstruction": (q * terms["log_likelihood"]).sum(0).mean(0),
        "kl": kl_y + (q * terms["kl"]).sum(0).mean(0),
    }


@torch.no_grad()
def evaluate(
    vae: SemiSupervisedVAE,
    data: torch.Tensor,
    num_samples: int = 1000,
    memory_mb: float = 512.0,
    per_example: bool = False,
    progress=None,
) -> dict:
    """:func:`pyro_vae.evaluation.evaluate`'s figures for an M2 VAE, y summed out exactly (:func:`summed_bounds`):
    ``elbo`` is U(x), ``log_likelihood`` the importance-sampled log p(x) of the weights W_k, whose ESS and k̂ are
    reported; every figure in nats per example, labels unseen."""
    from pyro_vae.evaluation.bounds import passes, rows_per_pass

    was_training = vae.training
    vae.eval()
    names = ("elbo", "reconstruction", "kl", "log_likelihood", "ess", "khat")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    rows = max(1, rows_per_pass(vae, data, memory_mb) // vae.num_classes)
    with pyro.validation_enabled(False):
        for start, stop, blocks in passes(data.shape[0], num_samples, rows):
            chunks = [summed_bounds(vae, data[start:stop], size) for size in blocks]
            log_W = torch.cat([chunk["log_W"] for chunk in chunks])
            weights = torch.tensor([size / num_samples for size in blocks], device=data.device, dtype=log_W.dtype)
            for name in ("elbo", "reconstruction", "kl"):
                parts[name].append(sum(w * chunk[name] for w, chunk in zip(weights, chunks)))
            parts["log_likelihood"].append(torch.logsumexp(log_W, 0) - math.log(num_samples))
            parts["ess"].append(diagnostics.effective_sample_fraction(log_W))
            parts["khat"].append(diagnostics.pareto_k(log_W).to(log_W.device))
            if progress is not None:
                progress.update(stop - start)
    vae.train(was_training)
    values = {name: torch.cat(v).double() for name, v in parts.items()}
    n = data.shape[0]

    def stderr(name: str) -> float:
        return (values[name].std() / math.sqrt(n)).item() if n > 1 else 0.0

    summary = {
        "elbo": values["elbo"].mean().item(),
        "elbo_analytic_kl": (values["reconstruction"] - values["kl"]).mean().item(),
        "reconstruction": values["reconstruction"].mean().item(),
        "kl": values["kl"].mean().item(),
        "log_likelihood": values["log_likelihood"].mean().item(),
        "elbo_stderr": stderr("elbo"),
        "log_likelihood_stderr": stderr("log_likelihood"),
        "num_samples": num_samples,
        "num_examples": n,
        "units": "nats per example",
        "class_summed": True,
        **diagnostics.summarize(values["ess"], values["khat"], num_samples),
    }
    if per_example:
        summary["per_example"] = {"elbo": values["elbo"].cpu(), "log_likelihood": values["log_likelihood"].cpu()}
    return summary
