"""A conditional run's folder: run.json records the number of classes, and the run folder reads it back."""

import json
from types import SimpleNamespace

import pytest
from sizes import SMALL

from pyro_vae.config.spec import load_spec
from pyro_vae.training.run import RUN_INFO, Run
from pyro_vae.training.runner import model_inputs

IMAGES = SimpleNamespace(data_dim=64, image_shape=(1, 8, 8))


def test_model_inputs_record_the_classes_of_a_conditional_vae_only():
    assert model_inputs(IMAGES, SimpleNamespace(num_classes=10)) == {
        "data_dim": 64,
        "image_shape": [1, 8, 8],
        "num_classes": 10,
    }
    assert model_inputs(IMAGES, SimpleNamespace(num_classes=0)) == {"data_dim": 64, "image_shape": [1, 8, 8]}


def test_the_run_folder_reads_the_recorded_classes_back(tmp_path):
    recorded = {"data_dim": 64, "image_shape": [1, 8, 8], "num_classes": 10}
    run = Run.create(tmp_path / "run", load_spec(None, SMALL), force=False, model_inputs=recorded)
    assert run.model_inputs() == {"data_dim": 64, "image_shape": (1, 8, 8), "num_classes": 10}


@pytest.mark.parametrize("classes", [0, -3, "10", True, 2.5])
def test_a_damaged_class_count_is_no_usable_record(tmp_path, classes):
    run = Run.create(tmp_path / "run", load_spec(None, SMALL), force=False, model_inputs={"data_dim": 64})
    info = json.loads((run.path / RUN_INFO).read_text())
    info["model_inputs"] = {"data_dim": 64, "image_shape": [1, 8, 8], "num_classes": classes}
    (run.path / RUN_INFO).write_text(json.dumps(info))
    assert run.model_inputs() is None
