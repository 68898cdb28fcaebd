"""``benchmarks/reproduce.py``: its budgets are checked before anything is trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [(["--max-epochs", "0"], "--max-epochs"), (["--max-epochs", "5", "--train-minutes", "0"], "--train-minutes")],
)
def test_a_budget_that_is_not_positive_is_refused_in_one_line_with_status_2(tmp_path, arguments, named):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), *arguments, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def reproduce(monkeypatch):
    """benchmarks/reproduce.py as a module, its child processes recorded instead of run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import reproduce as module

    commands = []

    class Child:
        def __init__(self, command):
            commands.append(command)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(module.subprocess, "Popen", Child)
    return module, commands


def test_a_new_run_trains_on_the_device_asked_for_and_a_resumed_one_on_its_own(tmp_path, reproduce):
    """``train --resume`` refuses ``--device`` (the run keeps its saved spec): a second budget must not pass it."""
    module, commands = reproduce
    run_dir = tmp_path / "run"
    module.train_for("mnist-iwae-paper", run_dir, 3, "cuda", None)
    run_dir.mkdir()
    (run_dir / module.CHECKPOINT).write_bytes(b"")
    module.train_for("mnist-iwae-paper", run_dir, 6, "cuda", None)
    fresh, resumed = commands
    assert fresh[fresh.index("--device") + 1] == "cuda" and "--config" in fresh
    assert resumed[resumed.index("--resume") + 1] == str(run_dir) and "--device" not in resumed
    assert resumed[resumed.index("--epochs") + 1] == "6"
