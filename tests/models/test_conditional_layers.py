"""Labels with stochastic layers (``model.condition: label`` with ``model.latents``): the programs against their
definition, the label on every call path (traced step, evaluate, pictures, sample), and what the label buys on
digits."""

import json

import label_checks
import numpy as np
import pyro
import pytest
import torch
from sizes import SMALL
from torch.distributions import Bernoulli, Normal

from pyro_vae import training
from pyro_vae.cli.commands import main
from pyro_vae.config.spec import Spec, load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.hierarchy import HierarchicalVAE
from pyro_vae.infer import estimators  # noqa: F401  (registers the estimators)
from pyro_vae.infer.log_weights import log_weights
from pyro_vae.model import VAE
from pyro_vae.parts import contracts
from pyro_vae.training import compiled, path_choice

LABEL = "model.condition=label"
TWO_LAYERS = "model.latents=[{dim: 2}, {dim: 3, hidden: [5]}]"
K, D = 4, 6


def small_vae(structure: str) -> HierarchicalVAE:
    """A two-layer conditional VAE (z_2 of 2, z_1 of 3) for K classes and D pixels, every prior away from N(0, I)."""
    spec = load_spec(
        None,
        [
            LABEL,
            TWO_LAYERS,
            f"model.guide_structure={structure}",
            "model.encoder.hidden=[8]",
            "model.decoder.hidden=[8]",
            "model.decoder.init_bias=zero",
        ],
    )
    torch.manual_seed(0)
    vae = VAE.from_spec(spec.model, D, num_classes=K)
    assert isinstance(vae, HierarchicalVAE) and vae.num_classes == K
    with torch.no_grad():  # a top prior that differs by class, so a wrong class would show
        torch.nn.init.normal_(vae.prior.net.weight)
        torch.nn.init.normal_(vae.prior.net.bias, std=0.3)
    return vae


def gaussian(module, u: torch.Tensor) -> Normal:
    loc, scale = module.moments(u)
    return Normal(loc, scale)


def test_log_weight_of_a_conditional_bottom_up_two_layer_vae_is_its_definition():
    """log w = log p(z2|y) + log p(z1|[z2, e_y]) + log p(x|[z1, e_y]) − log q(z1|[enc x, e_y]) − log q(z2|[z1, e_y])."""
    vae = small_vae("bottom-up")
    x = torch.bernoulli(torch.full((5, D), 0.5))
    y = torch.tensor([0, 1, 2, 3, 1])
    sites = log_weights(vae.model, vae.guide, x, num_particles=2, y=y)
    z2, z1 = sites.guide["z2"].value, sites.guide["z1"].value
    assert z2.shape == (2, 5, 2) and z1.shape == (2, 5, 3)
    e = torch.nn.functional.one_hot(y, K).float().expand(2, 5, K)
    with torch.no_grad():
        loc, log_scale = (e @ vae.prior.net.weight.T + vae.prior.net.bias).split(2, dim=-1)
        log_p = Normal(loc, log_scale.exp()).log_prob(z2).sum(-1)
        log_p += gaussian(vae.conditionals[0], torch.cat([z2, e], -1)).log_prob(z1).sum(-1)
        log_p += Bernoulli(logits=vae.decoder(torch.cat([z1, e], -1))).log_prob(x).sum(-1)
        q1 = vae.guide_head(torch.cat([vae.encoder(x), e[0]], -1))
        log_q = Normal(q1.mean, q1.stddev).log_prob(z1).sum(-1)
        log_q += gaussian(vae.upward[0], torch.cat([z1, e], -1)).log_prob(z2).sum(-1)
    assert torch.allclose(sites.log_w, log_p - log_q, atol=1e-5)


