"""The fast paths compute what the plain ones do.

- The traced step (``inference.compile``, :mod:`pyro_vae.training.compiled`) replays the
  eager Pyro step *bit for bit* on the CPU: same generator draws, same losses,
  same parameters after several Adam steps, for every estimator that has a
  ``differentiable_loss`` and every part of the package; what it cannot trace
  runs eagerly after one log line, with the same results.
- The fused Adam is Adam (within float32 rounding of the unfused loop).
- The fast Bernoulli log-likelihood of evaluation agrees with float64.
- A trainer keeps everything on its device; on a GPU (where there is one) a
  run agrees with the CPU run within float tolerance when both draw the same ε.

TorchInductor itself (tens of seconds per compile) is checked only with
``PYRO_VAE_TEST_INDUCTOR=1``; ``inference.compile`` checks every compiled graph
against the eager step when it builds it, and falls back if they differ.
"""

from __future__ import annotations

import logging
import math
import os

import pyro
import pytest
import sizes
import torch

from pyro_vae import evaluation, training
from pyro_vae.config import registry
from pyro_vae.config.spec import OptimSpec, Spec, load_spec
from pyro_vae.model import VAE
from pyro_vae.parts import distributions
from pyro_vae.training import compiled, path_choice
from pyro_vae.training.optimizer import adam

SMALL = sizes.SMALL


pytestmark = pytest.mark.usefixtures("one_thread")


def small_spec(estimator="meanfield", particles=1, **model) -> Spec:
    raw = {
        "model": {"latent_dim": 3, "encoder": {"hidden": [16]}, "decoder": {"hidden": [16]}, **model},
        "inference": {"estimator": estimator, "num_particles": particles},
    }
    return Spec.from_dict(raw)


