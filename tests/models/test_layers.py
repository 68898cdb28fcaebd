"""Stochastic layers (``model.latents``): the spec, the programs, every estimator and the evaluation across sites.

The reference model is a two-layer linear-Gaussian VAE built through the package's API: z_2 ~ N(0, I),
z_1 | z_2 ~ N(A z_2 + a, diag s²) (the conditional prior's scale head has zero weights), x | z_1 ~
N(W z_1 + b, σ² I), so x ~ N(W a + b, W (A Aᵀ + diag s²) Wᵀ + σ² I) exactly.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pyro
import pytest
import sizes
import torch
from torch.nn.functional import softplus

from pyro_vae import evaluation, pictures, training
from pyro_vae.cli.commands import main
from pyro_vae.config import registry
from pyro_vae.config.spec import Spec, config_summary, load_spec, packaged_configs
from pyro_vae.errors import UserInputError
from pyro_vae.evaluation import table
from pyro_vae.hierarchy import HierarchicalVAE, precision_merge
from pyro_vae.infer.estimators import TraceMeanField_ELBO, bound_and_backward
from pyro_vae.infer.log_weights import closed_form_allowed, log_weights
from pyro_vae.model import VAE

D, NOISE = 4, 0.5
LATENTS = "model.latents=[{dim: 2}, {dim: 3, hidden: []}]"
Z = 4.0  # z-score bound of an expectation check


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def linear_two_layer(structure: str = "bottom-up", extra: tuple[str, ...] = ()) -> HierarchicalVAE:
    """The module docstring's two-layer linear-Gaussian VAE, with seeded random weights."""
    spec = load_spec(
        None,
        [
            LATENTS,
            f"model.guide_structure={structure}",
            "model.encoder.hidden=[]",
            "model.decoder.hidden=[]",
            "model.likelihood.type=gaussian",
            f"model.likelihood.scale={NOISE}",
            *extra,
        ],
    )
    torch.manual_seed(0)
    vae = VAE.from_spec(spec.model, D)
    assert isinstance(vae, HierarchicalVAE)
    with torch.no_grad():
        vae.conditionals[0].raw_scale.weight.zero_()
    return vae


def exact_log_px(vae: HierarchicalVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) of :func:`linear_two_layer`'s model in closed form, (B,)."""
    prior = vae.conditionals[0]
    a_weight, a_bias = prior.loc.weight, prior.loc.bias
    s = softplus(prior.raw_scale.bias) + prior.min_scale
    decoder = vae.decoder.net[-1]
    cov1 = a_weight @ a_weight.T + torch.diag(s**2)
    cov = decoder.weight @ cov1 @ decoder.weight.T + NOISE**2 * torch.eye(D)
    mean = decoder.weight @ a_bias + decoder.bias
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def data(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def build(name: str, **inference) -> object:
    return registry.get("estimator", name)(Spec.from_dict({"inference": {"estimator": name, **inference}}).inference)


def losses(vae, elbo, x, draws: int) -> torch.Tensor:
    out = []
    for draw in range(draws):
        pyro.set_rng_seed(draw)
        with torch.no_grad():
            out.append(elbo.loss(vae.model, vae.guide, x))
    return torch.tensor(out)


def gradients(vae, elbo, x, draws: int, copies: int, params: list | None = None) -> torch.Tensor:
    """``draws`` estimator gradients of −loss over ``params`` (default: all), each the mean over ``copies``
    copies of x."""
    x = x.repeat(copies, 1)
    params = [p for p in vae.parameters() if p.requires_grad] if params is None else params
    out = []
    for draw in range(draws):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(draw)
        bound_and_backward(elbo, vae.model, vae.guide, x)
        out.append(-torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in params]))
    return torch.stack(out) / copies


def z_scores(draws: torch.Tensor, target: torch.Tensor | float = 0.0) -> torch.Tensor:
    """(mean − target) / standard error per coordinate (0 where both vanish)."""
    error = draws.mean(0) - target
    se = draws.std(0) / math.sqrt(len(draws))
    return torch.where(se > 0, error / se, torch.where(error.abs() < 1e-12, 0.0, math.inf))


