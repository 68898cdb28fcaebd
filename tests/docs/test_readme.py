"""The README runs as written: every Python block in a fresh interpreter, and the plugin commands."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: subprocesses, builds, whole runs

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def block(language: str, containing: str) -> str:
    matches = [b for b in blocks(language) if containing in b]
    assert len(matches) == 1, f"expected one README {language} block with {containing!r}"
    return matches[0]


def run(command, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_block_runs_in_a_fresh_interpreter_after_import_pyro_vae(index, tmp_path):
    code = "import pyro_vae\n" + blocks("python")[index]
    run([sys.executable, "-c", code], tmp_path)


def test_the_plugin_example_runs_from_the_command_line_as_written(tmp_path):
    (tmp_path / "my_priors.py").write_text(block("python", "# my_priors.py"))
    commands = [line.split("#")[0].strip() for line in block("bash", "--plugin my_priors").splitlines()]
    commands = [c for c in commands if c]
    assert commands[0] == (
        "pyro-vae train --plugin my_priors --set model.prior.type=student-t "
        "--set model.prior.df=3 --epochs 10 --out runs/student-t"
    )
    for command in commands:
        run([sys.executable, "-m", "pyro_vae", *command.split()[1:]], tmp_path)
    spec = (tmp_path / "runs" / "student-t" / "config.yaml").read_text()
    assert "type: student-t" in spec and "df: 3.0" in spec
    assert json.loads((tmp_path / "runs" / "student-t" / "run.json").read_text())["plugins"] == ["my_priors"]
    reports = list((tmp_path / "runs").glob("compare-*/comparison.csv"))
    assert len(reports) == 1 and "trace-k:8" in reports[0].read_text()


def test_the_python_line_of_the_plugin_example_trains(tmp_path):
    (tmp_path / "my_priors.py").write_text(block("python", "# my_priors.py"))
    line = re.search(
        r"`(pyro_vae\.train\(pyro_vae\.load_spec\(None, \[\"model\.prior\.type=student-t\".*?\))`", README.read_text()
    ).group(1)
    run([sys.executable, "-c", f"import pyro_vae\nimport my_priors\n{line}"], tmp_path)
    assert "df: 5.0" in (tmp_path / "runs" / "t5" / "config.yaml").read_text()


def test_a_missing_plugin_and_an_undeclared_key_are_one_line_errors(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", "--plugin", "no_such_plugin"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "'no_such_plugin'" in missing.stderr
    (tmp_path / "my_priors.py").write_text(block("python", "# my_priors.py"))
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_vae",
            "train",
            "--plugin",
            "my_priors",
            "--set",
            "model.prior.type=student-t",
            "--set",
            "model.prior.dof=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2 and "'model.prior.dof'" in wrong.stderr and "df" in wrong.stderr
