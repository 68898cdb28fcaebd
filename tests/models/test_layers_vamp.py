"""The VampPrior as the top layer of a ladder hierarchy, and the packaged HVAE + VampPrior spec
(binarized-mnist-hvae-vamp-paper, Tomczak & Welling 2018)."""

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from sizes import SMALL
from torch.distributions import Normal

from pyro_vae import training
from pyro_vae.cli.commands import main
from pyro_vae.config.spec import config_summary, load_spec, packaged_configs
from pyro_vae.errors import UserInputError
from pyro_vae.hierarchy import HierarchicalVAE
from pyro_vae.model import VAE
from pyro_vae.parts import contracts
from pyro_vae.parts.priors import VampPrior
from pyro_vae.training import compiled, path_choice

VAMP_LADDER = [
    "model.latents=[{dim: 2}, {dim: 3, hidden: [5]}]",
    "model.guide_structure=ladder",
    "model.prior.type=vamp",
    "model.prior.pseudo_inputs=4",
    "model.encoder.hidden=[8]",
    "model.decoder.hidden=[8]",
]
SPEC = "binarized-mnist-hvae-vamp-paper"


def test_the_top_prior_is_the_mixture_of_the_ladder_guides_q_z_top_at_the_pseudo_inputs():
    """p(z_2) = (1/K) Σ_k q(z_2 | u_k), q(z_2 | ·) the ladder guide's own distribution of z_2."""
    torch.manual_seed(0)
    vae = VAE.from_spec(load_spec(None, VAMP_LADDER).model, 6)
    assert isinstance(vae, HierarchicalVAE) and isinstance(vae.prior, VampPrior)
    u = vae.prior.inputs()
    guide = poutine.trace(vae.guide).get_trace(u)  # the guide run on the pseudo-inputs as data
    q = guide.nodes["z2"]["fn"]
    z = torch.randn(7, 1, 2)
    components = Normal(q.mean, q.stddev).log_prob(z).sum(-1)  # (7, K)
    expected = torch.logsumexp(components, -1) - math.log(4)
    assert torch.allclose(vae.prior().log_prob(z.squeeze(1)), expected, atol=1e-5)
    assert {id(p) for p in vae.prior.parameters()} == {id(vae.prior.pseudo_inputs)}  # the guide's are not its own


@pytest.mark.parametrize("estimator", ["trace", "meanfield"])
def test_the_traced_step_is_the_eager_step_bit_for_bit_with_a_vamp_top_layer(estimator):
    torch.manual_seed(1)
    vae = VAE.from_spec(load_spec(None, VAMP_LADDER).model, 6)
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    elbo = contracts.build("estimator", estimator, load_spec(None, [f"inference.estimator={estimator}"]).inference)
    results = []
    for step in (path_choice.eager_step(elbo, vae), compiled.CompiledStep(elbo, vae, inductor=False)):
        torch.manual_seed(2)
        vae.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            loss = step(x, 100, 0.5, None)
        results.append((loss.clone(), [p.grad.clone() for p in vae.parameters()]))
    assert step.mode == "traced"
    (eager_loss, eager_grads), (traced_loss, traced_grads) = results
    # gradients are the same bits; Pyro's eager Trace_ELBO adds its loss in Python floats (double), the trace float32
    assert torch.allclose(eager_loss, traced_loss, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, traced_grads))
    assert vae.prior.pseudo_inputs.grad.abs().sum() > 0  # the pseudo-inputs get a gradient through log p(z_2)


def test_the_vamp_prior_on_layers_needs_the_ladder_guide_in_one_line():
    with pytest.raises(UserInputError) as error:
        load_spec(None, [*VAMP_LADDER, "model.guide_structure=bottom-up"])
    message = str(error.value)
    assert "'model.guide_structure' is 'bottom-up'" in message and "accepted with vamp: ladder" in message
    assert "\n" not in message


def test_the_packaged_spec_is_tomczak_and_wellings_hvae_with_a_vamp_prior():
    description = config_summary(packaged_configs()[SPEC])
    assert "Tomczak & Welling 2018" in description and "83.19" in description
    spec = load_spec(SPEC)
    model, train = spec.model, spec.train
    assert [layer.dim for layer in model.latents] == [40, 40] and model.guide_structure == "ladder"
    assert model.latents[1].hidden == [300, 300] and model.latents[1].activation == "gated"
    assert model.encoder.hidden == model.decoder.hidden == [300, 300] and model.encoder.activation == "gated"
    assert model.prior.type == "vamp" and model.prior.options.pseudo_inputs == 500
    assert spec.data.name == "binarized-mnist" and spec.data.batch_size == 100
    assert (spec.optim.lr, train.kl_warmup_epochs, train.early_stopping_patience, train.epochs) == (5e-4, 100, 50, 2000)
    torch.manual_seed(0)
    vae = VAE.from_spec(model, 784, train=torch.rand(10, 784))
    assert vae.prior().event_shape == (40,) and vae.sample(2).shape == (2, 784)


def test_the_packaged_spec_trains_on_digits_sized_overrides_and_evaluates(tmp_path, capsys):
    small = [
        *SMALL,
        "data.name=digits",
        "data.validation_size=null",
        "train.early_stopping_patience=null",
        "train.kl_warmup_epochs=1",
        "model.prior.pseudo_inputs=5",
        "model.latents=[{dim: 2}, {dim: 3, hidden: [8], activation: gated}]",
        "train.pictures=none",
        "inference.compile=auto",  # not the spec's whole compiled steps: their build takes minutes (test_whole_step)
    ]
    spec = load_spec(SPEC, small)
    trainer = training.Trainer(spec, None, show_progress=False)
    start = trainer.vae.prior.pseudo_inputs.detach().clone()
    trainer.fit()
    assert not torch.equal(trainer.vae.prior.pseudo_inputs.detach(), start)  # the pseudo-inputs are trained
    folder = tmp_path / "run"
    training.train(spec, folder, show_progress=False)
    capsys.readouterr()
    assert main(["evaluate", str(folder), "--num-samples", "20", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["layers"]) == {"z1", "z2"} and result["layers"]["z2"]["kl_closed_form"] is False
    assert result["log_likelihood"] >= result["elbo"] - 1.0
