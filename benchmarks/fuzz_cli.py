"""Mutated specs through the real ``pyro-vae train`` command: a valid run or exit 2 with one line, never a traceback.

Each case takes the tiny valid spec of ``tests/spec/test_fuzz_spec.py``, applies one
to three random mutations from the same pools (a key set to a valid, odd or wrong
value; a part swapped for another registered one; a key deleted; an unknown key
added), writes it to a YAML file and runs ``python -m pyro_vae train --config
FILE`` in its own process with ``OMP_NUM_THREADS=1`` and an empty data root (so
MNIST-family names fail fast with exit 2). Every case is classified as

- ``ran``: exit 0 and a finished run folder;
- ``exit 2, one line``: exit 2 and exactly one line on stderr;
- ``exit 3, NaN guard``: the non-finite guard stopped training, its message last;
- anything else is a failure: a traceback, exit 2 with more or fewer lines, another
  exit status, or a time-out.

    python benchmarks/fuzz_cli.py --cases 200 --jobs 2

prints one line per failure and a summary; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS / "spec"), str(TESTS)]
from test_fuzz_spec import ALTERNATIVES, BASE, PATHS, SECTIONS, VALUES, apply  # noqa: E402


def random_operations(rng: random.Random) -> list[tuple]:
    """One to three mutations, drawn like the hypothesis strategy in tests/spec/test_fuzz_spec.py."""
    operations = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["set", "swap", "swap", "delete", "add"])
        if kind == "set":
            operations.append(("set", rng.choice(PATHS), rng.choice(VALUES)))
        elif kind == "swap":
            path = rng.choice(sorted(ALTERNATIVES))
            operations.append(("set", path, rng.choice(ALTERNATIVES[path])))
        elif kind == "delete":
            operations.append(("delete", rng.choice(PATHS)))
        else:
            operations.append(("add", rng.choice(SECTIONS), rng.choice(["bogus", "Type", 7]), rng.choice(VALUES)))
    return operations


def classify(rc: int | None, stderr: str, run: Path) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if rc is None:
        return "timed out"
    if "Traceback" in stderr:
        return "traceback"
    if rc == 0:
        return "ran" if (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").exists() else "exit 0, no run"
    if rc == 2:
        return (
            "exit 2, one line"
            if len(lines) == 1 and lines[0].startswith("pyro-vae: error: ")
            else f"exit 2, {len(lines)} lines"
        )
    if rc == 3 and lines and "training stopped, the last good checkpoint is kept" in lines[-1]:
        return "exit 3, NaN guard"
    return f"exit {rc}"


def run_case(index: int, seed: int, folder: Path, timeout: float, env: dict) -> tuple[int, str, list, str]:
    operations = random_operations(random.Random(seed * 1_000_003 + index))
    case = folder / f"case-{index:03d}"
    case.mkdir()
    spec_file, run = case / "spec.yaml", case / "run"
    spec_file.write_text(yaml.safe_dump(apply(BASE, operations)))
    command = [
        sys.executable,
        "-m",
        "pyro_vae",
        "train",
        "--config",
        str(spec_file),
        "--out",
        str(run),
        "--no-progress",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        rc, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    return index, classify(rc, stderr, run), operations, stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="cases run at the same time")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    args = parser.parse_args()
    ok = {"ran", "exit 2, one line", "exit 3, NaN guard"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-cli-") as tmp:
        folder = Path(tmp)
        (folder / "no-data").mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYRO_VAE_DATA": str(folder / "no-data")}
        with ThreadPoolExecutor(args.jobs) as pool:
            results = sorted(pool.map(lambda i: run_case(i, args.seed, folder, args.timeout, env), range(args.cases)))
    counts = collections.Counter(outcome for _, outcome, _, _ in results)
    for index, outcome, operations, stderr in results:
        if outcome not in ok:
            last = [line for line in stderr.splitlines() if line.strip()][-1:] or [""]
            print(f"FAIL case {index}: {outcome}: {operations}: {last[0][:300]}")
    print(
        f"{args.cases} mutated specs through `pyro-vae train` in {time.perf_counter() - start:.0f} s "
        f"(seed {args.seed}, {args.jobs} at a time):"
    )
    for outcome, count in counts.most_common():
        print(f"  {outcome:<20} {count:>4}{'' if outcome in ok else '   <- failure'}")
    failures = sum(count for outcome, count in counts.items() if outcome not in ok)
    print(f"tracebacks: {counts.get('traceback', 0)}; failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
