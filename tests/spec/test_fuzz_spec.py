"""Property: a mutated valid spec gives a valid run, or exit status 2 with one line; never a traceback.

A tiny valid spec is mutated one to three times: a key set to a value from a
pool of valid, odd and wrong values (negative, zero, huge, NaN, infinite, wrong
type, empty list, mapping, ...), a part swapped for another registered one, a
key deleted, or an unknown key added. The result goes through ``pyro-vae train``
(in process here; ``benchmarks/fuzz_cli.py`` runs 200 of them through the real
command). Accepted outcomes: exit 0 with a finished run, exit 2 with exactly one
line on stderr, or exit 3 (the NaN guard) with its one-line message last.

To keep a valid run short, a few sizes that only cost time are capped after
mutating (``CAPS``: epochs, data sizes, number of flows); an invalid value is
never changed.
"""

from __future__ import annotations

import copy
import io
import math
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_vae.cli.commands import main
from pyro_vae.config import registry
from pyro_vae.config.spec import Spec
from pyro_vae.training.run import CHECKPOINT, CONFIG, METRICS

BASE = Spec.from_dict(
    {
        "data": {"train_size": 48, "test_size": 16, "batch_size": 16},
        "model": {"latent_dim": 2, "encoder": {"hidden": [8]}, "decoder": {"hidden": [8]}},
        "train": {"epochs": 1},
    }
).to_dict()

Path_ = tuple[str, ...]


def _paths(tree: dict, prefix: Path_ = ()) -> list[Path_]:
    out = []
    for key, value in tree.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


def _get(tree: dict, path: Path_) -> Any:
    for key in path:
        tree = tree[key]
    return tree


PATHS = _paths(BASE)
SECTIONS = [()] + [path for path in PATHS if isinstance(_get(BASE, path), dict)]
VALUES: list[Any] = [
    -1,
    0,
    1,
    2,
    3,
    10**12,
    0.0,
    0.5,
    -0.5,
    1.0,
    1e-300,
    1e300,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "abc",
    "learned",
    "cpu",
    "cuda",
    "2020-01-01",
    True,
    False,
    None,
    [],
    [0],
    [2],
    [8, 8],
    [0.5, 0.5],
    ["a"],
    {},
    {"x": 1},
]
ALTERNATIVES: dict[Path_, list[str]] = {
    ("data", "name"): registry.names("dataset"),
    ("data", "binarize"): ["auto", "dynamic", "static", "none"],
    ("model", "encoder", "type"): registry.names("network"),
    ("model", "decoder", "type"): registry.names("network"),
    ("model", "prior", "type"): registry.names("prior"),
    ("model", "guide", "type"): registry.names("guide"),
    ("model", "likelihood", "type"): registry.names("likelihood"),
    ("inference", "estimator"): registry.names("estimator"),
}
# sizes that only cost time: a valid value above the cap is lowered to it
CAPS: dict[Path_, int] = {
    ("train", "epochs"): 1,
    ("data", "train_size"): 48,
    ("data", "test_size"): 16,
    ("data", "linear_gaussian", "num_train"): 48,
    ("data", "linear_gaussian", "num_test"): 16,
    ("model", "prior", "flows"): 2,
    ("model", "guide", "flows"): 2,
}


def apply(tree: dict, operations: list[tuple]) -> dict:
    """The spec tree after ``operations``: ("set", path, value), ("delete", path), ("add", section, key, value)."""
    tree = copy.deepcopy(tree)
    for operation in operations:
        kind, path = operation[0], operation[1]
        node = tree
        for key in path[:-1] if kind != "add" else path:
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break  # an earlier mutation replaced this section: nothing to mutate here
            node = node[key]
        else:
            if kind == "set":
                node[path[-1]] = operation[2]
            elif kind == "delete":
                node.pop(path[-1], None)
            else:
                node[operation[2]] = operation[3]
    for path, cap in CAPS.items():
        node = tree
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(path[-1]) if isinstance(node, dict) else None
        if type(value) is int and value > cap:
            node[path[-1]] = cap
    return tree


def check_outcome(rc: int, stderr: str, run: Path) -> None:
    """0 with a finished run, 2 with one line, or 3 from the NaN guard; never a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    if rc == 0:
        state_files = {p.name for p in run.iterdir()}
        assert {CONFIG, CHECKPOINT, METRICS} <= state_files
    elif rc == 2:
        assert len(lines) == 1 and lines[0].startswith("pyro-vae: error: "), lines
    else:
        assert rc == 3, (rc, lines)
        assert "training stopped, the last good checkpoint is kept" in lines[-1], lines


def operations() -> st.SearchStrategy:
    set_value = st.tuples(st.just("set"), st.sampled_from(PATHS), st.sampled_from(VALUES))
    swap_part = st.sampled_from(sorted(ALTERNATIVES)).flatmap(
        lambda path: st.tuples(st.just("set"), st.just(path), st.sampled_from(ALTERNATIVES[path]))
    )
    delete = st.tuples(st.just("delete"), st.sampled_from(PATHS))
    add = st.tuples(
        st.just("add"), st.sampled_from(SECTIONS), st.sampled_from(["bogus", "Type", 7]), st.sampled_from(VALUES)
    )
    return st.lists(st.one_of(set_value, swap_part, swap_part, delete, add), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    empty_root = folder / "no-data"  # mnist and friends fail fast (exit 2) instead of loading 60k images
    empty_root.mkdir()
    previous = os.environ.get("PYRO_VAE_DATA")
    os.environ["PYRO_VAE_DATA"] = str(empty_root)
    yield folder
    if previous is None:
        del os.environ["PYRO_VAE_DATA"]
    else:
        os.environ["PYRO_VAE_DATA"] = previous


def test_the_base_spec_trains(workspace):
    spec_file, run = workspace / "base.yaml", workspace / "base-run"
    spec_file.write_text(yaml.safe_dump(BASE))
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert main(["train", "--config", str(spec_file), "--out", str(run), "--no-progress"]) == 0
    check_outcome(0, err.getvalue(), run)


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations())
def test_a_mutated_spec_runs_or_exits_2_with_one_line(workspace, operations):
    tree = apply(BASE, operations)
    number = len(list(workspace.glob("case-*")))
    case = workspace / f"case-{number}"
    case.mkdir()
    spec_file, run = case / "spec.yaml", case / "run"
    spec_file.write_text(yaml.safe_dump(tree))
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc = main(["train", "--config", str(spec_file), "--out", str(run), "--no-progress"])
    check_outcome(rc, err.getvalue(), run)
