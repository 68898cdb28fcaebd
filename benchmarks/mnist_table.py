"""Train every packaged MNIST spec under one budget and write a Markdown results table.

Every row gets the same epochs, batch size, seed and binarization (the packaged
specs all use dynamic binarization, batch 100, seed 0); only the parts differ.
Columns: test ELBO, importance-sampled log-likelihood with K samples, active
units, seconds per training epoch. Each run folder is kept under --out.

    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30
    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30 --only mnist-mog   # rerun one row

Rows may run in separate processes at once (``--only``, same ``--out``): each
appends to ``rows.jsonl`` and rewrites ``mnist_table.md`` from the newest row
of every spec trained for the same number of epochs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pyro_vae import evaluation
from pyro_vae.spec import load_spec, packaged_configs
from pyro_vae.training import load_run, seed_everything, train
from machine import cpu_name

SPECS = ["mnist", "mnist-mog", "mnist-vamp", "mnist-iaf", "mnist-flow-prior", "mnist-conv"]


def run_row(name: str, epochs: int, num_samples: int, out: Path, device: str) -> dict:
    spec = load_spec(name, [f"train.epochs={epochs}", f"train.device={device}"])
    run_dir = out / name
    started = time.perf_counter()
    trainer = train(spec, run_dir, force=True)
    train_seconds = time.perf_counter() - started
    _, vae, data = load_run(run_dir)
    seed_everything(0)
    started = time.perf_counter()
    result = evaluation.evaluate(vae, data.test, num_samples)
    eval_seconds = time.perf_counter() - started
    metrics = trainer.progress.metrics
    return {
        "spec": name,
        "epochs": epochs,
        "threads": torch.get_num_threads(),
        "test_elbo": metrics[-1]["test_elbo"],
        "log_likelihood": result["log_likelihood"],
        "log_likelihood_stderr": result["log_likelihood_stderr"],
        "active_units": evaluation.active_units(vae, data.test),
        "latent_dim": spec.model.latent_dim,
        "seconds_per_epoch": statistics.mean(m["seconds"] for m in metrics),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "description": packaged_configs()[name].read_text().splitlines()[0].lstrip("# "),
    }


def latest_rows(rows_path: Path, epochs: int) -> list[dict]:
    """The newest row of each spec trained for ``epochs`` epochs, in table order.

    Rows accumulate in one file, so rows run by separate processes (or rerun
    alone with ``--only``) end up in one table.
    """
    latest = {}
    for line in rows_path.read_text().splitlines():
        row = json.loads(line)
        if row["epochs"] == epochs:
            latest[row["spec"]] = row
    return [latest[name] for name in SPECS if name in latest]


def markdown(rows: list[dict], epochs: int, num_samples: int, device: str) -> str:
    lines = [
        f"Budget: {epochs} epochs, batch 100, seed 0, dynamic binarization, Adam lr 1e-3, estimator `meanfield`; "
        f"test set binarized once (seed 0); log-likelihood by importance sampling with K = {num_samples} "
        f"(± one standard error over the 10,000 test images). Machine: {cpu_name()}, "
        f"{'/'.join(sorted({str(r['threads']) for r in rows}))} torch thread(s) per run, device {device}; torch {torch.__version__}.",
        "",
        "| spec | test ELBO (nats) | log-likelihood (nats) | active units | s / epoch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| `{r['spec']}` | {r['test_elbo']:.2f} | {r['log_likelihood']:.2f} ± {r['log_likelihood_stderr']:.2f} "
                     f"| {r['active_units']} / {r['latent_dim']} | {r['seconds_per_epoch']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=SPECS, choices=SPECS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/mnist_table"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        row = run_row(name, args.epochs, args.num_samples, args.out, args.device)
        print(json.dumps(row), flush=True)
        with (args.out / "rows.jsonl").open("a") as rows_file:
            rows_file.write(json.dumps(row) + "\n")
        table = markdown(latest_rows(args.out / "rows.jsonl", args.epochs), args.epochs, args.num_samples, args.device)
        (args.out / "mnist_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
