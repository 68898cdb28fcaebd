"""One density: a part is scored by the density it is trained with, a user's subclass included.

Two plugin parts that change the density by overriding ``forward``: a Bernoulli
likelihood with a temperature on the logits and an MLP decoder whose outputs
are rescaled. ``evaluate`` (and the per-epoch test ELBO) must give what a plain
computation of the plugin's own density gives on the same draws.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch.distributions import Bernoulli, Normal

from pyro_vae import evaluation
from pyro_vae.config import registry
from pyro_vae.config.spec import load_spec
from pyro_vae.model import VAE
from pyro_vae.parts import decoded, likelihoods, networks
from pyro_vae.training.trainer import Trainer

TEMPERATURE, RESCALE = 2.5, 3.0


class TemperedBernoulli(likelihoods.Bernoulli):
    def forward(self, out: torch.Tensor):
        return super().forward(out / TEMPERATURE)


class RescaledDecoder(networks.MLPDecoder):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return RESCALE * super().forward(z)


def tempered(spec, data_dim):
    return TemperedBernoulli()


def rescaled(spec, role, input_dim, output_dim, image_shape):
    if role == "encoder":
        return networks.MLPEncoder(input_dim, spec.hidden, spec.activation)
    return RescaledDecoder(input_dim, spec.hidden, output_dim, spec.activation)


@pytest.fixture
def plugin_parts(monkeypatch):
    """The two plugin parts registered in copies of the registry's tables, gone after the test."""
    monkeypatch.setattr(registry, "_TABLES", {kind: dict(table) for kind, table in registry._TABLES.items()})
    monkeypatch.setattr(registry, "_CONFIGS", dict(registry._CONFIGS))
    registry.register("likelihood", "test-tempered-bernoulli")(tempered)
    registry.register("network", "test-rescaled-mlp")(rescaled)


SMALL = [
    "data.train_size=200",
    "data.test_size=40",
    "model.latent_dim=3",
    "model.encoder.hidden=[16]",
    "model.decoder.hidden=[16]",
    "model.decoder.activation=tanh",
    "train.epochs=1",
]


def plain_log_w(vae: VAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) + log p(z) − log q(z|x) from torch's own distributions and the plugin's formula, (K, B)."""
    h = vae.encoder(x)
    loc, scale = (
        vae.guide_head.loc(h),
        torch.nn.functional.softplus(vae.guide_head.raw_scale(h)) + vae.guide_head.min_scale,
    )
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    logits = vae.decoder.net(z)
    if isinstance(vae.decoder, RescaledDecoder):
        logits = RESCALE * logits
    if isinstance(vae.likelihood, TemperedBernoulli):
        logits = logits / TEMPERATURE
    return Bernoulli(logits=logits).log_prob(x).sum(-1) + log_prior - log_q


@pytest.mark.parametrize(
    "override",
    [
        ["model.likelihood.type=test-tempered-bernoulli"],
        ["model.decoder.type=test-rescaled-mlp", "model.encoder.type=test-rescaled-mlp"],
    ],
)
def test_evaluate_scores_a_plugin_by_its_own_density(override, monkeypatch, plugin_parts):
    trainer = Trainer(load_spec(None, [*SMALL, *override]), None, show_progress=False)
    trainer.fit()
    vae, x = trainer.vae.eval(), trainer.data.test
    k = 64
    assert k * x.shape[0] > decoded.ROWS  # on a CPU the likelihood is scored by blocks of rows
    draws = []
    real_rsample = torch.distributions.Normal.rsample

    def recording_rsample(self, sample_shape=torch.Size()):  # keep the ε evaluate draws, to recompute on them
        value = real_rsample(self, sample_shape)
        draws.append(value.detach().clone())
        return value

    monkeypatch.setattr(torch.distributions.Normal, "rsample", recording_rsample)
    pyro.set_rng_seed(0)
    result = evaluation.evaluate(vae, x, num_samples=k, per_example=True)
    monkeypatch.undo()
    z = torch.cat([d.reshape(-1, *d.shape[-2:]) for d in draws if d.dim() == 3 and d.shape[0] == k], dim=1)
    assert z.shape == (k, x.shape[0], 3)  # every guide draw of the evaluation, (K, B, d)
    with torch.no_grad():
        log_w = plain_log_w(vae, x, z).double()
    expected = torch.logsumexp(log_w, 0) - math.log(k)
    assert torch.allclose(result["per_example"]["log_likelihood"], expected, atol=1e-3)
    assert torch.allclose(result["per_example"]["elbo"], log_w.mean(0), atol=1e-3)
    # the density really differs from the parent part's: the test would catch a parent-class shortcut
    parent = VAE.from_spec(load_spec(None, SMALL).model, x.shape[1], trainer.data.image_shape)
    parent.load_state_dict(vae.state_dict())
    with torch.no_grad():
        assert (plain_log_w(parent, x, z).double() - log_w).abs().mean() > 0.1
