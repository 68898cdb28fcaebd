"""Every prior × guide pair, every likelihood and network, chosen by spec alone."""

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import evaluation
from pyro_vae.config import registry
from pyro_vae.config.spec import Spec, load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.training.trainer import Trainer

PRIORS = ["standard-normal", "learned-normal", "mog", "vamp", "flow"]
GUIDES = ["diagonal-normal", "low-rank-normal", "full-normal", "iaf"]
SMALL = [
    "data.train_size=400",
    "data.test_size=100",
    "model.latent_dim=3",
    "model.encoder.hidden=[32]",
    "model.decoder.hidden=[32]",
    "train.epochs=1",
]
# small sizes for the parts that have keys of their own (each part takes only its own)
OWN_KEYS = {
    "mog": ["model.prior.components=3"],
    "vamp": ["model.prior.pseudo_inputs=5"],
    "flow": ["model.prior.hidden=[8]"],
    "iaf": ["model.guide.hidden=[8]"],
}


def choose(prior: str = "standard-normal", guide: str = "diagonal-normal") -> list[str]:
    """Overrides that select ``prior`` and ``guide`` with their small sizes."""
    return [
        f"model.prior.type={prior}",
        *OWN_KEYS.get(prior, []),
        f"model.guide.type={guide}",
        *OWN_KEYS.get(guide, []),
    ]


def test_the_registry_holds_every_documented_part():
    # the binary prior and guides (pyro_vae.parts.discrete) pair only with each other: test_discrete_parts.py
    assert registry.names("prior") == [*PRIORS, "bernoulli"]
    assert registry.names("guide") == [*GUIDES, "bernoulli", "relaxed-bernoulli"]
    assert set(registry.names("likelihood")) == {"bernoulli", "continuous-bernoulli", "gaussian", "laplace"}
    assert set(registry.names("network")) == {"mlp", "conv"}


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("prior", PRIORS)
def test_every_prior_and_guide_trains_and_bounds_are_ordered(prior, guide):
    spec = load_spec(None, [*SMALL, *choose(prior, guide)])
    trainer = Trainer(spec, None, show_progress=False)
    metrics = trainer.fit()
    assert math.isfinite(metrics[-1]["test_elbo"])
    torch.manual_seed(0)
    result = evaluation.evaluate(trainer.vae, trainer.data.test, num_samples=64, per_example=True)
    assert math.isfinite(result["elbo"]) and math.isfinite(result["log_likelihood"])
    # log-mean-exp ≥ mean (Jensen) holds for every example and every draw
    per_example = result["per_example"]
    assert bool((per_example["log_likelihood"] >= per_example["elbo"] - 1e-9).all())
    assert per_example["log_likelihood"].mean().item() == pytest.approx(result["log_likelihood"], abs=1e-9)


def test_closed_form_kl_is_used_where_registered():
    trainer = Trainer(load_spec(None, [*SMALL, "model.guide.type=full-normal"]), None, show_progress=False)
    assert evaluation.evaluate(trainer.vae, trainer.data.test, num_samples=4)["kl_closed_form"]
    trainer = Trainer(load_spec(None, [*SMALL, *choose("mog")]), None, show_progress=False)
    assert not evaluation.evaluate(trainer.vae, trainer.data.test, num_samples=4)["kl_closed_form"]


def test_meanfield_without_closed_form_says_so_once(capsys):
    from pyro_vae.cli.commands import command_line

    with command_line():  # the console handler the command line sets up
        Trainer(load_spec(None, [*SMALL, *choose("vamp"), "train.epochs=2"]), None, show_progress=False).fit()
        assert capsys.readouterr().err.count("no closed form") == 1
        Trainer(load_spec(None, SMALL), None, show_progress=False).fit()
        assert "no closed form" not in capsys.readouterr().err


def test_meanfield_sampled_kl_term_is_unbiased():
    """For a mixture prior TraceMeanField_ELBO samples the KL term: same mean as Trace_ELBO."""
    from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

    trainer = Trainer(load_spec(None, [*SMALL, *choose("mog")]), None, show_progress=False)
    vae, x = trainer.vae, trainer.data.test[:50]
    torch.manual_seed(1)
    mf = torch.tensor([TraceMeanField_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x) for _ in range(300)])
    tr = torch.tensor([Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x) for _ in range(300)])
    exact_terms = -(evaluation.evaluate(vae, x, num_samples=4000)["elbo"] * len(x))
    for draws in (mf, tr):
        assert abs(draws.mean().item() - exact_terms) < 4 * draws.std().item() / math.sqrt(len(draws)) + 0.05