def fit_guide(vae: HierarchicalVAE, x: torch.Tensor, steps: int = 300) -> None:
    """A few hundred Adam steps of the ELBO on the guide's own parameters φ (the model, so log p(x), is kept)."""
    optimizer = torch.optim.Adam(vae.encoder_parameters(), lr=0.05)
    torch.manual_seed(4)
    for _ in range(steps):
        optimizer.zero_grad()
        (-log_weights(vae.model, vae.guide, x).log_w.mean()).backward()
        optimizer.step()
    vae.zero_grad()


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "latents,key",
    [
        ("[{dim: 3}]", "'model.latents' lists one layer"),
        ("[{dim: 3}, {dim: 5}]", "'model.latents[1].hidden' is missing"),
        ("[{dim: 3, hidden: [4]}, {dim: 5, hidden: [4]}]", "'model.latents[0].hidden' is set"),
        ("[{dim: 3}, {dim: 5, hidden: [4], width: 2}]", "unknown key 'model.latents[1].width'"),
        ("[{dim: 0}, {dim: 5, hidden: [4]}]", "'model.latents[0].dim' is 0"),
        ("3", "'model.latents' must be a list of mappings"),
    ],
)
def test_bad_latents_are_one_line_errors_naming_the_key(latents, key):
    with pytest.raises(UserInputError) as error:
        load_spec(None, [f"model.latents={latents}"])
    assert key in str(error.value) and "\n" not in str(error.value)


def test_latent_dim_is_the_bottom_layer_and_must_agree():
    spec = Spec.from_dict({"model": {"latents": [{"dim": 3}, {"dim": 5, "hidden": [4]}]}})
    assert spec.model.latent_dim == 5
    assert Spec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserInputError, match="'model.latent_dim' is 2 but the bottom layer"):
        Spec.from_dict({"model": {"latent_dim": 2, "latents": [{"dim": 3}, {"dim": 5, "hidden": [4]}]}})
    with pytest.raises(UserInputError, match="ladder .* accepted: diagonal-normal"):
        load_spec(None, [LATENTS, "model.guide_structure=ladder", "model.guide.type=full-normal"])
    with pytest.raises(UserInputError, match="dreg's path weights take one KL weight"):
        load_spec(None, ["model.latents=[{dim: 2, kl_weight: 0.5}, {dim: 3, hidden: []}]", "inference.estimator=dreg"])
    with pytest.raises(UserInputError, match="'model.guide_structure' is 'top-down'"):
        load_spec(None, [LATENTS, "model.guide_structure=top-down"])


def test_a_one_layer_spec_builds_todays_vae_with_its_site_z():
    vae = VAE.from_spec(load_spec(None, ["model.likelihood.type=gaussian"]).model, D)
    assert type(vae) is VAE
    sites = log_weights(vae.model, vae.guide, data())
    assert list(sites.guide) == ["z"] and list(sites.model) == ["z", "x"]


# --------------------------------------------------------------------------- the programs


@pytest.mark.parametrize("structure,guide_order", [("bottom-up", ["z1", "z2"]), ("ladder", ["z2", "z1"])])
def test_one_site_per_layer_inside_the_data_plate_each_scaled_by_its_beta(structure, guide_order):
    vae = linear_two_layer(structure)
    vae.kl_weights = [0.5, 1.0]  # z2's factor, as model.latents[0].kl_weight would set it
    x = data()
    sites = log_weights(vae.model, vae.guide, x, num_particles=3, num_data=60, kl_weight=0.4)
    assert list(sites.model) == ["z2", "z1", "x"] and list(sites.guide) == guide_order
    assert sites.scale == pytest.approx(10.0)  # N/B of the data plate every site shares
    for program in (sites.model, sites.guide):
        assert program["z2"].weight == pytest.approx(0.2) and program["z1"].weight == pytest.approx(0.4)
        assert all(site.log_prob.shape == (3, 6) for site in program.values())
    assert sites.model["x"].weight == pytest.approx(1.0)


