"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

from pyro_vae import registry
from pyro_vae.spec import load_spec
from pyro_vae.training import Trainer

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if containing in b]
    assert len(matches) == 1, f"expected one README block with {containing!r}"
    return matches[0]


@pytest.fixture
def clean_registry():
    before = {kind: list(registry.names(kind)) for kind in registry.KINDS}
    yield
    for kind, names in before.items():
        for name in set(registry.names(kind)) - set(names):
            del registry._TABLES[kind][name]


def test_user_defined_prior_from_the_readme_trains(clean_registry):
    exec(python_block('registry.register("prior", "student-t")'), {})
    spec = load_spec(None, ["model.prior.type=student-t", "train.epochs=2", "data.train_size=300", "data.test_size=50"])
    metrics = Trainer(spec, None, show_progress=False).fit()
    assert metrics[-1]["test_elbo"] > metrics[0]["test_elbo"] - 5.0
    assert metrics[-1]["test_elbo"] > -200


def test_python_usage_example_runs():
    namespace: dict = {}
    exec(python_block("svi.step("), namespace)
    assert namespace["images"].shape == (16, 64)
    assert namespace["mean"].shape == (5, 2)
