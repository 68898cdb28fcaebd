"""Mutation testing of the mathematics with mutmut, against the fast math tests.

    python benchmarks/mutation.py                                  # the files of setup.cfg's [mutmut] only_mutate
    python benchmarks/mutation.py --only pyro_vae/infer/estimators.py    # one file
    python benchmarks/mutation.py --report-only                    # rewrite the report from mutmut's last results

mutmut (a dev dependency) copies the package into ``mutants/``, changes one
operator, number or name at a time, and runs the tests of ``[mutmut]
pytest_add_cli_args_test_selection`` that reach the changed function: a mutant
that no test notices *survives*. The run happens in a scratch copy of the
checkout (``--workdir``), so nothing in the working tree changes. Writes
``mutation.md`` (score = killed / (killed + survived + timeouts), and every
survivor with its diff) under ``--out``. Not part of the test suite (it runs
the math tests thousands of times).
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mutmut forks a child per mutant from a process that ran the tests: a thread pool (OpenMP) of the parent's
# would leave a child waiting forever on a lock no thread holds, so every mutant runs single-threaded
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def copy_checkout(workdir: Path, only: list[str] | None) -> None:
    """The tracked and untracked (not ignored) files of the checkout, into ``workdir``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        files = listed.stdout.split()
    else:  # not a git checkout: every file but runs, environments and caches
        skip = {"runs", "mutants", ".venv", "__pycache__", ".git"}
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    for name in files:
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)  # a link (docs/notebooks) stays a link
    if only:
        config = configparser.ConfigParser()
        config.read(workdir / "setup.cfg")
        config["mutmut"]["only_mutate"] = "\n" + "\n".join(only)
        with open(workdir / "setup.cfg", "w") as handle:
            config.write(handle)


def results(workdir: Path) -> dict[str, list[str]]:
    """mutmut's verdicts, mutant name by status."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir, capture_output=True, text=True
    ).stdout
    by_status: dict[str, list[str]] = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+):\s*(\w[\w ]*)$", line)
        if match:
            by_status.setdefault(match.group(2).strip(), []).append(match.group(1))
    return by_status


def diff(workdir: Path, name: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=workdir, capture_output=True, text=True
    ).stdout.strip()


def source_file(name: str) -> str:
    """The file of a mutant: ``pyro_vae.infer.gaussian.x_log_density__mutmut_3`` → ``pyro_vae/infer/gaussian.py``."""
    module = re.split(r"\.x(?:_|ǁ)", name, maxsplit=1)[0]
    return module.replace(".", "/") + ".py"


def scores(by_status: dict[str, list[str]]) -> list[str]:
    """One table row per mutated file: killed, timed out, survived, not reached, score."""
    rows = ["| file | killed | timed out | survived | not reached | score |", "|---|---|---|---|---|---|"]
    counts: dict[str, dict[str, int]] = {}
    for status, names in by_status.items():
        for name in names:
            per_file = counts.setdefault(source_file(name), {})
            per_file[status] = per_file.get(status, 0) + 1
    for path, c in sorted(counts.items()):
        killed, timeouts, survived = c.get("killed", 0), c.get("timeout", 0), c.get("survived", 0)
        tested = killed + timeouts + survived
        score = 100.0 * (killed + timeouts) / tested if tested else float("nan")
        rows.append(f"| {path} | {killed} | {timeouts} | {survived} | {c.get('no tests', 0)} | {score:.1f}% |")
    return rows


def report(workdir: Path, out: Path) -> str:
    by_status = results(workdir)
    killed = len(by_status.get("killed", []))
    survived = by_status.get("survived", [])
    timeouts = len(by_status.get("timeout", []))
    untested = len(by_status.get("no tests", []))
    tested = killed + len(survived) + timeouts
    score = 100.0 * (killed + timeouts) / tested if tested else float("nan")
    lines = [
        "# Mutation testing",
        "",
        f"score {score:.1f}%: {killed} killed, {timeouts} timed out, {len(survived)} survived "
        f"({untested} mutants in code no selected test reaches are not counted)",
        "",
        *scores(by_status),
        "",
    ]
    for name in survived:
        lines += [f"## {name}", "", "```diff", diff(workdir, name), "```", ""]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="files to mutate (default: setup.cfg's [mutmut] only_mutate)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/mutation/checkout"))
    parser.add_argument("--out", type=Path, default=Path("runs/mutation"))
    parser.add_argument("--max-children", type=int, default=1, help="mutants run in parallel")
    parser.add_argument("--report-only", action="store_true", help="only rewrite mutation.md from the last run")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    if not args.report_only:
        copy_checkout(workdir, args.only)
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
            cwd=workdir,
            check=False,
            env=ONE_THREAD,
        )
    print(report(workdir, args.out.resolve()).splitlines()[2])


if __name__ == "__main__":
    main()
