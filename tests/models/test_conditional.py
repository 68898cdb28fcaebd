"""Conditional VAEs (model.condition: label): the programs against their definition, the label through every call
path, the data's labels, the command line, and what a trained model does with the label."""

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
from pyro_vae.config.spec import DataSpec, Spec, load_spec
from pyro_vae.data import load_dataset
from pyro_vae.errors import UserInputError
from pyro_vae.infer import estimators  # noqa: F401  (registers the estimators)
from pyro_vae.infer.log_weights import log_weights
from pyro_vae.model import VAE
from pyro_vae.parts import contracts
from pyro_vae.training import compiled, path_choice

LABEL = ["model.condition=label"]


def small_vae(num_classes: int = 4, data_dim: int = 6, latent_dim: int = 3) -> VAE:
    spec = Spec.from_dict(
        {
            "model": {
                "condition": "label",
                "latent_dim": latent_dim,
                "encoder": {"hidden": [8]},
                "decoder": {"hidden": [8], "init_bias": "zero"},
            }
        }
    )
    return VAE.from_spec(spec.model, data_dim, num_classes=num_classes)


def set_overrides(overrides: list[str]) -> list[str]:
    return [arg for key in overrides for arg in ("--set", key)]


# -- the programs ---------------------------------------------------------------------------------


def test_the_conditional_prior_starts_as_a_standard_normal_for_every_class():
    vae = small_vae()
    p = vae.prior_distribution(torch.arange(4))
    assert p.batch_shape == (4,) and p.event_shape == (3,)
    assert torch.equal(p.mean, torch.zeros(4, 3)) and torch.equal(p.stddev, torch.ones(4, 3))


def test_log_weight_of_a_conditional_vae_is_its_definition():
    """log w = log N(z; μ(e_y), σ(e_y)²) + log Bern(x; dec([z, e_y])) − log q(z | head([enc(x), e_y]))."""
    torch.manual_seed(0)
    vae = small_vae()
    with torch.no_grad():  # a prior that differs by class, so a wrong class would show
        torch.nn.init.normal_(vae.prior.net.weight)
        torch.nn.init.normal_(vae.prior.net.bias, std=0.3)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    y = torch.tensor([0, 1, 2, 3, 1])
    sites = log_weights(vae.model, vae.guide, x, num_particles=2, y=y)
    z = sites.guide["z"].value
    assert z.shape == (2, 5, 3)
    e = torch.nn.functional.one_hot(y, 4).float()
    with torch.no_grad():
        loc, log_scale = (e @ vae.prior.net.weight.T + vae.prior.net.bias).split(3, dim=-1)
        log_p_z = Normal(loc, log_scale.exp()).log_prob(z).sum(-1)
        logits = vae.decoder(torch.cat([z, e.expand(2, 5, 4)], dim=-1))
        log_p_x = Bernoulli(logits=logits).log_prob(x).sum(-1)
        q = vae.guide_head(torch.cat([vae.encoder(x), e], dim=-1))
        log_q = Normal(q.mean, q.stddev).log_prob(z).sum(-1)
        assert torch.allclose(sites.log_w, log_p_z + log_p_x - log_q, atol=1e-5)


def test_the_programs_refuse_a_missing_or_an_unexpected_label():
    vae = small_vae()
    x = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="pass the labels as y"):
        vae.model(x)
    with pytest.raises(ValueError, match="pass the labels as y"):
        vae.guide(x)
    plain = VAE.from_spec(Spec().model, 6)
    with pytest.raises(ValueError, match="takes no labels"):
        plain.guide(x, y=torch.zeros(2, dtype=torch.long))


def test_the_traced_step_is_the_eager_step_bit_for_bit_with_labels():
    torch.manual_seed(1)
    vae = small_vae()
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    y = torch.arange(8) % 4
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


# -- the spec and the data ------------------------------------------------------------------------


def test_the_spec_refuses_a_prior_it_cannot_condition_and_takes_the_gaussian_ones():
    with pytest.raises(UserInputError, match="'model.condition' label .* accepted with it: standard-normal"):
        load_spec(None, [*LABEL, "model.prior.type=mog"])
    assert load_spec(None, [*LABEL, "model.prior.type=learned-normal"]).model.condition == "label"
    with pytest.raises(UserInputError, match="'model.condition' is 'maybe'; accepted: none, label"):
        load_spec(None, ["model.condition=maybe"])


def test_a_conditional_run_on_data_without_labels_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--no-progress", *set_overrides([*LABEL, "data.name=linear-gaussian"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the data have no labels" in err and "Traceback" not in err
    assert not run.exists()


def test_a_npz_file_gives_labels_that_follow_their_examples(tmp_path):
    x = np.random.default_rng(0).random((40, 3, 3)).astype(np.float32)
    x[:, 0, 0] = np.arange(40)  # each example's number, to find its label again
    labels = np.arange(40) % 5
    np.savez(tmp_path / "mine.npz", x=x, labels=labels)
    data = load_dataset(DataSpec(name="file", path=str(tmp_path / "mine.npz"), binarize="none"))
    assert data.num_classes == 5 and data.image_shape == (1, 3, 3)
    for split in ("train", "test"):
        examples, given = data.split(split), data.labels(split)
        assert torch.equal(given, examples[:, 0].long() % 5)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 2)), "labels": np.zeros(3, dtype=int)}, "'labels' must hold 4 integer classes"),
        ({"x": np.zeros((4, 2)), "labels": np.zeros(4)}, "'labels' must hold 4 integer classes"),
        ({"x": np.zeros((4, 2)), "labels": -np.ones(4, dtype=int)}, "'labels' must hold 4 integer classes"),
        ({"images": np.zeros((4, 2))}, "a .npz needs 'x'"),
    ],
)
def test_a_bad_npz_is_one_line_naming_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserInputError, match=message) as caught:
        load_dataset(DataSpec(name="file", path=str(tmp_path / "bad.npz"), binarize="none"))
    assert "bad.npz" in str(caught.value) and "\n" not in str(caught.value)