def test_the_ladder_guide_takes_the_label_in_its_bottom_up_pass_and_its_top_down_merge():
    """q(z2|x,y) = N(estimate of MLP([enc x, e_y])); q(z1|z2,x,y) the merge of head([enc x, e_y]) and p(z1|[z2,e_y])."""
    vae = small_vae("ladder")
    x = torch.bernoulli(torch.full((5, D), 0.5))
    y = torch.tensor([3, 2, 1, 0, 2])
    sites = log_weights(vae.model, vae.guide, x, y=y)
    z2, z1 = sites.guide["z2"].value, sites.guide["z1"].value
    e = torch.nn.functional.one_hot(y, K).float()
    with torch.no_grad():
        h = vae.encoder(x)
        q2 = gaussian(vae.estimates[0], vae.upward[0](torch.cat([h, e], -1)))
        first = vae.guide_head(torch.cat([h, e], -1))
        precision = first.stddev.pow(-2)
        prior_loc, prior_scale = vae.conditionals[0].moments(torch.cat([z2, e.expand(*z2.shape[:-1], K)], -1))
        prior_precision = prior_scale.pow(-2)
        variance = 1 / (precision + prior_precision)
        loc = (first.mean * precision + prior_loc * prior_precision) * variance
        log_q = q2.log_prob(z2).sum(-1) + Normal(loc, variance.sqrt()).log_prob(z1).sum(-1)
    guide_log_q = sites.guide["z2"].log_prob + sites.guide["z1"].log_prob
    assert torch.allclose(guide_log_q, log_q, atol=1e-5)


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
def test_the_traced_step_is_the_eager_step_bit_for_bit_with_labels_and_layers(structure):
    vae = small_vae(structure)
    x = torch.bernoulli(torch.full((8, D), 0.5))
    y = torch.arange(8) % K
    elbo = contracts.build("estimator", "meanfield", Spec().inference)
    results = []
    for step in (path_choice.eager_step(elbo, vae), compiled.CompiledStep(elbo, vae, inductor=False)):
        torch.manual_seed(2)
        vae.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            loss = step(x, 100, 0.5, y)
        results.append((loss.clone(), [p.grad.clone() for p in vae.parameters()]))
    assert step.mode == "traced"
    (eager_loss, eager_grads), (traced_loss, traced_grads) = results
    assert torch.equal(eager_loss, traced_loss)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, traced_grads))


def test_ancestral_draws_follow_each_draws_label_through_every_layer():
    vae = small_vae("bottom-up")
    y = torch.tensor([0, 3])
    torch.manual_seed(3)
    z2, z1 = vae.sample_layers(2, y)
    torch.manual_seed(3)
    e = torch.nn.functional.one_hot(y, K).float()
    loc, log_scale = (e @ vae.prior.net.weight.T + vae.prior.net.bias).split(2, dim=-1)
    expected_z2 = Normal(loc, log_scale.exp()).sample()
    expected_z1 = vae.conditionals[0](torch.cat([expected_z2, e], -1)).sample()
    assert torch.equal(z2, expected_z2) and torch.equal(z1, expected_z1)
    assert vae.sample(2, y=y).shape == (2, D)
    with pytest.raises(ValueError, match="pass the labels as y"):
        vae.sample(2)


def test_the_spec_takes_labels_with_layers_and_still_refuses_a_top_prior_it_cannot_condition():
    assert load_spec("digits", [LABEL, TWO_LAYERS]).model.condition == "label"
    with pytest.raises(UserInputError, match="'model.condition' label .* accepted with it: standard-normal"):
        load_spec("digits", [LABEL, TWO_LAYERS, "model.prior.type=mog"])


# -- the command line -----------------------------------------------------------------------------


def test_a_conditional_two_layer_run_trains_evaluates_pictures_and_samples_by_label(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [*SMALL, LABEL, "model.latents=[{dim: 2}, {dim: 3, hidden: [8]}]", "train.pictures=cheap"]
    assert main(["train", "--out", str(run), "--quiet", *[a for o in overrides for a in ("--set", o)]]) == 0
    assert (run / "latent-z2.png").stat().st_size > 0 and (run / "samples.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["condition"] == "label" and "log_likelihood" not in result
    assert result["log_likelihood_given_label"] >= result["elbo"] - 1.0
    assert set(result["layers"]) == {"z1", "z2"} and result["layers"]["z2"]["dim"] == 2
    assert main(["sample", str(run), "--label", "3", "--n", "5", "--out", str(tmp_path / "3.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "3.npy").shape == (5, 1, 8, 8)
    assert main(["sample", str(run), "--label", "all", "--n", "2", "--out", str(tmp_path / "a.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "a.npy").shape == (20, 1, 8, 8)


# -- what the label buys, on digits ---------------------------------------------------------------

#: a few seconds of training (2 epochs) on all 1,617 training digits, two stochastic layers
QUICK = [
    "data.batch_size=64",
    "optim.lr=0.01",
    "train.epochs=2",
    "train.pictures=none",
    "train.threads=1",
    "model.latents=[{dim: 4}, {dim: 8, hidden: [32]}]",
    "model.encoder.hidden=[64]",
    "model.decoder.hidden=[64]",
]


def trained(overrides: list[str]) -> training.Trainer:
    trainer = training.Trainer(load_spec("digits", [*QUICK, *overrides]), None, show_progress=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
def test_a_conditional_two_layer_model_draws_its_class_and_explains_the_images_better(structure):
    """The labels' checks of :func:`label_checks.assert_uses_its_label`, against the same layers trained without
    labels."""
    layout = f"model.guide_structure={structure}"
    plain = trained([layout])
    trainer = trained([LABEL, layout])
    label_checks.assert_uses_its_label(trainer.vae, trainer.data, label_checks.log_likelihoods(plain.vae, plain.data))
