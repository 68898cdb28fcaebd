"""Binary latent units: the bernoulli prior and guides, the relaxed guide, and the commands on a discrete model."""

import csv
import json
import math

import pyro
import pytest
import torch

from pyro_vae.cli.commands import main
from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.infer.estimators import bound_and_backward
from pyro_vae.model import VAE
from pyro_vae.parts.discrete import BernoulliUnits

#: the packaged binary-latent spec, shrunk to the bundled digits and 10 units
SBN_ON_DIGITS = [
    "--config",
    "binarized-mnist-sbn",
    "--set",
    "data.name=digits",
    "--set",
    "data.validation_size=null",
    "--set",
    "data.train_size=60",
    "--set",
    "data.test_size=20",
    "--set",
    "data.batch_size=20",
    "--set",
    "model.latent_dim=10",
    "--set",
    "inference.compile=auto",  # not the spec's whole compiled steps: their build takes minutes (test_whole_step)
    "--quiet",
]


def binary_vae(units: int = 3, **overrides) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    settings = {"prior.type": "bernoulli", "guide.type": "bernoulli", "encoder.hidden": "[4]", "decoder.hidden": "[4]"}
    settings.update(overrides)
    spec = load_spec(None, [f"model.latent_dim={units}"] + [f"model.{k}={v}" for k, v in settings.items()])
    x = (torch.rand(4, 6) < 0.5).float()
    return VAE.from_spec(spec.model, 6, None, x), x


def test_bernoulli_prior_probabilities_are_learned_or_fixed():
    learned, _ = binary_vae()
    fixed, _ = binary_vae(**{"prior.probs": 0.25})
    assert [name for name, _ in learned.prior.named_parameters()] == ["logits"]
    assert list(fixed.prior.parameters()) == []
    assert torch.allclose(fixed.prior_distribution().mean, torch.full((3,), 0.25))
    with pytest.raises(
        UserInputError, match=r"'model.prior.probs' is 1.0; it must be 'learned' or a number in \(0, 1\)"
    ):
        binary_vae(**{"prior.probs": 1.0})


@pytest.mark.parametrize(
    "prior, guide", [("bernoulli", "diagonal-normal"), ("standard-normal", "bernoulli"), ("vamp", "relaxed-bernoulli")]
)
def test_binary_units_need_the_bernoulli_prior_and_a_binary_guide_together(prior, guide):
    with pytest.raises(UserInputError, match=r"binary latent units need the 'bernoulli' prior with one of the guides"):
        load_spec(None, [f"model.prior.type={prior}", f"model.guide.type={guide}"])


def test_encode_gives_the_bernoulli_means_and_standard_deviations():
    vae, x = binary_vae()
    mean, std = vae.encode(x)
    p = torch.sigmoid(vae.guide_head.logits(vae.encoder(x)))
    assert torch.allclose(mean, p)
    assert torch.allclose(std, (p * (1 - p)).sqrt())


def test_enumerate_support_lists_every_configuration_once():
    units = BernoulliUnits(torch.randn(2, 4))
    values = units.enumerate_support()
    assert values.shape == (16, 2, 4)
    assert len({tuple(v.tolist()) for v in values[:, 0]}) == 16
    assert torch.allclose(torch.logsumexp(units.log_prob(values), 0), torch.zeros(2), atol=1e-6)


def test_the_relaxed_guide_draws_binary_units_scored_by_the_bernoulli_mass():
    vae, x = binary_vae(**{"guide.type": "relaxed-bernoulli", "guide.temperature": 0.5})
    q = vae.posterior(x)
    z = q.rsample((100,))
    assert bool(((z == 0) | (z == 1)).all())
    logits = vae.guide_head.logits(vae.encoder(x))
    assert torch.allclose(q.log_prob(z), BernoulliUnits(logits).log_prob(z))
    vae.zero_grad()
    pyro.set_rng_seed(0)
    bound_and_backward(load_estimator("dreg:2"), vae.model, vae.guide, x, num_data=4)
    assert vae.guide_head.logits.weight.grad.abs().sum() > 0  # the straight-through path reaches the encoder


def load_estimator(token: str):
    from pyro_vae.evaluation.estimator_tokens import parse_token

    return parse_token(token).build(load_spec(None, []).inference)


def test_the_relaxed_guide_reports_the_bernoulli_guides_elbo():
    relaxed, x = binary_vae(**{"guide.type": "relaxed-bernoulli"})
    exact_guide, _ = binary_vae()
    exact_guide.load_state_dict(relaxed.state_dict(), strict=False)  # all but the temperature
    configurations = BernoulliUnits(torch.zeros(3)).enumerate_support(expand=False)[:, None, :]
    with torch.no_grad():
        log_q = exact_guide.posterior(x).log_prob(configurations)
        log_p = exact_guide.prior_distribution().log_prob(configurations)
        log_p = log_p + exact_guide.likelihood_distribution(configurations).log_prob(x)
        exact = (log_q.exp() * (log_p - log_q)).sum().item()
        pyro.set_rng_seed(0)
        trace = load_estimator("trace")
        batch = x.repeat(100, 1)  # 100 independent draws per call, each example's own z
        values = torch.tensor([-trace.loss(relaxed.model, relaxed.guide, batch, num_data=400) / 100 for _ in range(20)])
    assert abs(values.mean().item() - exact) <= 5 * values.std().item() / math.sqrt(20)


@pytest.mark.parametrize("estimator", ["vimco", "enum"])
def test_train_evaluate_and_sample_on_the_binary_latent_spec(tmp_path, capsys, estimator):
    run = tmp_path / "sbn"
    chosen = ["--set", f"inference.estimator={estimator}", "--set", "model.latent_dim=4"]
    assert main(["train", "--epochs", "2", "--out", str(run), *SBN_ON_DIGITS, *chosen]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["test_elbo"]) for row in rows)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "4", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["log_likelihood"]) and result["kl_closed_form"] is True
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0


def test_a_reparameterized_estimator_on_the_binary_spec_exits_2_naming_the_site(tmp_path, capsys):
    out = tmp_path / "dreg"
    args = ["train", "--epochs", "1", "--out", str(out), *SBN_ON_DIGITS, "--set", "inference.estimator=dreg"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert "site 'z' (BernoulliUnits) is discrete: use one of trace, tracegraph, vimco:K, rws:K, enum" in error
    assert not out.exists()


def test_compare_on_the_binary_spec_writes_finite_numbers(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--estimators", "trace,tracegraph,vimco:8,rws:8", "--repeats", "3", "--out", str(out)]
    assert main([*args, *SBN_ON_DIGITS]) == 0
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["estimator"] for row in rows] == ["trace", "tracegraph", "vimco:8", "rws:8"]
    for row in rows:
        for key in ("bound_mean", "grad_var_encoder", "grad_var_decoder", "ms_per_step"):
            assert math.isfinite(float(row[key])), (row["estimator"], key)