def test_the_validation_split_keeps_its_labels():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = load_dataset(DataSpec(validation_size=100, binarize="none"))
    originals = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    where = torch.cdist(data.validation, originals).argmin(1)  # each held-out image's place in the bundle
    assert torch.equal(data.validation_labels, torch.tensor(bunch.target)[where])


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small conditional and a small unconditional digits run."""
    folder = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in (("conditional", LABEL), ("plain", [])):
        made[name] = folder / name
        assert main(["train", "--out", str(made[name]), "--no-progress", *set_overrides([*SMALL, *extra])]) == 0
    return made


def test_evaluate_names_the_conditional_log_likelihood(runs, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(runs["conditional"]), "--num-samples", "20", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["condition"] == "label" and "log_likelihood" not in result
    assert result["log_likelihood_given_label"] >= result["elbo"] - 1.0
    assert json.loads((runs["conditional"] / "run.json").read_text())["model_inputs"]["num_classes"] == 10


def test_sample_draws_a_class_or_every_class(runs, tmp_path):
    run = runs["conditional"]
    assert main(["sample", str(run), "--label", "3", "--out", str(tmp_path / "three.png"), "--quiet"]) == 0
    assert (tmp_path / "three.png").stat().st_size > 0
    assert main(["sample", str(run), "--label", "all", "--n", "2", "--out", str(tmp_path / "all.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "all.npy").shape == (20, 1, 8, 8)
    assert main(["sample", str(run), "--label", "7", "--n", "3", "--out", str(tmp_path / "seven.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "seven.npy").shape == (3, 1, 8, 8)


def test_sample_out_npy_writes_any_run_s_samples_as_an_array(runs, tmp_path):
    out = tmp_path / "plain.npy"
    assert main(["sample", str(runs["plain"]), "--n", "5", "--out", str(out), "--quiet"]) == 0
    array = np.load(out)
    assert array.shape == (5, 1, 8, 8) and array.dtype == np.float32
    assert 0 <= array.min() and array.max() <= 1


@pytest.mark.parametrize(
    "which, args, message",
    [
        ("conditional", ["--label", "10"], "--label is '10'; accepted: a class 0 … 9, or all"),
        ("conditional", ["--label", "three"], "--label is 'three'; accepted: a class 0 … 9, or all"),
        ("conditional", ["--label", "all", "--n", "200"], "--n asks for 2000 samples in all"),
        ("plain", ["--label", "3"], "is not conditional (model.condition: none); sample it without --label"),
        ("plain", ["--out", "samples.csv"], "accepted: .png, .pdf, .svg, .jpg, .jpeg, or .npy"),
    ],
)
def test_a_bad_label_is_one_line(runs, capsys, which, args, message):
    capsys.readouterr()
    assert main(["sample", str(runs[which]), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_table_marks_the_conditional_log_likelihood(runs, tmp_path):
    out = tmp_path / "table"
    args = ["table", str(runs["conditional"]), "--reference", str(runs["plain"])]
    assert main([*args, "--num-samples", "10", "--out", str(out), "--quiet"]) == 0
    text = (out / "table.md").read_text()
    assert "log p(x \\| y)" in text and "log p(x | y), y the image's label" in text


def test_compare_at_a_conditional_run(runs, tmp_path):
    out = tmp_path / "report"
    args = ["compare", "--at", str(runs["conditional"]), "--estimators", "meanfield,dreg:2", "--repeats", "2"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert "dreg:2" in (out / "comparison.md").read_text()


# -- what the label buys, on digits ---------------------------------------------------------------

#: a few seconds of training (2 epochs) on all 1,617 training digits
QUICK = [
    "data.batch_size=64",
    "optim.lr=0.01",
    "train.epochs=2",
    "train.pictures=none",
    "train.threads=1",
    "model.latent_dim=8",
    "model.encoder.hidden=[64]",
    "model.decoder.hidden=[64]",
]


def trained(overrides: list[str]) -> training.Trainer:
    trainer = training.Trainer(load_spec("digits", [*QUICK, *overrides]), None, show_progress=False)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def unconditional():
    """The unconditional model's log p(x) per test image."""
    trainer = trained([])
    return label_checks.log_likelihoods(trainer.vae, trainer.data)


@pytest.mark.parametrize(
    "estimator",
    [
        ["inference.estimator=meanfield"],
        ["inference.estimator=iwae", "inference.num_particles=4"],
        ["inference.estimator=dreg", "inference.num_particles=4"],
    ],
    ids=["meanfield", "iwae:4", "dreg:4"],
)
def test_a_conditional_model_draws_its_class_and_explains_the_images_better(estimator, unconditional):
    """The labels' checks of :func:`label_checks.assert_uses_its_label`, against the same network trained without
    labels."""
    trainer = trained([*LABEL, *estimator])
    label_checks.assert_uses_its_label(trainer.vae, trainer.data, unconditional)