def train_steps(
    spec: Spec, x: torch.Tensor, traced: bool, steps: int = 5, beta=lambda i: 1.0, log: logging.Logger | None = None
):
    """Steps on alternating halves of x (a last, smaller batch too); returns losses, parameters, the step."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    vae = VAE.from_spec(spec.model, x.shape[1], (1, 8, 8))
    elbo = registry.get("estimator", spec.inference.estimator)(spec.inference)
    optimizer = adam(vae.parameters(), OptimSpec(lr=1e-2))
    step = compiled.CompiledStep(elbo, vae, log, inductor=False) if traced else path_choice.build_step(elbo, vae, False)
    losses = []
    half = x.shape[0] // 2
    for i in range(steps):
        batch = x[:half] if i % 2 == 0 else x[half:]
        if i == steps - 1:
            batch = batch[: half - 3]
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(i == 0):
            losses.append(step(batch, 1000, beta(i)))
        optimizer.step()
    return torch.stack(losses), [p.detach().clone() for p in vae.parameters()], step


def binary_data(n=24, d=64, seed=1):
    return torch.bernoulli(torch.rand(n, d, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    "estimator, particles",
    [("meanfield", 1), ("trace", 1), ("iwae", 3), ("renyi", 2), ("stl", 1), ("dreg", 3), ("tail-adaptive", 2)],
)
def test_traced_step_replays_the_eager_step_bit_for_bit(estimator, particles):
    spec = small_spec(estimator, particles)
    x = binary_data()
    eager_losses, eager_params, _ = train_steps(spec, x, traced=False)
    traced_losses, traced_params, step = train_steps(spec, x, traced=True)
    assert step.mode == "traced" and len(step.graphs) == 2  # the full batch and the last, smaller one
    # gradients are the same bits; Pyro's eager loss value adds Python floats (double), the trace float32
    assert torch.allclose(eager_losses, traced_losses, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params))


@pytest.mark.parametrize(
    "model",
    [
        {"prior": {"type": "mog", "components": 3}, "guide": {"type": "low-rank-normal", "rank": 2}},
        {"prior": {"type": "vamp", "pseudo_inputs": 4}, "guide": {"type": "full-normal"}},
        {"prior": {"type": "flow"}, "guide": {"type": "iaf"}},
        {"prior": {"type": "learned-normal"}, "likelihood": {"type": "gaussian", "scale": "learned"}},
        {
            "encoder": {"type": "conv", "channels": [4], "hidden": [16]},
            "decoder": {"type": "conv", "channels": [4], "hidden": [16]},
            "likelihood": {"type": "continuous-bernoulli"},
        },
    ],
)
def test_traced_step_matches_eager_for_every_kind_of_part(model):
    spec = small_spec("meanfield", 1, **model)
    continuous = model.get("likelihood", {}).get("type") in ("gaussian", "continuous-bernoulli")
    x = torch.rand(24, 64, generator=torch.Generator().manual_seed(2)) if continuous else binary_data()
    _, eager_params, _ = train_steps(spec, x, traced=False, steps=3)
    _, traced_params, step = train_steps(spec, x, traced=True, steps=3)
    assert step.mode == "traced", step.failed
    assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params))


def test_a_kl_warm_up_replays_one_graph_with_beta_as_an_input():
    spec = small_spec("meanfield")
    x = binary_data()

    def betas(i):  # step 0 is eager and validated
        return [1.0, 0.25, 0.5, 0.75, 0.3][i]

    eager_losses, eager_params, _ = train_steps(spec, x, traced=False, beta=betas)
    traced_losses, traced_params, step = train_steps(spec, x, traced=True, beta=betas)
    assert len(step.graphs) == 2  # β = 0.25 … 0.75 share the full batch's graph; the last batch has its own
    assert torch.allclose(eager_losses, traced_losses, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params))  # β rounded alike on both paths


@pytest.mark.parametrize("setting", ["train.kl_warmup_epochs=2", "train.beta=0.3"])
def test_a_run_with_any_kl_weight_is_the_same_bits_eager_and_traced(setting):
    """β between 0 and 1 reaches both paths as the same float32 tensor (pyro_vae.training.compiled.KLWeight)."""
    runs = {}
    for path in ("eager", "traced"):
        runs[path] = training.Trainer(
            load_spec(None, [*SMALL, setting, f"inference.compile={path}"]), None, show_progress=False
        )
        runs[path].fit()
    assert runs["traced"].loss_and_grads.mode == "traced"
    eager, traced = runs["eager"].vae.state_dict(), runs["traced"].vae.state_dict()
    assert eager.keys() == traced.keys() and all(torch.equal(eager[k], traced[k]) for k in eager)


def test_what_cannot_be_traced_runs_eagerly_after_one_log_line(caplog):
    log = logging.getLogger("pyro_vae.test")
    x = binary_data()
    for spec in (small_spec("tracegraph"),):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
            eager_losses, eager_params, _ = train_steps(spec, x, traced=False)
            traced_losses, traced_params, step = train_steps(spec, x, traced=True, log=log)
        lines = [r.getMessage() for r in caplog.records if "inference.compile" in r.getMessage()]
        assert step.mode == "eager" and len(lines) == 1 and "training eagerly" in lines[0], lines
        assert torch.equal(eager_losses, traced_losses)  # a failed trace leaves the generators alone
        assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params))


def test_dreg_with_a_flow_guide_is_traced_and_keeps_the_eager_bits():
    """The flow's path derivative from its cached base draw (no inversion) traces like any other step."""
    x = binary_data()
    spec = small_spec("dreg", 2, guide={"type": "iaf"})
    eager_losses, eager_params, _ = train_steps(spec, x, traced=False)
    traced_losses, traced_params, step = train_steps(spec, x, traced=True)
    assert step.mode == "traced"
    assert torch.equal(eager_losses, traced_losses)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params))


def test_the_compile_switch_trains_the_same_run(tmp_path):
    """``inference.compile: traced`` end to end: the same metrics as the eager run."""
    eager = training.Trainer(load_spec(None, [*SMALL, "inference.compile=eager"]), None, show_progress=False)
    eager.fit()
    fast = training.Trainer(load_spec(None, [*SMALL, "inference.compile=traced"]), None, show_progress=False)
    fast.fit()
    assert fast.loss_and_grads.mode == "traced"

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(eager.progress.metrics) == strip(fast.progress.metrics)
    assert all(torch.equal(a, b) for a, b in zip(eager.vae.parameters(), fast.vae.parameters()))