def test_the_layers_kl_weight_comes_from_the_spec():
    spec = load_spec(None, ["model.latents=[{dim: 2, kl_weight: 0.25}, {dim: 3, hidden: []}]"])
    assert VAE.from_spec(spec.model, D).kl_weights == [0.25, 1.0]


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
def test_samples_are_drawn_ancestrally_through_the_layers(structure):
    vae = linear_two_layer(structure)
    torch.manual_seed(3)
    z2, z1 = vae.sample_layers(20000)
    prior = vae.conditionals[0]
    residual = z1 - prior.loc(z2)  # z_1 − A z_2 − a ~ N(0, diag s²), independent of z_2
    assert torch.allclose(residual.std(0), softplus(prior.raw_scale.bias) + prior.min_scale, rtol=0.03)
    assert torch.allclose(z2.std(0), torch.ones(2), rtol=0.03)
    assert vae.sample(5).shape == (5, D)


# --------------------------------------------------------------------------- closed-form KL


def test_closed_form_kl_only_where_the_guide_drew_the_layers_the_prior_depends_on():
    assert closed_form_allowed(["z2", "z1", "x"], ["z1", "z2"]) == {"z1": False, "z2": True}
    assert closed_form_allowed(["z2", "z1", "x"], ["z2", "z1"]) == {"z2": True, "z1": True}
    assert closed_form_allowed(["z", "x"], ["z"]) == {"z": True}
    for structure, expected in (("bottom-up", {"z1": False, "z2": True}), ("ladder", {"z2": True, "z1": True})):
        vae = linear_two_layer(structure)
        assert log_weights(vae.model, vae.guide, data()).kl()[1] == expected
        note = evaluation.kl_note(vae, data())
        if structure == "ladder":
            assert note is None
        else:
            assert "z1: the guide draws it before a layer its prior depends on" in note and "closed-form: z2" in note


def test_meanfield_is_unbiased_on_a_bottom_up_guide_where_pyros_closed_form_is_not():
    vae = linear_two_layer("bottom-up")
    with torch.no_grad():  # a guide step that leans on z_1, so a closed form at z_2 ~ q(z_2 | z_1) is visibly biased
        vae.upward[0].loc.weight.mul_(4.0)
    x = data(40)
    trace = losses(vae, build("trace"), x, 300)
    ours = losses(vae, build("meanfield"), x, 300)
    with pytest.warns(UserWarning, match="mean field"):  # Pyro's own check of the guide's order
        pyros = losses(vae, TraceMeanField_ELBO(max_plate_nesting=1), x, 300)
    assert abs(z_scores(ours.unsqueeze(1) - trace.unsqueeze(1)).item()) < Z  # paired: the same draws
    assert abs(z_scores(pyros.unsqueeze(1) - trace.unsqueeze(1)).item()) > 2 * Z


# --------------------------------------------------------------------------- every estimator


