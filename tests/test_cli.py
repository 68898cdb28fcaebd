"""The command line end to end on small real data: train, evaluate, sample, configs."""
import json
import math
import subprocess
import sys

import pytest

from pyro_vae.cli import main

TINY = ["--set", "model.encoder.hidden=[32]", "--set", "model.decoder.hidden=[32]", "--no-progress"]
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "checkpoint.pt", "log.txt",
             "samples.png", "reconstructions.png", "elbo.png", "latent.png")


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
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--set", "model.prior.type=nope"],
                          capture_output=True, text=True, timeout=120)
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
    assert main(["train", "--epochs", "1", "--out", str(run), "--set", "data.name=file", "--set", f"data.path={array}",
                 *TINY]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["model_inputs"] == {"data_dim": 64, "image_shape": [1, 8, 8]}
    array.unlink()
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    del info["model_inputs"]                                   # a run written before the record: loads its data
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "old.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(array) in err and not (tmp_path / "old.png").exists()