def test_parameters_are_registered_with_pyro_and_the_program_stays_pyro():
    trainer = training.Trainer(load_spec(None, SMALL), None, show_progress=False)
    x = trainer.data.training_batch(torch.arange(20))
    trainer.step(x)
    store = pyro.get_param_store()
    assert {"encoder$$$net.0.weight", "decoder$$$net.0.weight"} <= set(store.keys())
    assert store.get_param("decoder$$$net.0.weight") is trainer.vae.decoder.net[0].weight  # the module's own
    model_trace = pyro.poutine.trace(trainer.vae.model).get_trace(x)
    assert any(site["type"] == "param" for site in model_trace.nodes.values())


def test_fused_adam_is_adam():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 20)), torch.nn.Parameter(torch.randn(20))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused, plain = adam(params, OptimSpec(lr=1e-2)), torch.optim.Adam(copies, lr=1e-2)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(20):
        grads = [torch.randn_like(p) for p in params]
        for group, gs in ((params, grads), (copies, grads)):
            for p, g in zip(group, gs):
                p.grad = g.clone()
        fused.step()
        plain.step()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, copies))


def test_the_bernoulli_density_without_gradients_agrees_with_float64():
    torch.manual_seed(0)
    for dim, spread in [(784, 1.0), (784, 8.0), (784, 40.0), (97, 8.0), (12, 8.0), (1000, 40.0)]:  # odd, short, long
        x = torch.bernoulli(torch.rand(7, dim))
        logits = torch.randn(300, 7, dim) * spread
        exact = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits.double(), x.double().expand_as(logits), reduction="none"
        ).sum(-1)
        plain = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        with torch.no_grad():
            fast = distributions.BernoulliImage(logits).log_prob(x)
        plain_error = (plain.double() - exact).abs().max().item()
        fast_error = (fast.double() - exact).abs().max().item()
        assert fast_error <= max(2 * plain_error, 1e-4 * exact.abs().max().item()), (spread, fast_error, plain_error)
    assert distributions.group_size(784) == 56 and distributions.group_size(64) == 64
    assert distributions.group_size(97) == 1


def test_the_parts_fast_densities_keep_float32_accuracy_where_the_decoder_predicts_x():
    """A trained decoder's logits mostly agree with x, so Σ s·l and Σ |l| nearly cancel: no worse than the plain sum."""
    torch.manual_seed(0)
    vae = VAE.from_spec(
        load_spec(None, ["model.latent_dim=5", "model.decoder.hidden=[64,64]", "model.decoder.activation=tanh"]).model,
        784,
    ).eval()
    with torch.no_grad():
        vae.decoder.net[-1].weight.mul_(3)
        vae.decoder.net[-1].bias.copy_(15 * torch.randn(784).sign())  # logits of ±15 or so, as after training
        z = torch.randn(1, 6, 5) + 0.05 * torch.randn(200, 6, 5)
        x = torch.bernoulli(torch.sigmoid(vae.decoder(z[0])))  # what the decoder predicts, near z
        exact = -torch.nn.functional.binary_cross_entropy_with_logits(
            vae.decoder.double()(z.double()), x.double().expand(200, 6, 784), reduction="none"
        ).sum(-1)
        vae.decoder.float()
        fast = vae.likelihood(vae.decoder(z)).log_prob(x)  # the inference path: sigmoids, grouped products
    with torch.enable_grad():
        logits = vae.decoder.net(z)
        plain = vae.likelihood(logits).log_prob(x)  # the training path
    assert exact.mean() > -0.05 * logits.abs().sum(-1).mean()  # the cancelling regime: log p ≪ Σ |l|
    plain_error = (plain.double() - exact).abs().max().item()
    assert (fast.double() - exact).abs().max().item() <= 2 * plain_error + 1e-6


