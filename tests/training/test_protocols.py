"""The papers' training protocols: data-initialized decoder, VampPrior recipe, schedules, validation,
early stopping, best checkpoint, and the results table of finished runs."""

import csv
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
import yaml

from pyro_vae import training
from pyro_vae.cli.commands import command_line, main
from pyro_vae.config.spec import OptimSpec, load_spec
from pyro_vae.data import load_dataset
from pyro_vae.errors import UserInputError
from pyro_vae.evaluation import table
from pyro_vae.model import VAE
from pyro_vae.training import checkpoint, optimizer
from pyro_vae.training.run import BEST, CHECKPOINT, CONFIG, LOG, Run

TINY = [
    "data.train_size=200",
    "data.test_size=40",
    "data.batch_size=50",
    "model.encoder.hidden=[16]",
    "model.decoder.hidden=[16]",
]
PROTOCOL = [
    *TINY,
    "data.validation_size=60",
    "optim.schedule=plateau",
    "optim.schedule.patience=1",
    "optim.schedule.factor=0.5",
    "train.early_stopping_patience=3",
    "optim.lr=0.05",
    "train.epochs=12",
    # a run whose validation ELBO peaks within the 12 epochs: tanh networks from the mean image
    "model.encoder.activation=tanh",
    "model.decoder.activation=tanh",
    "model.decoder.init_bias=data-mean",
]


def cli_args(overrides):
    return [item for override in overrides for item in ("--set", override)]


# -- the decoder starts at the mean image ------------------------------------------------------------


@pytest.mark.parametrize(
    "likelihood,extra",
    [
        ("bernoulli", []),
        ("continuous-bernoulli", ["data.binarize=none"]),
        ("gaussian", ["data.binarize=none"]),
        ("laplace", ["data.binarize=none"]),
    ],
)
@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_decoder_output_starts_at_the_training_mean(likelihood, extra, network):
    spec = load_spec(
        None,
        [
            *TINY,
            *extra,
            "model.decoder.init_bias=data-mean",
            f"model.likelihood.type={likelihood}",
            f"model.encoder.type={network}",
            f"model.decoder.type={network}",
            *(["model.encoder.channels=[4]", "model.decoder.channels=[4]"] if network == "conv" else []),
        ],
    )
    data = load_dataset(spec.data)
    vae = VAE.from_spec(spec.model, data.data_dim, data.image_shape, data.train)
    mean = (
        data.train.mean(0).clamp(1e-3, 1 - 1e-3)
        if likelihood != "gaussian" and likelihood != "laplace"
        else data.train.mean(0)
    )
    with torch.no_grad():
        vae.decoder.net[-1].weight.zero_() if network == "mlp" else vae.decoder.deconv[-1].weight.zero_()
        at_zero = vae.likelihood.mean(vae.decoder(torch.zeros(3, spec.model.latent_dim)))
    reachable = (mean > 0.07) & (mean < 0.93) if likelihood == "continuous-bernoulli" else mean == mean
    assert reachable.sum() > 10  # torch's float32 CB clamps λ, so its mean stays in ~(0.063, 0.937)
    tolerance = 2e-3 if likelihood == "continuous-bernoulli" else 1e-5  # CB's float32 mean near λ = ½
    assert torch.allclose(at_zero[:, reachable], mean[reachable].expand_as(at_zero[:, reachable]), atol=tolerance)
    zero = VAE.from_spec(
        load_spec(None, [*TINY, "model.decoder.init_bias=zero"]).model, data.data_dim, data.image_shape, data.train
    )
    assert zero.decoder.output_bias.abs().max() == 0


def test_continuous_bernoulli_mean_is_inverted_everywhere():
    from pyro_vae.parts.likelihoods import ContinuousBernoulli

    means = torch.tensor([0.07, 0.2, 0.4999, 0.5, 0.73, 0.93])
    logits = ContinuousBernoulli().output_for_mean(means)
    assert torch.allclose(dist.ContinuousBernoulli(logits=logits).mean, means, atol=2e-3)
    ends = dist.ContinuousBernoulli(logits=ContinuousBernoulli().output_for_mean(torch.tensor([0.001, 0.999]))).mean
    assert ends[0] < 0.07 and ends[1] > 0.93  # beyond reach: the nearest end


def test_vampprior_pseudo_inputs_are_clamped_into_the_data_range():
    spec = load_spec(None, [*TINY, "model.prior.type=vamp", "model.prior.pseudo_inputs=7"])
    data = load_dataset(spec.data)
    vae = VAE.from_spec(spec.model, data.data_dim, data.image_shape, data.train)
    with torch.no_grad():
        vae.prior.pseudo_inputs.uniform_(-3, 4)
    inputs = vae.prior.inputs()
    assert inputs.min() >= 0 and inputs.max() <= 1 and (inputs == 1).any() and (inputs == 0).any()
    free = VAE.from_spec(
        load_spec(None, [*TINY, "model.prior.type=vamp", "model.prior.pseudo_input_activation=none"]).model,
        data.data_dim,
    )
    assert free.prior.inputs() is free.prior.pseudo_inputs


