"""The command line end to end on small real data: train, evaluate, sample, configs."""

import json
import math
import subprocess
import sys

import pytest

from pyro_vae.cli.commands import main

TINY = ["--set", "model.encoder.hidden=[32]", "--set", "model.decoder.hidden=[32]", "--no-progress"]
RUN_FILES = (
    "config.yaml",
    "run.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "log.txt",
    "samples.png",
    "reconstructions.png",
    "elbo.png",
    "latent.png",
)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--epochs", "3", "--out", str(out), *TINY]) == 0
    return out


def evaluate(run, capsys, *extra):
    capsys.readouterr()
    assert main(["evaluate", str(run), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_writes_every_run_file(digits_run):
    for name in RUN_FILES:
        assert (digits_run / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"epoch", "train_elbo", "test_elbo", "seconds"} <= set(row)
        assert math.isfinite(row["test_elbo"]) and row["seconds"] > 0
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"]


def test_evaluate_reports_consistent_bounds_in_nats(digits_run, capsys):
    result = evaluate(digits_run, capsys, "--num-samples", "200")
    for key in ("elbo", "elbo_analytic_kl", "reconstruction", "kl", "log_likelihood"):
        assert math.isfinite(result[key]), key
    assert result["num_samples"] == 200 and result["split"] == "test"
    assert result["log_likelihood"] >= result["elbo"]
    # ELBO = reconstruction − KL, the sampled and the closed-form KL within Monte Carlo error
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"], abs=4 * result["elbo_stderr"])
    assert result["elbo_analytic_kl"] == pytest.approx(result["reconstruction"] - result["kl"])


def test_evaluate_is_reproducible_with_a_seed(digits_run, capsys):
    first = evaluate(digits_run, capsys, "--num-samples", "50", "--seed", "7")
    again = evaluate(digits_run, capsys, "--num-samples", "50", "--seed", "7")
    other = evaluate(digits_run, capsys, "--num-samples", "50", "--seed", "8")
    assert first == again
    assert first["log_likelihood"] != other["log_likelihood"]


def test_evaluate_train_split(digits_run, capsys):
    assert evaluate(digits_run, capsys, "--num-samples", "10", "--split", "train")["num_examples"] > 1000


def test_sample_writes_a_picture(digits_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(digits_run), "--n", "16", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_configs_lists_packaged_specs(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert "mnist-vamp" in names and "digits" in names
    assert all(len(line.split()) > 2 for line in lines)  # each has a description


def test_python_dash_m_is_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", "--set", "model.prior.type=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "model.prior.type" in done.stderr and "vamp" in done.stderr
    assert "Traceback" not in done.stderr


def test_existing_run_is_not_overwritten(digits_run, capsys):
    before = (digits_run / "checkpoint.pt").read_bytes()
    assert main(["train", "--epochs", "1", "--out", str(digits_run), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (digits_run / "checkpoint.pt").read_bytes() == before


def test_sample_needs_no_training_data_once_the_run_recorded_its_model_inputs(tmp_path, capsys):
    import numpy as np

    array = tmp_path / "images.npy"
    np.save(array, (np.random.default_rng(0).random((120, 8, 8)) > 0.5).astype(np.float32))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--out",
                str(run),
                "--set",
                "data.name=file",
                "--set",
                f"data.path={array}",
                *TINY,
            ]
        )
        == 0
    )
    info = json.loads((run / "run.json").read_text())
    assert info["model_inputs"] == {"data_dim": 64, "image_shape": [1, 8, 8]}
    array.unlink()
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    del info["model_inputs"]  # a run written before the record: loads its data
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "old.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(array) in err and not (tmp_path / "old.png").exists()


# -- one consistent command line ------------------------------------------------------------------------------------


def test_quiet_on_every_command_that_shows_progress_and_no_progress_as_a_hidden_alias():
    from pyro_vae.cli.commands import build_parser

    parser = build_parser()
    for argv in (["train"], ["evaluate", "RUN"], ["sample", "RUN"], ["table", "RUN"], ["compare", "--estimators", "x"]):
        assert parser.parse_args([*argv, "--quiet"]).quiet, argv
        assert not parser.parse_args(argv).quiet, argv
    commands = parser._subparsers._group_actions[0].choices
    for name in ("train", "compare"):
        assert parser.parse_args([name, "--no-progress", *(["--estimators", "x"] if name == "compare" else [])]).quiet
        assert "--no-progress" not in commands[name].format_help()


def test_version_prints_the_package_version():
    from importlib import metadata

    done = subprocess.run([sys.executable, "-m", "pyro_vae", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"pyro-vae {metadata.version('pyro_vae')}"


def test_configs_name_prints_the_resolved_spec_as_yaml(capsys):
    import yaml

    from pyro_vae.config.spec import load_spec

    assert main(["configs", "mnist-vamp"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_spec("mnist-vamp").to_dict()
    assert main(["configs", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'nope' is not a packaged spec" in err and "mnist-vamp" in err


def test_evaluate_names_its_epoch_and_checkpoint_and_scores_a_validation_split(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "2",
                "--out",
                str(run),
                "--set",
                "data.validation_size=50",
                "--set",
                "data.train_size=200",
                "--set",
                "data.test_size=40",
                *TINY,
            ]
        )
        == 0
    )
    result = evaluate(run, capsys, "--num-samples", "5", "--split", "validation", "--checkpoint", "last")
    assert (result["split"], result["num_examples"], result["epoch"]) == ("validation", 50, 2)
    assert result["checkpoint"] == "checkpoint.pt"
    best = evaluate(run, capsys, "--num-samples", "5")
    assert best["checkpoint"] == "best.pt" and best["epoch"] in (1, 2)


def test_evaluate_validation_of_a_run_without_one_is_one_line_naming_the_run(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--split", "validation", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"'{digits_run}' has no validation split" in err


def test_a_usage_error_has_one_prefix_and_names_the_command(capsys):
    assert main(["train", "--bogus"]) == 2
    assert capsys.readouterr().err.strip() == "pyro-vae: error: train: unrecognized arguments: --bogus (see --help)"
    assert main(["evaluate"]) == 2
    assert capsys.readouterr().err.strip().startswith("pyro-vae: error: evaluate: the following arguments")


def test_every_option_shows_one_default():
    import argparse

    from pyro_vae.cli.commands import build_parser
    from pyro_vae.cli.options import HelpFormatter

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, command in commands.items():
        formatter = HelpFormatter(name)
        for action in command._actions:
            if action.help not in (None, argparse.SUPPRESS):
                assert formatter._expand_help(action).count("(default") <= 1, (name, action.dest)


def test_a_log_line_during_a_progress_bar_does_not_cut_it(monkeypatch):
    """On a terminal, a line logged mid-epoch goes through tqdm.write: it starts a line of its own."""
    import io

    from pyro_vae import training
    from pyro_vae.cli.commands import command_line
    from pyro_vae.config.spec import load_spec

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    original = training.Trainer.step

    def step_and_log(self, x, y=None):
        if self.progress.global_step == 2:
            self.log.info("a line logged mid-epoch")
        return original(self, x, y)

    monkeypatch.setattr(training.Trainer, "step", step_and_log)
    trainer = training.Trainer(
        load_spec(
            None,
            [
                "data.train_size=64",
                "data.test_size=16",
                "data.batch_size=16",
                "model.encoder.hidden=[8]",
                "model.decoder.hidden=[8]",
                "train.epochs=1",
            ],
        ),
        None,
    )
    with command_line():  # the console handler the command line sets up
        trainer.fit()
    pieces = [piece.strip() for line in terminal.getvalue().split("\n") for piece in line.split("\r")]
    assert "a line logged mid-epoch" in pieces, terminal.getvalue()


def test_plain_progress_prints_no_line_twice(capsys):
    from pyro_vae import progress

    with progress.PlainProgress(3, "work", "item", every=0.0) as bar:
        for _ in range(3):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and len(set(line.rsplit(",", 1)[0] for line in lines)) == 3, lines


def test_meanfield_note_names_the_distributions_inside_independent():
    from pyro_vae import training
    from pyro_vae.config.spec import load_spec

    trainer = training.Trainer(
        load_spec(
            None,
            [
                "data.train_size=32",
                "data.test_size=8",
                "model.encoder.hidden=[8]",
                "model.decoder.hidden=[8]",
                "model.prior.type=mog",
                "inference.estimator=meanfield",
            ],
        ),
        None,
        show_progress=False,
    )
    assert "KL(Normal ‖ DiagonalNormalMixture)" in trainer.note and "Independent" not in trainer.note
