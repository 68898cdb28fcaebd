"""The run folder as one object (:class:`pyro_vae.training.run.Run`): what it writes, and reading it back."""

import json

import pytest
import sizes
import torch

from pyro_vae import training
from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.training import checkpoint, run_state
from pyro_vae.training.run import BEST, CHECKPOINT, CONFIG, METRICS, RUN_INFO, Run

SMALL = [*sizes.SMALL, "inference.compile=eager", "train.pictures=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run-folder") / "run"
    training.train(load_spec(None, SMALL), folder, show_progress=False)
    return folder


def test_create_writes_the_spec_and_run_json_and_reads_them_back(tmp_path):
    spec = load_spec(None, SMALL)
    run = Run.create(tmp_path / "run", spec, force=False, model_inputs={"data_dim": 64, "image_shape": [1, 8, 8]})
    assert run.read_spec() == spec
    assert run.model_inputs() == {"data_dim": 64, "image_shape": (1, 8, 8), "num_classes": None}
    assert json.loads((run.path / RUN_INFO).read_text())["seed"] == spec.train.seed
    assert run.read_metrics() == [] and not run.has_checkpoint()


def test_create_refuses_a_folder_with_another_run_unless_forced(trained):
    other = load_spec(None, [*SMALL, "train.seed=5"])
    before = (trained / CHECKPOINT).read_bytes()
    with pytest.raises(UserInputError, match="already holds a run with a different spec"):
        Run.create(trained, other, force=False)
    assert (trained / CHECKPOINT).read_bytes() == before


def test_metrics_rows_are_written_whole_and_read_back(tmp_path):
    run = Run(tmp_path)
    rows = [{"epoch": 1, "test_elbo": -1.5}, {"epoch": 2, "test_elbo": -1.25}]
    run.write_metrics(rows)
    assert run.read_metrics() == rows
    assert (tmp_path / METRICS).read_text().count("\n") == 2


def test_the_checkpoint_and_its_metrics_are_saved_together(trained):
    run = Run(trained)
    state, path = run.load_checkpoint(run.read_spec(), "last", run_state.STATE_KEYS)
    assert path == trained / CHECKPOINT and state["epoch"] == 2
    assert state["metrics"] == run.read_metrics()


def test_load_checkpoint_refuses_one_written_by_another_spec(trained, tmp_path):
    run = Run(trained)
    other = load_spec(None, [*SMALL, "optim.lr=0.5"])
    with pytest.raises(UserInputError, match=r"different spec than its config.yaml \(optim.lr"):
        run.load_checkpoint(other)
    with pytest.raises(UserInputError, match="accepted: best, last"):
        run.checkpoint_path("first")


def test_best_is_read_where_the_run_has_it_else_the_last(trained, tmp_path):
    run = Run(trained)
    assert run.checkpoint_path("best") == trained / CHECKPOINT
    copy = Run(tmp_path)
    spec = run.read_spec()
    state, _ = run.load_checkpoint(spec)
    copy.write_spec(spec)
    copy.save_checkpoint(state)
    copy.save_best({"spec": state["spec"], "model": state["model"], "epoch": 1, "validation_elbo": -3.0})
    best, path = copy.load_checkpoint(spec, "best")
    assert path == tmp_path / BEST and best["epoch"] == 1
    assert copy.read_metrics() == state["metrics"]


def test_a_folder_of_an_earlier_version_still_loads_and_resumes(trained, tmp_path):
    """No model_inputs in run.json, no start_elbo or step_path in the checkpoint: loads, scores and resumes."""
    old = tmp_path / "old"
    old.mkdir()
    for name in (CONFIG, METRICS, RUN_INFO):
        (old / name).write_bytes((trained / name).read_bytes())
    info = json.loads((old / RUN_INFO).read_text())
    del info["model_inputs"]
    (old / RUN_INFO).write_text(json.dumps(info))
    state = checkpoint.load(trained / CHECKPOINT)
    checkpoint.save_atomic(
        {k: v for k, v in state.items() if k not in ("format", "start_elbo", "step_path")}, old / CHECKPOINT
    )
    assert Run(old).model_inputs() is None
    spec, vae, image_shape, used = training.load_model(old)
    assert used == old / CHECKPOINT and image_shape == (1, 8, 8)
    reference = training.load_run(trained)[1].state_dict()
    assert all(torch.equal(vae.state_dict()[k], reference[k]) for k in reference)
    trainer = training.resume(old, epochs=3, show_progress=False)
    assert trainer is not None and [row["epoch"] for row in Run(old).read_metrics()] == [1, 2, 3]