@pytest.mark.parametrize("activation", ["tanh", "relu", "gated"])
def test_the_decoder_without_gradients_computes_the_same_function(activation):
    """tanh(a) = 2σ(2a) − 1 folded into the weights: the same outputs as the training forward, to float32 rounding."""
    torch.manual_seed(0)
    spec = load_spec(
        None, ["model.latent_dim=5", "model.decoder.hidden=[40,30]", f"model.decoder.activation={activation}"]
    )
    vae = VAE.from_spec(spec.model, 64).eval()
    with torch.no_grad():
        for layer in vae.decoder.net.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3)  # saturate some units: tanh near ±1 as well as near 0
        z = torch.randn(200, 7, 5) * 2
        inference = vae.decoder(z)
        exact = vae.decoder.double()(z.double())
        vae.decoder.float()
    training = vae.decoder(z)
    assert (inference.double() - exact).abs().max() <= 4 * (training.double() - exact).abs().max() + 1e-5
    with torch.no_grad():
        next(m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)).weight.add_(1.0)  # new weights
        assert torch.allclose(vae.decoder(z), vae.decoder.net(z), rtol=1e-4, atol=1e-4)


def test_the_fast_densities_apply_only_where_they_are_exact():
    pyro.set_rng_seed(0)
    vae = VAE.from_spec(small_spec().model, 64).eval()
    binary, grey = binary_data(30), torch.rand(30, 64)
    assert distributions.is_binary(binary) and not distributions.is_binary(grey)  # grey levels: the plain density
    z = torch.randn(11, 30, 3)
    out = vae.decoder(z)
    with torch.no_grad(), pyro.validation_enabled(False):  # grey levels are outside the Bernoulli's support
        for x in (binary, grey):
            reference = torch.distributions.Bernoulli(logits=out).log_prob(x).sum(-1)
            assert torch.allclose(vae.likelihood(out).log_prob(x), reference, rtol=1e-5, atol=1e-4)
        assert torch.equal(out, vae.decoder.net(z))  # the decoder's output is not overwritten
        q = vae.posterior(binary)
        reference = torch.distributions.Normal(q.base_dist.loc, q.base_dist.scale).log_prob(z).sum(-1)
        assert torch.allclose(q.log_prob(z), reference, rtol=1e-5, atol=1e-4)
    rows = evaluation.rows_per_pass(vae, binary, memory_mb=0.05)
    assert 1 < rows < 50
    torch.manual_seed(3)
    blocks = evaluation.evaluate(vae, binary, num_samples=200, memory_mb=0.05)  # particle blocks of < 50
    torch.manual_seed(4)
    one = evaluation.evaluate(vae, binary, num_samples=200, memory_mb=512)  # all in one pass
    for key in ("elbo", "log_likelihood"):  # other draws of the same estimate: within the spread over examples
        assert abs(blocks[key] - one[key]) < 3 * one[f"{key}_stderr"], key


def _standard_normal_on_cpu(generator):
    """ε drawn on the CPU from ``generator`` and moved to the device: the same ε on every device."""

    def draw(shape, dtype, device):
        return torch.randn(shape, dtype=dtype, generator=generator).to(device)

    return draw


def run_with_fixed_eps(device: str, monkeypatch) -> training.Trainer:
    monkeypatch.setattr(
        torch.distributions.normal, "_standard_normal", _standard_normal_on_cpu(torch.Generator().manual_seed(5))
    )
    spec = load_spec(None, [*SMALL, "data.binarize=static", f"train.device={device}"])
    trainer = training.Trainer(spec, None, show_progress=False)
    trainer.fit()
    return trainer


