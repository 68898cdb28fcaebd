"""The semi-supervised M2 VAE (model.condition: semisupervised): its objective against Kingma et al.'s definition,
the class-balanced labeled subset, the one-line refusals, the importance-sampled log p(x) with y summed out, and the
test error in metrics.jsonl and in evaluate's JSON."""

import json
import math

import pyro
import pytest
import torch
from sizes import SMALL
from torch.distributions import Bernoulli, Normal

from pyro_vae import semisupervised
from pyro_vae.cli.commands import main
from pyro_vae.config.spec import Spec
from pyro_vae.data import Dataset, with_labeled_subset
from pyro_vae.errors import UserInputError
from pyro_vae.infer import discrete_estimators, estimators  # noqa: F401  (registers the estimators)
from pyro_vae.model import VAE
from pyro_vae.semisupervised import SemiSupervisedVAE, joined

M2 = ["model.condition=semisupervised", "inference.estimator=enum", "model.classifier.hidden=[16]"]


def tiny_m2(weight: float = 0.7, classes: int = 3, data_dim: int = 4, latent_dim: int = 2) -> SemiSupervisedVAE:
    spec = Spec.from_dict(
        {
            "model": {
                "condition": "semisupervised",
                "latent_dim": latent_dim,
                "encoder": {"hidden": [5], "activation": "tanh"},
                "decoder": {"hidden": [5], "activation": "tanh", "init_bias": "zero"},
                "classifier": {"hidden": [5], "activation": "tanh"},
            },
            "inference": {"estimator": "enum"},
        }
    )
    vae = VAE.from_spec(spec.model, data_dim, num_classes=classes, classifier_weight=weight)
    assert isinstance(vae, SemiSupervisedVAE)
    return vae


def set_overrides(overrides: list[str]) -> list[str]:
    return [arg for key in overrides for arg in ("--set", key)]


# -- the objective ---------------------------------------------------------------------------------


def labeled_bound(vae, x, y, z):
    """L(x, y) at the draw z ~ q(z|x,y): log p(y) + log p(z) + log p(x|y,z) − log q(z|x,y), by hand."""
    e = torch.nn.functional.one_hot(y, vae.num_classes).to(x.dtype).expand(*z.shape[:-1], vae.num_classes)
    h = vae.encoder(x).expand(*z.shape[:-1], -1)
    q = vae.guide_head(torch.cat([h, e], -1))
    log_p_x = Bernoulli(logits=vae.decoder(torch.cat([z, e], -1))).log_prob(x).sum(-1)
    log_p_z = Normal(0.0, 1.0).log_prob(z).sum(-1)
    return -math.log(vae.num_classes) + log_p_z + log_p_x - q.log_prob(z)


