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