def logmeanexp(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


DEFINITIONS = {  # the bound of each estimator from the log weights (K, B) of the same draws
    "iwae": lambda w: logmeanexp(w),
    "dreg": lambda w: logmeanexp(w),
    "stl": lambda w: logmeanexp(w),
    "tail-adaptive": lambda w: logmeanexp(w),
    "renyi": lambda w: 2 * logmeanexp(0.5 * w),
    "miwae": lambda w: logmeanexp(w.reshape(2, 4, -1), 1).mean(0),
    "piwae": lambda w: logmeanexp(w),
    "ciwae": lambda w: 0.5 * w.mean(0) + 0.5 * logmeanexp(w),
}
OPTIONS = {
    "miwae": {"outer_particles": 2, "num_particles": 4},
    "piwae": {"outer_particles": 2, "num_particles": 4},
}


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_each_importance_weighted_bound_is_its_definition_on_the_same_draws(structure, name):
    vae = linear_two_layer(structure)
    x = data()
    elbo = build(name, **OPTIONS.get(name, {"num_particles": 8}))
    pyro.set_rng_seed(5)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=30)
    pyro.set_rng_seed(5)
    log_w = log_weights(vae.model, vae.guide, x, num_particles=8, num_data=30).log_w
    assert loss.item() == pytest.approx(-5 * DEFINITIONS[name](log_w).sum().item(), rel=1e-10)


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
@pytest.mark.parametrize("name", ["trace", "meanfield", "tracegraph"])
def test_the_elbo_estimators_have_the_elbo_as_expectation(structure, name):
    vae = linear_two_layer(structure)
    x = data(20)
    reference = []
    for draw in range(200):
        pyro.set_rng_seed(10_000 + draw)
        with torch.no_grad():
            reference.append(-log_weights(vae.model, vae.guide, x).log_w.sum())
    estimate = losses(vae, build(name), x, 200)
    difference = estimate.mean() - torch.stack(reference).mean()
    se = math.sqrt(estimate.var() / 200 + torch.stack(reference).var() / 200)
    assert abs(difference) < Z * se


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
def test_stl_and_meanfield_gradients_have_the_elbo_gradient_expectation(structure):
    """STL's guide term differentiates log q(z_2 | z_1) through z_1 too (only φ's direct path is dropped)."""
    vae = linear_two_layer(structure)
    x = data()
    trace = gradients(vae, build("trace"), x, 40, copies=40)
    for name in ("stl", "meanfield", "tracegraph"):
        other = gradients(vae, build(name), x, 40, copies=40)
        assert z_scores(other - trace).abs().max() < Z, name  # paired: the same draws


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
def test_dreg_and_piwae_gradients_have_their_definitions_expectation(structure):
    vae = linear_two_layer(structure)
    x = data()
    iwae = gradients(vae, build("iwae", num_particles=6), x, 40, copies=40)
    dreg = gradients(vae, build("dreg", num_particles=6), x, 40, copies=40)
    assert z_scores(dreg - iwae).abs().max() < Z
    # PIWAE: the guide's own parameters on MIWAE(2, 3), the decoder on IWAE(6), draw for draw
    phi, theta = vae.encoder_parameters(), list(vae.decoder.parameters())
    piwae = build("piwae", outer_particles=2, num_particles=3)
    miwae = build("miwae", outer_particles=2, num_particles=3)
    assert torch.allclose(gradients(vae, piwae, x, 5, 1, phi), gradients(vae, miwae, x, 5, 1, phi), atol=1e-10)
    assert torch.allclose(
        gradients(vae, piwae, x, 5, 1, theta),
        gradients(vae, build("iwae", num_particles=6), x, 5, 1, theta),
        atol=1e-10,
    )


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("structure", ["bottom-up", "ladder"])
def test_is_log_likelihood_matches_the_exact_two_layer_linear_gaussian_log_px(structure):
    vae = linear_two_layer(structure)
    x = data(200, seed=7)
    fit_guide(vae, x)
    torch.manual_seed(2)
    result = evaluation.evaluate(vae, x, num_samples=500, per_example=True)
    difference = result["per_example"]["log_likelihood"] - exact_log_px(vae, x)
    se = difference.std() / math.sqrt(len(difference))
    assert abs(difference.mean()) < 3 * se + 1e-3
    assert set(result["layers"]) == {"z1", "z2"}
    kl = sum(layer["kl"] for layer in result["layers"].values())
    assert kl == pytest.approx(result["kl"], rel=1e-9)
    closed = {name: layer["kl_closed_form"] for name, layer in result["layers"].items()}
    assert closed == ({"z1": False, "z2": True} if structure == "bottom-up" else {"z1": True, "z2": True})


def test_active_units_per_layer_see_a_dead_layer():
    vae = linear_two_layer("bottom-up")
    with torch.no_grad():  # q(z_2 | z_1) = N(b, I) ignores z_1: every unit of z_2 is inactive, though its draws vary
        vae.upward[0].loc.weight.zero_()
        vae.upward[0].raw_scale.weight.zero_()
        vae.upward[0].raw_scale.bias.fill_(math.log(math.e - 1))  # softplus⁻¹(1)
    units = evaluation.layer_active_units(vae, data(300))
    assert units == {"z2": {"active_units": 0, "dim": 2}, "z1": {"active_units": 3, "dim": 3}}
    one = VAE.from_spec(load_spec(None, ["model.likelihood.type=gaussian"]).model, D)
    assert evaluation.layer_active_units(one, data(50)) == {
        "z": {"active_units": evaluation.active_units(one, data(50)), "dim": 4}
    }


