"""The evaluation piece by piece: how the passes cover the particles, what each summary is, what a call leaves behind.

A small MLP VAE with a diagonal guide (closed-form KL against the standard-normal
prior); every number is checked against the log weights of
:func:`pyro_vae.evaluation.log_weight_terms` on the same draws, or against
torch's own distributions.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vae import evaluation
from pyro_vae.config.spec import load_spec
from pyro_vae.evaluation import bounds
from pyro_vae.model import VAE

DATA_DIM, LATENT = 6, 2


def small_vae(*overrides: str) -> VAE:
    spec = load_spec(
        None, [f"model.latent_dim={LATENT}", "model.encoder.hidden=[5]", "model.decoder.hidden=[5]", *overrides]
    )
    torch.manual_seed(0)
    return VAE.from_spec(spec.model, DATA_DIM)


def binary(n: int, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "n, k, rows, expected",
    [
        (5, 2, 4, [(0, 2, [2]), (2, 4, [2]), (4, 5, [2])]),  # two examples of 2 particles per pass
        (3, 4, 4, [(0, 1, [4]), (1, 2, [4]), (2, 3, [4])]),  # K = rows: one example per pass
        (2, 3, 100, [(0, 2, [3])]),  # everything in one pass
        (2, 10, 4, [(0, 1, [4, 3, 3]), (1, 2, [4, 3, 3])]),  # K > rows: near-equal blocks, the larger first
        (1, 9, 3, [(0, 1, [3, 3, 3])]),
        (1, 7, 1, [(0, 1, [1] * 7)]),
    ],
)
def test_passes_cover_every_example_with_all_its_particles(n, k, rows, expected):
    got = list(bounds.passes(n, k, rows))
    assert got == expected
    assert all(max(blocks) <= rows for _, _, blocks in got)


def test_rows_per_pass_is_the_memory_over_one_rows_bytes():
    vae, x = small_vae(), binary(4)
    one = bounds.row_bytes(vae, x)
    assert evaluation.rows_per_pass(vae, x, memory_mb=100 * one / 2**20) == 100
    assert evaluation.rows_per_pass(vae, x, memory_mb=100.5 * one / 2**20) == 100
    assert evaluation.rows_per_pass(vae, x, memory_mb=0.0) == 1  # at least one row
    assert evaluation.rows_per_pass(vae, x, memory_mb=1e3 * one / 2**20) == 1000  # no cap beyond the memory


@pytest.mark.parametrize("k", [1, 7, 1000])
@pytest.mark.parametrize("examples", [1, 3])
def test_a_pass_holds_fixed_plus_rows_per_row_bytes_at_every_number_of_particles(k, examples):
    """The bytes of a pass of E examples with K particles each (every module output, measured) are what
    ``pass_bytes`` at K says: an example's encoder once, each particle's draw and decoder outputs K times."""
    vae, x = small_vae(), binary(examples)
    fixed, per_row = bounds.pass_bytes(vae, x, num_samples=k)
    held = bounds.TEMPORARIES * bounds._probe_bytes(vae, x, None, num_particles=k)
    rows = examples * k
    assert held <= fixed + rows * per_row <= held + bounds.TEMPORARIES * rows  # within the per-pair rounding up


def test_many_particles_per_example_make_a_pair_cheaper_down_to_one_draw_s_bytes():
    vae, x = small_vae(), binary(4)
    one, many = bounds.row_bytes(vae, x), bounds.row_bytes(vae, x, num_samples=10**6)
    assert many < one
    decoded = bounds.TEMPORARIES * DATA_DIM * x.element_size()  # the decoder's output for one draw, at least
    assert many >= decoded
    assert evaluation.rows_per_pass(vae, x, 1.0, num_samples=10**6) > evaluation.rows_per_pass(vae, x, 1.0)


def test_a_vampprior_s_pseudo_inputs_are_a_fixed_cost_of_a_pass_not_of_each_row():
    """The pseudo-inputs go through the encoder once per pass whatever its size: they raise ``fixed``, not
    ``per_row``, and the rows are what is left of the bound after them."""
    x = binary(4)
    few = bounds.pass_bytes(small_vae("model.prior.type=vamp", "model.prior.pseudo_inputs=3"), x)
    many = bounds.pass_bytes(small_vae("model.prior.type=vamp", "model.prior.pseudo_inputs=300"), x)
    assert many[1] == few[1] == bounds.row_bytes(small_vae(), x)
    hidden = 5 * x.element_size()  # the encoder's hidden layer, for each of the 297 added pseudo-inputs
    assert many[0] - few[0] >= bounds.TEMPORARIES * 297 * hidden
    vae = small_vae("model.prior.type=vamp", "model.prior.pseudo_inputs=300")
    fixed, per_row = many
    assert evaluation.rows_per_pass(vae, x, memory_mb=(fixed + 100 * per_row) / 2**20) == 100
    assert evaluation.rows_per_pass(vae, x, memory_mb=fixed / 2**20) == 1


def test_a_row_costs_every_modules_output_and_the_example_three_times():
    vae, x = small_vae(), binary(4)
    outputs: dict[int, torch.Tensor] = {}  # each distinct output tensor once (a Sequential returns its last layer's)

    def record(module, inputs, output):
        for tensor in output if isinstance(output, tuple) else (output,):
            if torch.is_tensor(tensor):
                outputs[tensor.data_ptr()] = tensor

    handles = [m.register_forward_hook(record) for m in vae.modules()]
    with torch.no_grad():
        vae.guide(x[:1]), vae.model(x[:1])
    for handle in handles:
        handle.remove()
    example = DATA_DIM * x.element_size()
    total = sum(t.numel() * t.element_size() for t in outputs.values())
    assert bounds.row_bytes(vae, x) == bounds.TEMPORARIES * (total + example)
    assert bounds.TEMPORARIES == 3


class Split(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, 2 * h


class SplitEncoder(torch.nn.Module):
    """A plugin network with a submodule that returns a tuple (its second tensor kept alive, as a cache would)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.split, self.output_dim = inner, Split(), inner.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, self.kept = self.split(self.inner(x))
        return h


