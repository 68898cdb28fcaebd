"""Train the paper-protocol specs under a stated budget and set them beside the published numbers.

    PYRO_VAE_DATA=../shared/data python benchmarks/reproduce.py --max-epochs 100
    PYRO_VAE_DATA=../shared/data python benchmarks/reproduce.py --only binarized-mnist-standard-paper --max-epochs 50
    PYRO_VAE_DATA=../shared/data python benchmarks/reproduce.py --only mnist-iwae-paper-2layer --max-epochs 3280 \
        --train-minutes 4 --device cuda

Each spec names its paper and published test NLL in its description. ``--max-epochs N``
truncates a spec's training (its schedule runs as written for the first N epochs; the
table says so); ``--train-minutes M`` also stops it after M minutes of wall clock (the
training command gets SIGTERM and checkpoints the step it reached; the table counts the
epochs completed). Training runs as ``python -m pyro_vae train`` in a child process, on
``--device``. A run folder that already holds a run of the same spec is resumed,
so a larger ``--max-epochs`` continues where a smaller one stopped. Evaluation is the
papers': the importance-sampled log-likelihood with K = 5000 draws per test image
(``--num-samples``), from the best-validation checkpoint where the spec has a
validation split. Writes ``reproduce.md`` and ``reproduce.csv`` under ``--out``; rows
run in separate processes with the same ``--out`` end up in one table.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name

from pyro_vae import threads
from pyro_vae.config.spec import load_spec
from pyro_vae.evaluation import table
from pyro_vae.training.run import CHECKPOINT, LOG, Run

PUBLISHED = {  # test NLL in nats, as the specs' descriptions cite them
    "mnist-iwae-paper": ("Burda et al. 2016, VAE k = 1", 86.76),
    "mnist-iwae-paper-k50": ("Burda et al. 2016, IWAE k = 50", 84.78),
    "binarized-mnist-standard-paper": ("Tomczak & Welling 2018, standard prior", 88.56),
    "binarized-mnist-vamp-paper": ("Tomczak & Welling 2018, VampPrior", 85.57),
    "mnist-iwae-paper-2layer": ("Burda et al. 2016, two-layer VAE k = 1", 85.33),
    "mnist-iwae-paper-2layer-k50": ("Burda et al. 2016, two-layer IWAE k = 50", 82.90),
    "binarized-mnist-hvae-vamp-paper": ("Tomczak & Welling 2018, HVAE + VampPrior", 83.19),
}


def train_for(name: str, run_dir: Path, epochs: int, device: str, minutes: float | None) -> None:
    """Train ``name`` in ``run_dir`` on ``device`` (or continue it, on the device its saved spec names) to ``epochs``
    epochs in a child process, sent SIGTERM after ``minutes`` (None: no limit); it then checkpoints the step it
    reached and exits with 128 + SIGTERM."""
    if (run_dir / CHECKPOINT).exists():  # a resumed run keeps its saved spec, device included
        command = ["train", "--resume", str(run_dir)]
    else:
        command = ["train", "--config", name, "--out", str(run_dir), "--force", "--device", device]
    child = subprocess.Popen([sys.executable, "-m", "pyro_vae", *command, "--epochs", str(epochs), "--quiet"])
    try:
        status = child.wait(timeout=None if minutes is None else 60 * minutes)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGTERM)
        status = child.wait()
        if status == 128 + signal.SIGTERM:
            return
    if status != 0:
        raise SystemExit(f"reproduce: training {name} exited with status {status}")


def machine(device: str, spec_threads: int | str) -> str:
    """The accelerator's name on a GPU, else the processor and the thread count training used."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, {threads.resolve(spec_threads)} thread(s)"


def run_spec(name: str, max_epochs: int, out: Path, num_samples: int, device: str, minutes: float | None) -> dict:
    """Train (or continue) one spec to ``max_epochs`` epochs (or ``minutes``), score it, return its row."""
    spec = load_spec(name)
    full = spec.train.epochs
    run_dir = out / name
    train_for(name, run_dir, min(full, max_epochs), device, minutes)
    metrics = Run(run_dir).read_metrics()
    row = table.score_run(run_dir, num_samples)
    source, published = PUBLISHED[name]
    stopped = any("early stopping" in line for line in (run_dir / LOG).read_text().splitlines())
    return {
        "spec": name,
        "source": source,
        "published_nll": published,
        "nll": -row["log_likelihood"],
        "nll_stderr": row["log_likelihood_stderr"],
        "gap": -row["log_likelihood"] - published,
        "epochs_run": len(metrics),
        "epochs_protocol": full,
        "truncated": len(metrics) < full and not stopped,
        "checkpoint": f"{row['checkpoint']} (epoch {row['epoch']})",
        "train_hours": sum(m["seconds"] for m in metrics) / 3600,
        "eval_seconds": row["eval_seconds"],
        "num_samples": num_samples,
        "machine": machine(device, spec.train.threads),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| spec | paper | published NLL | pyro_vae NLL | gap | epochs run / protocol | checkpoint "
        "| training time | machine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        budget = f"{r['epochs_run']} / {r['epochs_protocol']}" + (" (truncated)" if r["truncated"] else "")
        lines.append(
            f"| `{r['spec']}` | {r['source']} | {r['published_nll']:.2f} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} "
            f"| {r['gap']:+.2f} | {budget} | {r['checkpoint']} | {r['train_hours']:.2f} h | {r['machine']} |"
        )
    k = rows[0]["num_samples"] if rows else 0
    return (
        f"Test NLL in nats (lower is better), importance sampling with K = {k} draws per test image, "
        f"± one standard error over the images.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--max-epochs", type=int, required=True, help="training budget per spec (truncates)")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--train-minutes", type=float, help="wall-clock training budget per spec (truncates)")
    parser.add_argument("--device", default="cpu", help="train.device of the runs (cpu, cuda, cuda:N)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    args = parser.parse_args()
    if args.max_epochs < 1:
        print("reproduce: --max-epochs must be a positive integer", file=sys.stderr)
        sys.exit(2)
    if args.train_minutes is not None and not args.train_minutes > 0:
        print("reproduce: --train-minutes must be a positive number", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        started = time.perf_counter()
        row = run_spec(name, args.max_epochs, args.out, args.num_samples, args.device, args.train_minutes)
        row["wall_seconds"] = time.perf_counter() - started
        print(json.dumps(row), flush=True)
        with (args.out / "rows.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    latest = {}
    for line in (args.out / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest[row["spec"]] = row
    rows = [latest[name] for name in PUBLISHED if name in latest]
    (args.out / "reproduce.md").write_text(markdown(rows))
    with open(args.out / "reproduce.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