@pytest.mark.parametrize("guide", ["diagonal-normal", "low-rank-normal", "full-normal", "iaf"])
def test_log_variance_bounds_clamp_every_gaussian_guide(guide):
    spec = load_spec(
        None, [*TINY, f"model.guide.type={guide}", "model.guide.log_variance_bounds=[-6, 2]", "model.latent_dim=3"]
    )
    vae = VAE.from_spec(spec.model, 64)
    head = vae.guide_head.base if guide == "iaf" else vae.guide_head
    layer = {"diagonal-normal": "raw_scale", "iaf": "raw_scale", "low-rank-normal": "raw_diag", "full-normal": "tril"}
    for scale in (-50.0, 50.0):
        with torch.no_grad():
            getattr(head, layer[guide]).weight.zero_()
            getattr(head, layer[guide]).bias.fill_(scale)
        q = vae.guide_head.gaussian(vae.encoder(torch.rand(4, 64)))
        variance = q.variance if guide != "full-normal" else q.scale_tril.diagonal(dim1=-2, dim2=-1) ** 2
        if guide == "low-rank-normal":
            variance = q.cov_diag
        assert variance.min() >= torch.exp(torch.tensor(-6.0)) * (1 - 1e-5)
        assert variance.max() <= torch.exp(torch.tensor(2.0)) * (1 + 1e-5)


def test_bad_log_variance_bounds_are_one_line():
    with pytest.raises(UserInputError, match="'model.guide.log_variance_bounds'"):
        load_spec(None, ["model.guide.log_variance_bounds=[2, -6]"])


# -- schedules -------------------------------------------------------------------------------------


def test_iwae_schedule_has_stages_of_three_to_the_i_epochs():
    factors = [optimizer.iwae_factor(epoch) for epoch in range(3280 + 5)]
    boundaries = [epoch for epoch in range(1, len(factors)) if factors[epoch] != factors[epoch - 1]]
    assert boundaries == [1, 4, 13, 40, 121, 364, 1093]  # 1 + 3 + 9 + ... epochs
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(10 ** (-7 / 7))
    assert sum(3**i for i in range(8)) == 3280


@pytest.mark.parametrize("schedule", ["constant", "iwae", "cosine", "plateau"])
def test_schedule_names_build_torch_schedulers(schedule):
    spec = OptimSpec(lr=0.1)
    spec.schedule.type, spec.schedule.patience = schedule, 1
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = optimizer.adam(params, spec)
    scheduler = optimizer.scheduler(adam, spec, epochs=10)
    for epoch in range(3):
        adam.step()  # an epoch's steps (no gradients: no change)
        optimizer.step_scheduler(scheduler, validation_elbo=-1.0 - epoch)  # plateau: getting worse
    lr = optimizer.current_lr(adam)
    expected = {
        "constant": 0.1,
        "iwae": 0.1 * 10 ** (-1 / 7),
        "plateau": 0.05,
        "cosine": 0.05 * (1 + torch.cos(torch.tensor(3 * torch.pi / 10))).item(),
    }[schedule]
    assert lr == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optim.schedule=plateau"], "'optim.schedule'"),
        (["train.early_stopping_patience=3"], "'train.early_stopping_patience'"),
        (["optim.schedule=warm"], "'optim.schedule.type'"),
        (["data.validation_size=0"], "'data.validation_size'"),
    ],
)
def test_protocol_keys_refuse_bad_values_in_one_line(overrides, key):
    with pytest.raises(UserInputError, match=key):
        load_spec(None, overrides)


# -- validation, early stopping, best.pt -------------------------------------------------------------


def test_validation_split_is_held_out_of_training_and_fixed_by_the_seed():
    spec = load_spec(None, [*TINY, "data.validation_size=60", "data.binarize=none"])
    data, again = load_dataset(spec.data, 3), load_dataset(spec.data, 3)
    other = load_dataset(spec.data, 4)
    assert data.validation.shape[0] == 60 and data.num_train == 140
    assert torch.equal(data.validation, again.validation) and not torch.equal(data.validation, other.validation)
    rows = {tuple(r.tolist()) for r in data.train}
    assert not any(tuple(r.tolist()) in rows for r in data.validation)


def test_published_validation_split_needs_a_dataset_that_has_one():
    with pytest.raises(UserInputError, match="'data.validation_size' is 'published'"):
        load_dataset(load_spec(None, ["data.validation_size=published"]).data)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PYRO_VAE_DATA"), reason="needs $PYRO_VAE_DATA with binarized_mnist")