def test_the_ladder_merges_estimate_and_prior_by_precision():
    """N(μ, σ²) N(μ_p, σ_p²) ∝ N(μ_q, σ_q²): the merged density differs from the product by a constant in z."""
    loc, scale = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0])
    prior_loc, prior_scale = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5])
    merged = precision_merge(loc, scale, prior_loc, prior_scale)
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    product = torch.distributions.Normal(loc, scale).log_prob(z) + torch.distributions.Normal(
        prior_loc, prior_scale
    ).log_prob(z)
    gap = product.sum(-1) - merged.log_prob(z)
    assert torch.allclose(gap, gap[0].expand(7), atol=1e-12)


def test_the_table_and_the_pictures_show_each_layer():
    vae = linear_two_layer("bottom-up")
    columns = table.active_columns(evaluation.layer_active_units(vae, data(50)))
    assert columns["active_units_per_layer"].startswith("z2 ") and ", z1 " in columns["active_units_per_layer"]
    assert columns["latent_dim"] == 5
    row = {
        "label": "r",
        "checkpoint": "c.pt",
        "epoch": 1,
        "epochs": 1,
        "test_elbo": -1.0,
        "log_likelihood": -1.0,
        "log_likelihood_stderr": 0.1,
        "seconds_per_epoch": 1.0,
        "num_samples": 5,
        **columns,
    }
    assert f"| {columns['active_units_per_layer']} |" in table.markdown([row], None)
    dataset = types.SimpleNamespace(test=data(8), test_labels=None, image_shape=None, class_names=None)
    names = [label.split()[0] for label, _ in pictures.plan(Path("/nonexistent"), vae, dataset, [], "cheap")]
    assert names[-2:] == ["latent.png", "latent-z2.png"]


@pytest.mark.parametrize(
    "name,structure,number",
    [
        ("mnist-2layer", "bottom-up", "85.33"),
        ("mnist-iwae-paper-2layer", "bottom-up", "85.33"),
        ("mnist-iwae-paper-2layer-k50", "bottom-up", "82.90"),
        ("mnist-ladder", "ladder", "81.74"),
    ],
)
def test_packaged_layered_specs_build_burdas_two_layer_network_and_name_the_paper(name, structure, number):
    description = config_summary(packaged_configs()[name])
    assert number in description and ("Burda et al. 2016" in description or "Sønderby et al. 2016" in description)
    spec = load_spec(name)
    assert spec.model.guide_structure == structure and spec.model.latent_dim == 100
    torch.manual_seed(0)
    vae = VAE.from_spec(spec.model, 784)
    assert vae.sites == ["z2", "z1"] and vae.dims == [50, 100]
    widths = [m.out_features for m in vae.conditionals.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [100, 100, 100, 100]  # p(z_1 | z_2): 50-100-100, then the heads for μ and σ of z_1
    assert [m.out_features for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)] == [200, 200]
    assert vae.sample(2).shape == (2, 784)


@pytest.mark.slow
def test_a_two_layer_run_trains_evaluates_samples_and_tables_through_the_commands(tmp_path, capsys):
    torch.set_default_dtype(torch.float32)  # a run as users train it
    folder = tmp_path / "run"
    spec = load_spec(None, [*sizes.SMALL, "model.latents=[{dim: 2}, {dim: 3, hidden: [8]}]", "train.pictures=cheap"])
    training.train(spec, folder, show_progress=False)
    assert (folder / "latent.png").exists() and (folder / "latent-z2.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(folder), "--num-samples", "20", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["layers"]) == {"z1", "z2"}
    assert result["layers"]["z2"]["dim"] == 2 and result["layers"]["z1"]["kl_closed_form"] is False
    assert result["active_units"] == sum(layer["active_units"] for layer in result["layers"].values())
    assert main(["sample", str(folder), "--n", "4", "--quiet"]) == 0
    assert (folder / "samples-n4-seed0.png").exists()
    assert main(["table", str(folder), "--num-samples", "5", "--out", str(tmp_path / "table"), "--quiet"]) == 0
    assert "| z2 " in (tmp_path / "table" / "table.md").read_text()