def test_the_enumerated_objective_is_kingmas_definition(float64_one_thread):
    """−loss = Σ_l [L(x,y) + ω log q(y|x)] + Σ_u [Σ_y q(y|x) L(x,y) + H(q(y|x))], each scaled by N/B, at the draws
    the guide makes (one z per labeled example, one per class and unlabeled example, in that order)."""
    torch.manual_seed(0)
    vae = tiny_m2(weight=0.7)
    x = torch.bernoulli(torch.full((5, 4), 0.5))
    y = torch.tensor([2, -1, 0, -1, -1])
    num_data = 20
    elbo = discrete_estimators.Enum_ELBO()
    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=num_data, y=y)

    pyro.set_rng_seed(3)
    labeled, unlabeled = y >= 0, y < 0
    xl, yl, xu = x[labeled], y[labeled], x[unlabeled]
    zl = vae.guide_head(joined(vae.encoder(xl), yl, 3)).rsample()
    classes = torch.arange(3).unsqueeze(-1)  # (C, 1): every class for every unlabeled example
    zu = vae.guide_head(joined(vae.encoder(xu), classes, 3)).rsample()  # (C, B_u, d)
    log_q = torch.log_softmax(vae.classifier(xl), -1).gather(-1, yl.unsqueeze(-1)).squeeze(-1)
    labeled_part = labeled_bound(vae, xl, yl, zl) + 0.7 * log_q
    q_y = torch.softmax(vae.classifier(xu), -1).T  # (C, B_u)
    bounds = torch.stack([labeled_bound(vae, xu, torch.full((3,), c), zu[c]) for c in range(3)])
    unlabeled_part = (q_y * bounds).sum(0) - (q_y * q_y.log()).sum(0)
    expected = num_data / 5 * (labeled_part.sum() + unlabeled_part.sum())
    assert torch.allclose(-loss, expected, rtol=1e-10, atol=1e-10)
    parameters = list(vae.parameters())  # the gradient too: the classifier's through q(y|x) in the exact sum
    for got, want in zip(torch.autograd.grad(-loss, parameters), torch.autograd.grad(expected, parameters)):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def test_the_classifier_weight_is_kingmas_alpha_over_the_labeled_examples():
    """ω = α / N_l with α = 0.1·N (Kingma et al. 2014, eq. 9 and section 4); a number is taken as it is."""
    assert semisupervised.classifier_weight("kingma", 60000, 3000) == pytest.approx(2.0)
    assert semisupervised.classifier_weight("kingma", 50000, 100) == pytest.approx(50.0)
    assert semisupervised.classifier_weight(300, 60000, 3000) == 300.0


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
def test_the_classifier_term_moves_only_the_labeled_examples_objective(float64_one_thread):
    """Without labels the objective has no classifier factor; with them it grows by ω Σ_l log q(y|x)."""
    torch.manual_seed(1)
    x = torch.bernoulli(torch.full((3, 4), 0.5))
    y = torch.tensor([1, 0, 2])
    losses = {}
    start = tiny_m2().state_dict()
    for weight in (0.0, 2.0):
        vae = tiny_m2(weight=weight)
        vae.load_state_dict(start)
        pyro.set_rng_seed(0)
        losses[weight] = discrete_estimators.Enum_ELBO().differentiable_loss(vae.model, vae.guide, x, y=y)
    log_q = torch.log_softmax(vae.classifier(x), -1).gather(-1, y.unsqueeze(-1)).sum()
    assert torch.allclose(losses[0.0] - losses[2.0], 2.0 * log_q)


# -- the labeled subset ----------------------------------------------------------------------------


def labelled_data(per_class: list[int]) -> Dataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    x = torch.rand(labels.shape[0], 3)
    return Dataset("toy", x, x[:2], labels, labels[:2], num_classes=len(per_class))


def test_the_labeled_subset_holds_as_many_of_each_class_and_is_fixed_by_the_seed():
    data = labelled_data([30, 20, 25])
    first = with_labeled_subset(data, 15, seed=4)
    assert first.num_labeled == 15
    assert [int((first.train_labels[first.labeled] == c).sum()) for c in range(3)] == [5, 5, 5]
    assert torch.equal(first.labeled, with_labeled_subset(data, 15, seed=4).labeled)
    assert not torch.equal(first.labeled, with_labeled_subset(data, 15, seed=5).labeled)
    partial = first.partial_labels(torch.arange(75))
    assert torch.equal(partial[first.labeled], data.train_labels[first.labeled])
    assert bool((partial[~first.labeled] == -1).all())


@pytest.mark.parametrize(
    "count, per_class, message",
    [
        (10, [30, 20, 25], "a multiple of the 3 classes"),
        (66, [30, 20, 25], "class 1 of 'toy' has 20 training examples; accepted: at most 60"),
    ],
)
def test_a_labeled_subset_the_data_cannot_give_is_one_line(count, per_class, message):
    with pytest.raises(UserInputError, match=message):
        with_labeled_subset(labelled_data(per_class), count, seed=0)