@pytest.mark.parametrize(
    "likelihood, data",
    [
        ("bernoulli", ["data.binarize=dynamic"]),
        ("continuous-bernoulli", ["data.binarize=none"]),
        ("gaussian", ["data.binarize=none", "model.likelihood.scale=0.2"]),
        ("gaussian", ["data.binarize=none", "model.likelihood.scale=learned"]),
        ("laplace", ["data.binarize=none", "model.likelihood.scale=learned"]),
    ],
)
def test_each_likelihood_trains_on_data_that_suits_it(likelihood, data):
    spec = load_spec(None, [*SMALL, "train.epochs=3", f"model.likelihood.type={likelihood}", *data])
    metrics = Trainer(spec, None, show_progress=False).fit()
    assert all(math.isfinite(m["test_elbo"]) for m in metrics)
    assert metrics[-1]["train_elbo"] > metrics[0]["train_elbo"]


def test_bernoulli_on_grey_levels_is_refused_before_training():
    with pytest.raises(UserInputError, match="model.likelihood.type.*bernoulli.*0 and 1"):
        Trainer(load_spec(None, [*SMALL, "data.binarize=none"]), None, show_progress=False)


def test_conv_networks_on_images_and_a_clear_error_on_flat_data(tmp_path):
    conv = [
        "model.encoder.type=conv",
        "model.decoder.type=conv",
        "model.encoder.channels=[8,16]",
        "model.decoder.channels=[8,16]",
    ]
    trainer = Trainer(load_spec(None, [*SMALL, *conv]), None, show_progress=False)
    assert math.isfinite(trainer.fit()[-1]["test_elbo"])
    path = tmp_path / "flat.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32))
    spec = load_spec(None, [*SMALL, *conv, "data.name=file", f"data.path={path}", "model.likelihood.type=gaussian"])
    with pytest.raises(UserInputError, match="conv"):
        Trainer(spec, None, show_progress=False)


def test_beta_scales_the_kl_term_in_model_and_guide():
    trainer = Trainer(load_spec(None, [*SMALL, "train.beta=0.5"]), None, show_progress=False)
    vae, x = trainer.vae, trainer.data.test[:20]
    from pyro.infer import TraceMeanField_ELBO

    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(0)
    full = elbo.loss(vae.model, vae.guide, x, kl_weight=1.0)
    pyro.set_rng_seed(0)
    reconstruction_only = elbo.loss(vae.model, vae.guide, x, kl_weight=0.0)
    pyro.set_rng_seed(0)
    half = elbo.loss(vae.model, vae.guide, x, kl_weight=0.5)
    kl = full - reconstruction_only
    assert kl > 0
    assert half == pytest.approx(reconstruction_only + 0.5 * kl, rel=1e-5)


def test_kl_warmup_rises_linearly_to_beta():
    from pyro_vae.training.trainer import kl_weight

    spec = Spec.from_dict({"train": {"beta": 2.0, "kl_warmup_epochs": 4}})
    weights = [kl_weight(spec, step, steps_per_epoch=10) for step in (0, 10, 20, 40, 80)]
    assert weights == [0.0, 0.5, 1.0, 2.0, 2.0]
    # the first steps run at β = 0: the z sites are masked, training goes on
    metrics = Trainer(
        load_spec(None, [*SMALL, "train.epochs=2", "train.kl_warmup_epochs=2"]), None, show_progress=False
    ).fit()
    assert 0 < metrics[0]["kl_weight"] < metrics[1]["kl_weight"] <= 1.0


def test_flow_prior_starts_at_the_standard_normal():
    """Each flow's last layer starts at zero (identity transform): unused latent dimensions cost no KL at first."""
    spec = load_spec(None, [*SMALL, "model.prior.type=flow"])
    prior = Trainer(spec, None, show_progress=False).vae.prior_distribution()
    z = torch.randn(64, spec.model.latent_dim, generator=torch.Generator().manual_seed(0))
    standard = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(spec.model.latent_dim), 1.0), 1)
    assert torch.allclose(prior.log_prob(z), standard.log_prob(z), atol=1e-5)
