"""Train every packaged MNIST spec under one budget and write a Markdown results table.

Every row gets the same epochs, batch size, seed and binarization (the packaged
specs all use dynamic binarization, batch 100, seed 0; ``--seed`` changes the seed of
every row); only the parts differ.
Columns: test ELBO, importance-sampled log-likelihood with K samples, active
units, seconds per training epoch. Each run folder is kept under --out.

    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30
    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30 --only mnist-mog   # rerun one row

Rows may run in separate processes at once (``--only``, same ``--out``): each
appends to ``rows.jsonl`` and rewrites ``mnist_table.md`` from the newest row
of every spec trained for the same number of epochs. ``--evaluate-only``
scores the finished runs under ``--out`` again without training them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from pyro_vae import evaluation
from pyro_vae.spec import load_spec, packaged_configs
from pyro_vae.training import load_run, seed_everything, train
from machine import cpu_name

PER_IMAGE = "test_log_likelihood_per_image.pt"
SPECS = ["mnist", "mnist-mog", "mnist-vamp", "mnist-iaf", "mnist-flow-prior", "mnist-conv"]


def run_row(name: str, epochs: int, seed: int, num_samples: int, out: Path, device: str, evaluate_only: bool) -> dict:
    """Train one spec (or, with ``evaluate_only``, take its finished run folder) and evaluate it."""
    spec = load_spec(name, [f"train.epochs={epochs}", f"train.seed={seed}", f"train.device={device}"])
    run_dir = out / name
    if not evaluate_only:
        train(spec, run_dir, force=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    if len(metrics) != epochs:
        print(f"mnist_table: {run_dir} holds {len(metrics)} trained epochs, not {epochs}; "
              f"train it first (drop --evaluate-only)", file=sys.stderr)
        sys.exit(2)
    _, vae, data = load_run(run_dir)
    seed_everything(0)
    started = time.perf_counter()
    result = evaluation.evaluate(vae, data.test, num_samples, per_example=True)
    eval_seconds = time.perf_counter() - started
    torch.save(result["per_example"]["log_likelihood"], run_dir / PER_IMAGE)
    return {
        "spec": name,
        "epochs": epochs,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "test_elbo": metrics[-1]["test_elbo"],
        "log_likelihood": result["log_likelihood"],
        "log_likelihood_stderr": result["log_likelihood_stderr"],
        "active_units": evaluation.active_units(vae, data.test),
        "latent_dim": spec.model.latent_dim,
        "seconds_per_epoch": statistics.mean(m["seconds"] for m in metrics),
        "train_seconds": sum(m["seconds"] for m in metrics),
        "eval_seconds": eval_seconds,
        "description": packaged_configs()[name].read_text().splitlines()[0].lstrip("# "),
    }


def paired_difference(out: Path, name: str, reference: str = "mnist") -> str:
    """Mean over test images of log p(x) under ``name`` minus under ``reference``, ± its standard error.

    Both models are scored on the same images, so the image-to-image spread that
    dominates each row's own standard error cancels in the difference.
    """
    mine, theirs = out / name / PER_IMAGE, out / reference / PER_IMAGE
    if name == reference or not (mine.exists() and theirs.exists()):
        return "—"
    difference = torch.load(mine) - torch.load(theirs)
    return f"{difference.mean():+.2f} ± {difference.std() / math.sqrt(difference.numel()):.2f}"


def latest_rows(rows_path: Path, epochs: int, seed: int) -> list[dict]:
    """The newest row of each spec trained for ``epochs`` epochs from ``seed``, in table order.

    Rows accumulate in one file, so rows run by separate processes (or rerun
    alone with ``--only``) end up in one table.
    """
    latest = {}
    for line in rows_path.read_text().splitlines():
        row = json.loads(line)
        if row["epochs"] == epochs and row.get("seed", 0) == seed:
            latest[row["spec"]] = row
    return [latest[name] for name in SPECS if name in latest]


def markdown(rows: list[dict], epochs: int, seed: int, num_samples: int, device: str, out: Path) -> str:
    lines = [
        f"Budget: {epochs} epochs, batch 100, seed {seed}, dynamic binarization, Adam lr 1e-3, estimator `meanfield`; "
        f"test set binarized once (seed {seed}); log-likelihood by importance sampling with K = {num_samples} "
        f"(± one standard error over the 10,000 test images; the difference to `mnist` is paired image by image). Machine: {cpu_name()}, "
        f"{'/'.join(sorted({str(r['threads']) for r in rows}))} torch thread(s) per run, device {device}; torch {torch.__version__}.",
        "",
        "| spec | test ELBO (nats) | log-likelihood (nats) | vs `mnist` (paired) | active units | s / epoch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| `{r['spec']}` | {r['test_elbo']:.2f} | {r['log_likelihood']:.2f} ± {r['log_likelihood_stderr']:.2f} "
                     f"| {paired_difference(out, r['spec'])} | {r['active_units']} / {r['latent_dim']} | {r['seconds_per_epoch']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every row (use its own --out)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=SPECS, choices=SPECS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/mnist_table"))
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the finished runs under --out again")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        row = run_row(name, args.epochs, args.seed, args.num_samples, args.out, args.device, args.evaluate_only)
        print(json.dumps(row), flush=True)
        with (args.out / "rows.jsonl").open("a") as rows_file:
            rows_file.write(json.dumps(row) + "\n")
        rows = latest_rows(args.out / "rows.jsonl", args.epochs, args.seed)
        table = markdown(rows, args.epochs, args.seed, args.num_samples, args.device, args.out)
        (args.out / "mnist_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