def test_binarized_mnist_published_validation_split():
    spec = load_spec(None, ["data.name=binarized-mnist", "data.validation_size=published"])
    data = load_dataset(spec.data)
    assert (data.num_train, data.validation.shape[0], data.test.shape[0]) == (50000, 10000, 10000)


def test_early_stopping_keeps_the_best_epoch_in_best_pt(tmp_path, capsys):
    run = tmp_path / "run"
    trainer = training.train(load_spec(None, PROTOCOL), run, show_progress=False)
    metrics = Run(run).read_metrics()
    best = max(metrics, key=lambda m: m["validation_elbo"])
    assert trainer.progress.stopped_early and len(metrics) < 12
    assert len(metrics) - best["epoch"] == 3
    state = checkpoint.load(run / BEST)
    assert state["epoch"] == best["epoch"] and state["validation_elbo"] == best["validation_elbo"]
    assert [m["lr"] for m in metrics][-1] < 0.05  # plateau lowered the rate
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "3"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["checkpoint"] == "best.pt" and "best.pt" in captured.err
    assert main(["evaluate", str(run), "--num-samples", "3", "--checkpoint", "last"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "checkpoint.pt"


@pytest.mark.slow
def test_sigkill_and_resume_with_plateau_validation_and_early_stopping_is_bit_identical(tmp_path):
    from test_robustness import assert_nested_equal, assert_same_run, checkpoint_writes

    reference = tmp_path / "reference"
    training.train(load_spec(None, PROTOCOL), reference, show_progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", "train", *cli_args(PROTOCOL), "--out", str(run), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    checkpoint_writes(run, process, 4)
    time.sleep(random.Random(1).uniform(0.0, 0.02))
    process.kill()
    process.wait()
    training.resume(run, show_progress=False)
    assert_same_run(run, reference)
    a, b = checkpoint.load(run / CHECKPOINT), checkpoint.load(reference / CHECKPOINT)
    assert_nested_equal(a["scheduler"], b["scheduler"], "scheduler")
    assert (a["best_epoch"], a["stopped_early"]) == (b["best_epoch"], b["stopped_early"])
    assert_nested_equal(checkpoint.load(run / BEST), checkpoint.load(reference / BEST), "best")


# -- pyro-vae table ----------------------------------------------------------------------------------


def test_table_of_two_runs_writes_the_paired_column(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for run, extra in ((first, []), (second, ["model.latent_dim=2"])):
        training.train(load_spec(None, [*TINY, "train.epochs=2", *extra]), run, show_progress=False)
    out = tmp_path / "table"
    assert main(["table", str(second), "--reference", str(first), "--num-samples", "30", "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    assert "vs `first` (paired)" in text and "reference" in text and (out / "curves.png").stat().st_size > 0
    rows = (out / "table.csv").read_text().splitlines()
    assert len(rows) == 3
    cached = list(second.glob("scores-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(["table", str(second), str(first), "--num-samples", "30", "--out", str(out), "--force"]) == 0
    assert cached[0].stat().st_mtime_ns == stamp  # scored once, read back


def test_table_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["table", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a run folder" in err


def test_runs_of_different_training_seeds_are_paired_and_labelled_by_their_paths(tmp_path, capsys):
    first, second = tmp_path / "seed0" / "digits", tmp_path / "seed1" / "digits"
    for run, seed in ((first, 0), (second, 1)):
        training.train(load_spec(None, [*TINY, "train.epochs=1", f"train.seed={seed}"]), run, show_progress=False)
    out = tmp_path / "table"
    assert main(["table", str(second), "--reference", str(first), "--num-samples", "30", "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    assert "vs `seed0/digits` (paired)" in text and "| `seed1/digits` |" in text
    assert "other test images" not in text
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [row["label"] for row in rows] == ["seed0/digits", "seed1/digits"]
    assert rows[0]["vs_reference"] == "reference" and math.isfinite(float(rows[1]["vs_reference"]))
    cache = next(second.glob("scores-*.pt"))
    cache.write_bytes(cache.read_bytes()[:200])  # a damaged cache is scored again
    capsys.readouterr()
    assert (
        main(["table", str(second), "--reference", str(first), "--num-samples", "30", "--out", str(out), "--force"])
        == 0
    )
    assert "Traceback" not in capsys.readouterr().err and (out / "table.md").read_text() == text
    assert checkpoint.load(cache)["row"]["test"] == table.fingerprint(load_dataset(load_spec(None, TINY).data).test)


def test_a_damaged_checkpoint_stops_table_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    training.train(load_spec(None, [*TINY, "train.epochs=1"]), run, show_progress=False)
    path = run / CHECKPOINT
    path.write_bytes(path.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["table", str(run), "--num-samples", "5", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "Traceback" not in err


def test_table_fingerprint_tells_apart_test_sets_of_equal_sum_and_shape():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert a.sum() == b.sum() and a.shape == b.shape
    assert table.fingerprint(a) != table.fingerprint(b)
    assert table.fingerprint(a) == table.fingerprint(a.clone().t().contiguous().t())
    assert table.fingerprint(a) != table.fingerprint(a.reshape(1, 4)) != table.fingerprint(a.double())


def test_table_labels_are_the_shortest_distinct_trailing_paths(tmp_path):
    paths = [tmp_path / "a" / "seed0" / "digits", tmp_path / "a" / "seed1" / "digits", tmp_path / "mnist"]
    assert table.labels(paths) == ["seed0/digits", "seed1/digits", "mnist"]
    assert table.labels([tmp_path / "x" / "run", tmp_path / "y" / "x" / "run"]) == [
        str(Path(*(tmp_path / "x" / "run").parts[-3:])),
        "y/x/run",
    ]


# -- said out loud: divergence, sizes beyond the data -------------------------------------------------


def test_a_diverging_run_warns_once_per_epoch_and_sizes_beyond_the_data_say_what_was_used(tmp_path, capsys):
    run = tmp_path / "run"
    spec = load_spec(
        None,
        [
            *TINY,
            "data.train_size=100000",
            "data.test_size=100000",
            "optim.lr=50",
            "train.epochs=2",
            "model.latent_dim=2",
        ],
    )  # d = 2: the latent map skips t-SNE, which the diverged means crash
    with command_line():  # the console handler the command line sets up: the lines reach stderr
        training.train(spec, run, show_progress=False)
    err, log = capsys.readouterr().err, (run / LOG).read_text()
    for text in (err, log):
        assert "data.train_size is 100000 but 'digits' has 1617 training examples: all 1617 are used" in text
        assert "data.test_size is 100000 but 'digits' has 180 test examples: all 180 are used" in text
        warnings = [line for line in text.splitlines() if "training is diverging" in line]
        assert len(warnings) == 2 and "epoch 1:" in warnings[0] and "epoch 2:" in warnings[1]
        assert "optim.lr (now 50)" in warnings[0]
    start = checkpoint.load(run / CHECKPOINT)["start_elbo"]
    assert -100 < start < 0 and all(m["train_elbo"] < 11 * start for m in Run(run).read_metrics())


def test_divergence_rule_is_ten_times_the_starting_magnitude_below_the_start():
    assert training.divergence_warning(3, -330.0, -30.0, 1e-3) is None  # E₀ − 10 |E₀| exactly
    line = training.divergence_warning(3, -331.0, -30.0, 1e-3)
    assert line.startswith("warning: epoch 3: train ELBO -331 nats") and "E₀ = -30 nats" in line
    assert training.divergence_warning(1, -9.0, 0.5, 1e-3) is None  # |E₀| < 1: one nat instead
    assert training.divergence_warning(1, -10.0, 0.5, 1e-3) is not None
    assert training.divergence_warning(1, -1e20, -1e19, 1e-3) is None  # no worse than 10 |E₀| below


def test_a_checkpoint_without_the_starting_elbo_resumes_against_the_first_epoch(tmp_path):
    run = tmp_path / "run"
    training.train(load_spec(None, [*TINY, "train.epochs=1", "model.latent_dim=2"]), run, show_progress=False)
    state = checkpoint.load(run / CHECKPOINT)
    del state["start_elbo"], state["format"]  # as checkpoints were written before
    checkpoint.save_atomic(state, run / CHECKPOINT)
    trainer = training.resume(run, epochs=2, show_progress=False)
    assert trainer.progress.start_elbo is None and len(Run(run).read_metrics()) == 2
    assert "training is diverging" not in (run / LOG).read_text()


def test_a_run_folder_written_before_the_evaluation_seed_keeps_its_test_images(tmp_path):
    run = tmp_path / "run"
    training.train(load_spec(None, [*TINY, "train.epochs=1", "train.seed=1"]), run, show_progress=False)
    config = yaml.safe_load((run / CONFIG).read_text())
    del config["data"]["eval_binarize_seed"]
    (run / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    state = checkpoint.load(run / CHECKPOINT)
    del state["spec"]["data"]["eval_binarize_seed"], state["format"]
    checkpoint.save_atomic(state, run / CHECKPOINT)
    spec, _, data = training.load_run(run)
    assert spec.data.eval_binarize_seed == "train"
    assert torch.equal(data.test, load_dataset(load_spec(None, [*TINY, "data.eval_binarize_seed=train"]).data, 1).test)
    assert not torch.equal(data.test, load_dataset(load_spec(None, TINY).data, 1).test)