def test_a_labeled_subset_of_data_without_labels_is_one_line():
    x = torch.rand(10, 3)
    with pytest.raises(UserInputError, match="'data.num_labeled' is 5 but data 'toy' has no labels"):
        with_labeled_subset(Dataset("toy", x, x), 5, seed=0)


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inference.estimator=dreg"], "'inference.estimator' is 'dreg', which cannot take the discrete site y"),
        (["inference.estimator=vimco", "inference.num_particles=8"], "accepted: enum, trace, tracegraph"),
        (["inference.compile=traced"], "'inference.compile' is 'traced'; model.condition semisupervised runs eagerly"),
        (["model.prior.type=vamp"], "'model.prior.type' is 'vamp'; accepted with model.condition semisupervised"),
        (["model.classifier_weight=-1"], "'model.classifier_weight' is -1"),
    ],
)
def test_a_spec_m2_cannot_run_is_one_line_with_exit_status_2(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *set_overrides([*SMALL, *M2, *overrides])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_num_labeled_without_m2_is_one_line(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "run"), "--no-progress", *set_overrides([*SMALL, "data.num_labeled=20"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "'data.num_labeled' is 20 but 'model.condition' is 'none'" in err and "\n" not in err


# -- the importance-sampled log-likelihood, y summed out ---------------------------------------------


def exact_log_likelihood(vae: SemiSupervisedVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log Σ_y p(y) ∫ p(z) p(x|y,z) dz, the integral over a one-dimensional z by the trapezoid rule."""
    z = torch.linspace(-10, 10, 20001).unsqueeze(-1)  # (G, 1)
    out = []
    for c in range(vae.num_classes):
        e = torch.nn.functional.one_hot(torch.tensor(c), vae.num_classes).to(z.dtype).expand(z.shape[0], -1)
        logits = vae.decoder(torch.cat([z, e], -1))  # (G, D)
        log_joint = Normal(0.0, 1.0).log_prob(z[:, 0]).unsqueeze(-1) + (
            Bernoulli(logits=logits.unsqueeze(1)).log_prob(x).sum(-1)
        )  # (G, B)
        integral = torch.trapezoid(log_joint.exp(), z[:, 0], dim=0)
        out.append(integral.log() - math.log(vae.num_classes))
    return torch.logsumexp(torch.stack(out), 0)


def test_the_importance_sampled_log_likelihood_sums_y_out_and_meets_the_exact_one(float64_one_thread):
    """q(z|x,c) = N(μ(x, c), 1.5²) is wider than p(z|x,c) ∝ N(z; 0, 1) p(x|c,z), so the weights are bounded and
    K = 4000 puts the estimate within a few hundredths of a nat of the exact log p(x)."""
    torch.manual_seed(2)
    vae = tiny_m2(latent_dim=1)
    with torch.no_grad():
        for p in vae.decoder.parameters():  # a decoder far from the start, so the classes and z matter
            p.mul_(4.0)
        vae.guide_head.raw_scale.weight.zero_()
        vae.guide_head.raw_scale.bias.fill_(math.log(math.expm1(1.5)))  # softplus⁻¹(1.5)
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    exact = exact_log_likelihood(vae, x)
    result = semisupervised.evaluate(vae, x, num_samples=4000, per_example=True)
    estimate = result["per_example"]["log_likelihood"]
    assert torch.allclose(estimate, exact, atol=0.02)
    assert bool((result["per_example"]["elbo"] < exact - 0.05).all())  # U(x) < log p(x)
    assert result["elbo"] == pytest.approx(result["elbo_analytic_kl"], abs=0.05)
    assert result["class_summed"] and result["pareto_k"]["max"] < 0.5


def test_summed_weights_are_log_sum_exp_over_the_classes_of_the_labeled_weights(float64_one_thread):
    """log W_k = log Σ_c p(x, c, z_{c,k}) / q(z_{c,k} | x, c), from the one log-weight function per class."""
    torch.manual_seed(3)
    vae = tiny_m2()
    x = torch.bernoulli(torch.full((4, 4), 0.5))
    pyro.set_rng_seed(1)
    log_w = semisupervised.class_log_weights(vae, x, num_samples=5)["log_w"]  # (C, K, B)
    pyro.set_rng_seed(1)
    summed = semisupervised.summed_bounds(vae, x, num_samples=5)
    assert torch.allclose(summed["log_W"], torch.logsumexp(log_w, 0))
    assert torch.allclose(summed["log_likelihood"], torch.logsumexp(summed["log_W"], 0) - math.log(5))


# -- the test error in metrics.jsonl and evaluate's JSON ---------------------------------------------


def test_test_error_is_the_share_of_wrong_argmax_classes():
    torch.manual_seed(0)
    vae = tiny_m2()
    x = torch.rand(50, 4)
    labels = torch.randint(0, 3, (50,))
    predicted = vae.classifier(x).argmax(-1)
    assert semisupervised.test_error(vae, x, labels, batch_size=7) == pytest.approx(
        float((predicted != labels).double().mean())
    )
    assert semisupervised.classification(vae, x, None) == {}


def test_a_run_writes_the_test_error_every_epoch_and_evaluate_reports_it(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [*SMALL, *M2, "data.num_labeled=20", "model.latent_dim=2"]
    assert main(["train", "--out", str(run), "--no-progress", *set_overrides(overrides)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= row["test_error"] <= 1.0 for row in rows)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["test_error"] <= 1.0 and result["class_summed"]
    assert result["log_likelihood"] >= result["elbo"] - 1.0


@pytest.mark.parametrize("name", ["trace", "tracegraph"])
def test_the_sampling_estimators_train_m2_with_a_score_function_for_y(float64_one_thread, name):
    """``trace`` and ``tracegraph`` sample y ~ q(y|x): the classifier gets a gradient from unlabeled examples alone."""
    from pyro_vae.parts import contracts

    torch.manual_seed(4)
    vae = tiny_m2(weight=0.0)
    elbo = contracts.build("estimator", name, Spec.from_dict({"inference": {"estimator": name}}).inference)
    x = torch.bernoulli(torch.full((8, 4), 0.5))
    loss = estimators.bound_and_backward(elbo, vae.model, vae.guide, x, y=torch.full((8,), -1))
    assert torch.isfinite(loss)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in vae.classifier.parameters())


def test_training_batches_carry_the_labels_of_the_labeled_subset_only():
    from pyro_vae.training.trainer import Trainer

    spec = Spec().with_overrides([*SMALL, *M2, "data.num_labeled=20", "model.latent_dim=2"])
    trainer = Trainer(spec, None, show_progress=False)
    y = trainer.batch_labels(torch.arange(96))
    kept = y >= 0
    assert int(kept.sum()) == 20 and torch.equal(y[kept], trainer.data.train_labels[kept])
    assert torch.equal(kept, trainer.data.labeled)


def test_compare_weighs_m2_by_the_class_summed_weights_of_log_p_x():
    """compare's ESS and k̂ for M2 are those of W_k = Σ_c p(x, c, z_{c,k}) / q(z_{c,k}|x, c), the weights evaluate
    averages, not the training program's, whose log w carries ω log q(y|x) for the labeled examples."""
    from pyro_vae.evaluation import compare, diagnostics

    vae = tiny_m2(weight=50.0)
    x = torch.bernoulli(torch.full((6, 4), 0.5), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, -1, -1, 2, -1])  # labeled and unlabeled examples in one batch
    torch.manual_seed(3)
    found = compare.weight_diagnostics(vae, x, num_data=60, particles=4, y=y)
    torch.manual_seed(3)
    draws = math.ceil(compare.DIAGNOSTIC_WEIGHTS / 4)
    with pyro.validation_enabled(False), torch.no_grad():
        log_w = semisupervised.summed_bounds(vae, x, draws * 4)["log_W"]
    ess = diagnostics.effective_sample_fraction(log_w.reshape(draws, 4, -1).transpose(0, 1)).mean(0)
    summary = diagnostics.summarize(ess, diagnostics.pareto_k(log_w), 4)
    assert found["ess_mean"] == summary["ess"]["mean_fraction"]
    assert found["pareto_k_median"] == summary["pareto_k"]["median"]