def test_a_trainer_keeps_everything_on_its_device(monkeypatch):
    trainer = run_with_fixed_eps("cpu", monkeypatch)
    device = trainer.device
    assert all(
        t.device == device
        for t in (trainer.data.train, trainer.data.test, *trainer.vae.parameters(), *trainer.vae.buffers())
    )
    assert all(
        s.device == device
        for state in trainer.optimizer.state.values()
        for s in state.values()
        if torch.is_tensor(s) and s.dim() > 0
    )
    again = run_with_fixed_eps("cpu", monkeypatch)
    assert trainer.progress.metrics[-1]["test_elbo"] == again.progress.metrics[-1]["test_elbo"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_gpu_run_agrees_with_the_cpu_run_within_float_tolerance(monkeypatch):
    cpu = run_with_fixed_eps("cpu", monkeypatch)
    gpu = run_with_fixed_eps("cuda", monkeypatch)
    assert gpu.data.train.is_cuda and all(p.is_cuda for p in gpu.vae.parameters())
    for a, b in zip(cpu.progress.metrics, gpu.progress.metrics):
        assert math.isclose(a["train_elbo"], b["train_elbo"], rel_tol=1e-4, abs_tol=1e-3)
    for p, q in zip(cpu.vae.parameters(), gpu.vae.parameters()):
        assert torch.allclose(p, q.cpu(), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(
    os.environ.get("PYRO_VAE_TEST_INDUCTOR") != "1",
    reason="TorchInductor compiles take tens of seconds; set PYRO_VAE_TEST_INDUCTOR=1",
)
def test_inductor_compiled_step_matches_eager_within_float_tolerance(monkeypatch):
    spec = small_spec("trace")
    x = binary_data()
    eager_losses, eager_params, _ = train_steps(spec, x, traced=False)
    pyro.set_rng_seed(0)
    vae = VAE.from_spec(spec.model, x.shape[1])
    step = compiled.CompiledStep(registry.get("estimator", "trace")(spec.inference), vae, inductor=True)
    optimizer = adam(vae.parameters(), OptimSpec(lr=1e-2))
    half = x.shape[0] // 2
    losses = []
    for i in range(5):
        batch = x[:half] if i % 2 == 0 else x[half:]
        batch = batch[: half - 3] if i == 4 else batch
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(i == 0):
            losses.append(step(batch, 1000))
        optimizer.step()
    assert step.mode == "inductor"
    assert torch.allclose(torch.stack(losses), eager_losses, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(vae.parameters(), eager_params))


def test_what_the_traced_step_patches_in_pyro_is_still_there_and_is_restored():
    import importlib

    originals = {}
    for module_name, name in compiled.PATCHED:
        module = importlib.import_module(module_name)
        assert hasattr(module, name), (
            f"{module_name}.{name} moved: pyro_vae.training.compiled.host_free_pyro must follow it"
        )
        originals[module_name, name] = getattr(module, name)
    with compiled.host_free_pyro():
        for module_name, name in compiled.PATCHED:
            assert getattr(importlib.import_module(module_name), name) is not originals[module_name, name]
    for (module_name, name), original in originals.items():
        assert getattr(importlib.import_module(module_name), name) is original


def test_the_evaluations_passes_count_a_convolutional_decoders_feature_maps():
    """rows_per_pass measures the VAE's own activations: a conv decoder's feature maps shrink the passes."""
    pyro.set_rng_seed(0)
    image = ["data.name=digits", "model.latent_dim=4"]
    mlp = VAE.from_spec(
        load_spec(None, [*image, "model.encoder.hidden=[16]", "model.decoder.hidden=[16]"]).model, 64, (1, 8, 8)
    ).eval()
    conv = VAE.from_spec(
        load_spec(
            None,
            [
                *image,
                "model.encoder.type=conv",
                "model.decoder.type=conv",
                "model.encoder.channels=[64,128]",
                "model.decoder.channels=[64,128]",
                "model.encoder.hidden=[16]",
                "model.decoder.hidden=[16]",
            ],
        ).model,
        64,
        (1, 8, 8),
    ).eval()
    x = binary_data(4)
    maps = 64 * 4 * 4 + 128 * 2 * 2  # the conv decoder's feature maps of one draw, in floats
    assert evaluation.rows_per_pass.__module__.endswith("bounds")
    from pyro_vae.evaluation.bounds import row_bytes

    assert row_bytes(conv, x) - row_bytes(mlp, x) >= 4 * maps
    assert evaluation.rows_per_pass(conv, x, 4.0) < evaluation.rows_per_pass(mlp, x, 4.0)
