"""Runs killed with SIGKILL at random moments and resumed end bit-identical to an uninterrupted run.

One uninterrupted reference run (``python -m pyro_vae train``) of a small digits
spec is timed: process start, the moment its run folder appears (just before
training: data and model are checked first), its last checkpoint, its end. Then
each trial starts the same command and SIGKILLs it at a random moment: a third
of the kills uniform over the whole process lifetime (imports, checks, training,
pictures), two thirds uniform over the training window from the run folder's
appearance to the last checkpoint. A trial sometimes kills the resumed process
once more, and finally lets ``train --resume RUN`` (or the original command
again, if the kill came before the run folder existed) finish.
A trial passes when, against the reference,

- the checkpoint's parameters, Adam state, generator states, epoch and step are
  bit-identical (``torch.equal``), and the metrics are equal except wall-clock
  seconds;
- ``pyro-vae evaluate RUN --seed 7`` prints exactly the same JSON.

All processes run on the CPU with ``OMP_NUM_THREADS=1``.

    python benchmarks/kill_resume.py --trials 20

prints one line per trial and a summary; exits 1 if any trial differs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pyro_vae.training import checkpoint

SPEC = [
    "data.train_size=512",
    "data.test_size=64",
    "data.batch_size=16",
    "model.encoder.hidden=[32]",
    "model.decoder.hidden=[32]",
    "train.epochs=8",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(run: Path) -> list[str]:
    overrides = [item for override in SPEC for item in ("--set", override)]
    return [sys.executable, "-m", "pyro_vae", "train", *overrides, "--out", str(run), "--no-progress"]


def resume_command(run: Path) -> list[str]:
    return [sys.executable, "-m", "pyro_vae", "train", "--resume", str(run), "--no-progress"]


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def next_command(run: Path) -> list[str]:
    """Resume when the run folder holds a spec; otherwise the kill came first: the same command again."""
    return resume_command(run) if (run / "config.yaml").exists() else train_command(run)


def timeline(run: Path) -> tuple[float, float, float]:
    """Run the reference to its end: seconds until its run folder appeared, until its last checkpoint, in all."""
    began = time.perf_counter()
    process = start(train_command(run))
    appeared, written, inodes = None, None, set()
    while process.poll() is None:
        if appeared is None and (run / "config.yaml").exists():
            appeared = time.perf_counter() - began
        try:
            inode = os.stat(run / "checkpoint.pt").st_ino  # each atomic write is a new inode
        except FileNotFoundError:
            inode = None
        if inode is not None and inode not in inodes:
            inodes.add(inode)
            written = time.perf_counter() - began
        time.sleep(0.002)
    if process.returncode != 0:
        raise SystemExit(f"reference run failed: {process.stderr.read()}")
    return appeared, written, time.perf_counter() - began


def kill_at(command: list[str], run: Path, delay: float, after_folder: bool) -> tuple[str, str]:
    """Start ``command``, SIGKILL it ``delay`` s after its start (or after the run folder appears).

    Returns where the kill landed, as a category and in detail.
    """
    process = start(command)
    began = time.perf_counter()
    if after_folder:
        while not (run / "config.yaml").exists() and process.poll() is None:
            time.sleep(0.002)
        began = time.perf_counter()
    while process.poll() is None and time.perf_counter() - began < delay:
        time.sleep(0.002)
    if process.poll() is not None:
        return "not killed (finished first)", "finished before the kill"
    process.kill()
    process.wait()
    if not (run / "config.yaml").exists():
        return "before the run folder", "killed before the run folder existed"
    if not (run / "checkpoint.pt").exists():
        return "before the first checkpoint", "killed before the first checkpoint"
    state = checkpoint.load(run / "checkpoint.pt")
    leftovers = sorted(p.name for p in run.glob(".*.tmp"))
    detail = f"killed after epoch {state['epoch']} step {state['step_in_epoch']} was saved" + (
        f" (left {', '.join(leftovers)})" if leftovers else ""
    )
    epochs = int(SPEC[-1].split("=")[1])
    return ("during training" if state["epoch"] < epochs else "after training (pictures)"), detail


def evaluate(run: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "evaluate", str(run), "--num-samples", "16", "--seed", "7"],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    )
    return json.loads(done.stdout)


def differences(run: Path, reference: Path) -> list[str]:
    """What differs from the reference (empty: bit-identical)."""
    a, b = checkpoint.load(run / "checkpoint.pt"), checkpoint.load(reference / "checkpoint.pt")
    found = [key for key in ("epoch", "step_in_epoch", "global_step") if a[key] != b[key]]
    found += [f"model.{name}" for name in b["model"] if not torch.equal(a["model"][name], b["model"][name])]
    found += [
        f"optimizer.{p}.{k}"
        for p, moments in b["optimizer"]["state"].items()
        for k, value in moments.items()
        if not torch.equal(a["optimizer"]["state"][p][k], value)
    ]
    if not torch.equal(a["rng"]["torch"], b["rng"]["torch"]) or a["rng"]["numpy"] != b["rng"]["numpy"]:
        found.append("rng")

    def strip(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    if strip(a["metrics"]) != strip(b["metrics"]):
        found.append("metrics")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        reference = Path(tmp) / "reference"
        folder_at, trained_at, lifetime = timeline(reference)
        expected = evaluate(reference)
        print(
            f"reference: {' '.join(SPEC)}; run folder after {folder_at:.1f} s, last checkpoint after "
            f"{trained_at:.1f} s, done after {lifetime:.1f} s"
        )
        identical, landed = 0, collections.Counter()
        for trial in range(args.trials):
            rng = random.Random(args.seed * 1_000_003 + trial)
            run = Path(tmp) / f"trial-{trial:02d}"
            events = []
            for _kill in range(rng.choice([1, 1, 2])):
                after_folder = rng.random() < 2 / 3
                window = trained_at - folder_at if after_folder else lifetime
                delay = rng.uniform(0, window)
                category, detail = kill_at(next_command(run), run, delay, after_folder)
                landed[category] += 1
                events.append(f"{delay:.2f} s after {'the folder' if after_folder else 'start'}: {detail}")
            final = subprocess.run(next_command(run), capture_output=True, text=True, env=ENV)
            found = differences(run, reference) if final.returncode == 0 else [f"exit {final.returncode}"]
            same_evaluation = final.returncode == 0 and evaluate(run) == expected
            if not same_evaluation:
                found.append("evaluate")
            identical += not found
            print(
                f"trial {trial:2d}: {'identical' if not found else 'DIFFERS: ' + ', '.join(found)}; "
                + "; ".join(events)
            )
    print(
        f"{identical}/{args.trials} killed-and-resumed runs bit-identical to the uninterrupted run "
        f"(parameters, Adam state, generators, metrics, evaluate --seed 7) in {time.perf_counter() - began:.0f} s"
    )
    print("kills landed: " + ", ".join(f"{category} {count}" for category, count in landed.most_common()))
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