def test_a_row_counts_the_tensors_a_module_returns_in_a_tuple():
    vae, x = small_vae(), binary(4)
    plain = bounds.row_bytes(vae, x)
    vae.encoder = SplitEncoder(vae.encoder)
    features = 5 * x.element_size()  # the encoder's output for one example: hidden=[5]
    assert bounds.row_bytes(vae, x) == plain + bounds.TEMPORARIES * features


def test_measuring_a_row_leaves_the_vae_and_the_generators_as_they_were():
    vae, x = small_vae(), binary(4)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    bounds.row_bytes(vae, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(not m._forward_hooks for m in vae.modules())


def test_evaluate_is_the_log_weights_summaries():
    """ELBO, reconstruction, KL (closed form), log-likelihood and their standard errors, from the same draws."""
    vae, x = small_vae(), binary(7)
    k = 30
    torch.manual_seed(3)
    result = evaluation.evaluate(vae, x, num_samples=k, per_example=True, memory_mb=1e-3)  # several passes
    torch.manual_seed(3)
    log_lik, log_prior, log_q = evaluation.log_weight_terms(vae, x, k, memory_mb=1e-3)
    log_w = (log_lik + log_prior - log_q).double()
    elbo = log_w.mean(0)
    ll = torch.logsumexp(log_w, 0) - math.log(k)
    with torch.no_grad():
        q = vae.posterior(x)
        kl = torch.distributions.kl_divergence(q, vae.prior_distribution()).double()
    reconstruction = log_lik.double().mean(0)
    assert torch.allclose(result["per_example"]["elbo"], elbo, atol=1e-5)
    assert torch.allclose(result["per_example"]["log_likelihood"], ll, atol=1e-5)
    assert result["per_example"]["elbo"].dtype == torch.float64
    assert result["elbo"] == pytest.approx(elbo.mean().item(), abs=1e-5)
    assert result["log_likelihood"] == pytest.approx(ll.mean().item(), abs=1e-5)
    assert result["reconstruction"] == pytest.approx(reconstruction.mean().item(), abs=1e-5)
    assert result["kl"] == pytest.approx(kl.mean().item(), abs=1e-5) and result["kl_closed_form"] is True
    assert result["elbo_analytic_kl"] == pytest.approx((reconstruction - kl).mean().item(), abs=1e-5)
    assert result["elbo_stderr"] == pytest.approx(elbo.std().item() / math.sqrt(7), rel=1e-4)
    assert result["log_likelihood_stderr"] == pytest.approx(ll.std().item() / math.sqrt(7), rel=1e-4)
    assert (result["num_samples"], result["num_examples"], result["units"]) == (k, 7, "nats per example")
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / k
    assert result["ess"]["mean_fraction"] == pytest.approx(ess.mean().item(), rel=1e-4)
    assert result["ess"]["num_weights"] == k
    assert "layers" not in result


def test_a_sampled_kl_is_the_mean_of_log_q_minus_log_p():
    vae, x = small_vae("model.prior.type=mog", "model.prior.components=3"), binary(5)
    torch.manual_seed(4)
    result = evaluation.evaluate(vae, x, num_samples=20)
    torch.manual_seed(4)
    log_lik, log_prior, log_q = evaluation.log_weight_terms(vae, x, 20)
    assert result["kl_closed_form"] is False
    assert result["kl"] == pytest.approx((log_q - log_prior).double().mean().item(), abs=1e-5)
    assert result["elbo_analytic_kl"] == pytest.approx(result["elbo"], abs=1e-5)


def test_one_example_has_no_standard_error_and_counts_progress():
    vae, x = small_vae(), binary(3)
    ticks = []

    class Progress:
        def update(self, n):
            ticks.append(n)

    result = evaluation.evaluate(vae, x[:1], num_samples=5)
    assert result["elbo_stderr"] == 0.0 and result["log_likelihood_stderr"] == 0.0
    evaluation.evaluate(vae, x, num_samples=4, memory_mb=1e-4, progress=Progress())
    assert sum(ticks) == 3 and len(ticks) > 1


@pytest.mark.parametrize("call", ["evaluate", "test_elbo", "log_weight_terms"])
@pytest.mark.parametrize("training", [True, False])
def test_an_evaluation_leaves_the_vae_in_its_mode(call, training):
    vae, x = small_vae(), binary(3)
    vae.train(training)
    seen = []
    vae.decoder.register_forward_hook(lambda module, inputs, output: seen.append(module.training))
    getattr(evaluation, call)(vae, x, num_samples=2)
    assert seen and not any(seen)  # scored in eval mode
    assert vae.training is training


def test_the_per_epoch_elbo_is_reconstruction_minus_the_closed_form_kl():
    vae, x = small_vae(), binary(6)
    torch.manual_seed(6)
    got = evaluation.test_elbo(vae, x, num_samples=3)
    torch.manual_seed(6)
    log_lik, _, _ = evaluation.log_weight_terms(vae, x, 3)
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(vae.posterior(x), vae.prior_distribution()).double()
    assert got["test_reconstruction"] == pytest.approx(log_lik.double().mean().item(), abs=1e-5)
    assert got["test_kl"] == pytest.approx(kl.mean().item(), abs=1e-5)
    assert got["test_elbo"] == pytest.approx(got["test_reconstruction"] - got["test_kl"], abs=1e-5)


def test_a_seeded_per_epoch_elbo_uses_its_own_draws():
    vae, x = small_vae(), binary(6)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    seeded = evaluation.test_elbo(vae, x, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator untouched
    assert evaluation.test_elbo(vae, x, seed=11) == seeded
    assert evaluation.test_elbo(vae, x, seed=12) != seeded
    torch.manual_seed(11)
    assert evaluation.test_elbo(vae, x) == seeded  # the same draws as the global generator seeded alike
    assert not torch.equal(torch.get_rng_state(), state)


def test_the_kl_note_names_the_pair_without_a_closed_form():
    assert evaluation.kl_note(small_vae(), binary(3)) is None
    note = evaluation.kl_note(small_vae("model.prior.type=vamp", "model.prior.pseudo_inputs=3"), binary(3))
    assert note == (
        "meanfield: z: KL(Normal ‖ DiagonalNormalMixture) has no closed form; that term is estimated by sampling "
        "log q(z|x) − log p(z) at z ~ q (unbiased, higher variance)"
    )
    flow_guide = small_vae("model.guide.type=iaf")
    torch.manual_seed(8)
    state = torch.get_rng_state()
    evaluation.kl_note(flow_guide, binary(3))
    assert torch.equal(torch.get_rng_state(), state)


def test_active_units_are_the_latent_dims_whose_posterior_mean_varies():
    vae, x = small_vae(), binary(50)
    with torch.no_grad():
        vae.guide_head.loc.weight[1].zero_()  # the second dim's mean is the same for every x
        vae.guide_head.loc.weight[0].mul_(50)
        vae.guide_head.raw_scale.weight.zero_()  # the posterior scales are the same for every x: only means vary
        means = vae.encode(x)[0]
    assert means[:, 0].var() > 0.01 and means[:, 1].var() < 1e-10
    assert evaluation.active_units(vae, x) == 1
    assert evaluation.active_units(vae, x, batch_size=7) == 1
    assert evaluation.active_units(vae, x, threshold=means[:, 0].var().item() * 2) == 0
    assert evaluation.layer_active_units(vae, x, batch_size=7) == {"z": {"active_units": 1, "dim": LATENT}}


def test_a_layered_vae_reports_each_layers_kl():
    """Bottom-up guide: z1's KL is sampled (its prior depends on z2, drawn after it), z2's closed form."""
    vae, x = small_vae("model.latents=[{dim: 3}, {dim: 2, hidden: []}]"), binary(4)
    result = evaluation.evaluate(vae, x, num_samples=6)
    assert set(result["layers"]) == {"z1", "z2"}
    assert sum(layer["kl"] for layer in result["layers"].values()) == pytest.approx(result["kl"], abs=1e-5)
    assert {name: layer["kl_closed_form"] for name, layer in result["layers"].items()} == {"z1": False, "z2": True}
    assert result["kl_closed_form"] is False


def test_the_per_epoch_elbo_takes_one_draw_per_example_by_default():
    vae, x = small_vae(), binary(6)
    assert evaluation.test_elbo(vae, x, seed=3) == evaluation.test_elbo(vae, x, num_samples=1, seed=3)


def test_the_probes_of_a_pass_check_no_support(monkeypatch):
    """Measuring a row and naming the KL terms score draws from q: no support checks, as in the evaluation itself."""
    vae, x = small_vae("model.prior.type=mog"), binary(3)

    def checked(self, value):
        raise AssertionError("a support check ran")

    monkeypatch.setattr(torch.distributions.Distribution, "_validate_sample", checked)
    assert bounds.row_bytes(vae, x) > 0
    assert evaluation.kl_note(vae, x).startswith("meanfield: z: KL(Normal ‖ DiagonalNormalMixture)")


LAYERS_2 = "model.latents=[{dim: 2}, {dim: 2, hidden: []}]"
NOTE_TAIL = "that term is estimated by sampling log q(z|x) − log p(z) at z ~ q (unbiased, higher variance)"
ORDERED = "the guide draws it before a layer its prior depends on, where a closed form would be biased"


@pytest.mark.parametrize(
    "overrides, note",
    [
        (
            ["model.latents=[{dim: 2}, {dim: 2, hidden: []}, {dim: 2, hidden: []}]"],
            f"meanfield: z1, z2: {ORDERED}; {NOTE_TAIL}; closed-form: z3",
        ),
        (
            [LAYERS_2, "model.prior.type=mog", "model.guide_structure=ladder"],
            f"meanfield: z2: KL(Normal ‖ DiagonalNormalMixture) has no closed form; {NOTE_TAIL}; closed-form: z1",
        ),
        (
            [
                "model.latents=[{dim: 2}, {dim: 2, hidden: []}, {dim: 2, hidden: []}]",
                "model.prior.type=mog",
                "model.guide_structure=ladder",
            ],
            f"meanfield: z3: KL(Normal ‖ DiagonalNormalMixture) has no closed form; {NOTE_TAIL}; closed-form: z2, z1",
        ),
        (
            [LAYERS_2, "model.prior.type=mog"],
            f"meanfield: z2: KL(Normal ‖ DiagonalNormalMixture) has no closed form; z1: {ORDERED}; {NOTE_TAIL}",
        ),
    ],
)
def test_the_kl_note_of_a_layered_vae_names_each_sampled_layer_and_why(overrides, note):
    spec = load_spec(None, ["model.encoder.hidden=[4]", "model.decoder.hidden=[4]", *overrides])
    assert evaluation.kl_note(VAE.from_spec(spec.model, DATA_DIM), binary(3)) == note


def conditional_vae() -> VAE:
    spec = load_spec(
        None,
        [f"model.latent_dim={LATENT}", "model.encoder.hidden=[5]", "model.decoder.hidden=[5]", "model.condition=label"],
    )
    torch.manual_seed(0)
    return VAE.from_spec(spec.model, DATA_DIM, num_classes=3)


def test_a_conditional_vae_is_scored_with_each_examples_label():
    """Every pass hands its examples' labels to the programs: the probes, the passes, the per-epoch ELBO."""
    vae, x = conditional_vae(), binary(5)
    labels, other = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 0, 1, 0])
    assert bounds.row_bytes(vae, x, labels) > 0 and evaluation.rows_per_pass(vae, x, 1.0, labels) >= 1
    assert evaluation.kl_note(vae, x, labels) is None
    torch.manual_seed(9)
    result = evaluation.evaluate(vae, x, num_samples=4, memory_mb=1e-4, per_example=True, labels=labels)
    torch.manual_seed(9)  # one example per pass: the same draws as scoring each example alone, in order
    alone = [
        evaluation.evaluate(vae, x[i : i + 1], num_samples=4, per_example=True, labels=labels[i : i + 1])
        for i in range(5)
    ]
    want = torch.cat([a["per_example"]["elbo"] for a in alone])
    assert torch.allclose(result["per_example"]["elbo"], want, atol=1e-6)
    torch.manual_seed(9)
    relabelled = evaluation.evaluate(vae, x, num_samples=4, memory_mb=1e-4, per_example=True, labels=other)
    assert not torch.allclose(relabelled["per_example"]["elbo"], want)
    for seed in (None, 2):
        torch.manual_seed(1)
        first = evaluation.test_elbo(vae, x, num_samples=2, seed=seed, labels=labels)
        torch.manual_seed(1)
        assert evaluation.test_elbo(vae, x, num_samples=2, seed=seed, labels=other) != first
