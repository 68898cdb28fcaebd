"""Train the paper-protocol specs under a stated budget and set them beside the published numbers.

    PYRO_VAE_DATA=../shared/data python benchmarks/reproduce.py --max-epochs 100
    PYRO_VAE_DATA=../shared/data python benchmarks/reproduce.py --only binarized-mnist-standard-paper --max-epochs 50

Each spec names its paper and published test NLL in its description. ``--max-epochs N``
truncates a spec's training (its schedule runs as written for the first N epochs; the
table says so). A run folder that already holds a run of the same spec is resumed,
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
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name

from pyro_vae.config.spec import load_spec
from pyro_vae.evaluation import table
from pyro_vae.training import resume, train
from pyro_vae.training.run import CHECKPOINT, LOG, Run

PUBLISHED = {  # test NLL in nats, as the specs' descriptions cite them
    "mnist-iwae-paper": ("Burda et al. 2016, VAE k = 1", 86.76),
    "mnist-iwae-paper-k50": ("Burda et al. 2016, IWAE k = 50", 84.78),
    "binarized-mnist-standard-paper": ("Tomczak & Welling 2018, standard prior", 88.56),
    "binarized-mnist-vamp-paper": ("Tomczak & Welling 2018, VampPrior", 85.57),
}


def run_spec(name: str, max_epochs: int, out: Path, num_samples: int) -> dict:
    """Train (or continue) one spec to ``max_epochs`` epochs, score it, return its row."""
    spec = load_spec(name)
    full = spec.train.epochs
    epochs = min(full, max_epochs)
    run_dir = out / name
    if (run_dir / CHECKPOINT).exists():
        resume(run_dir, epochs, show_progress=False)
    else:
        train(load_spec(name, [f"train.epochs={epochs}"]), run_dir, force=True, show_progress=False)
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
        "machine": f"{cpu_name()}, {torch.get_num_threads()} thread(s)",
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
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    args = parser.parse_args()
    if args.max_epochs < 1:
        print("reproduce: --max-epochs must be a positive integer", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        started = time.perf_counter()
        row = run_spec(name, args.max_epochs, args.out, args.num_samples)
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
