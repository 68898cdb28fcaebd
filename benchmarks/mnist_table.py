"""Train every packaged MNIST spec under one budget and tabulate them with ``pyro-vae table``.

Every row gets the same epochs, batch size, seed and binarization (the packaged
specs all use dynamic binarization, batch 100, seed 0; ``--seed`` changes the seed of
every row); only the parts differ. The table (``pyro_vae.evaluation.table``) scores each run's
test set with K importance samples and pairs every row with ``mnist`` image by image.

    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30
    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30 --only mnist-mog   # train one row
    PYRO_VAE_DATA=../shared/data python benchmarks/mnist_table.py --epochs 30 --evaluate-only    # tabulate only

Rows may be trained in separate processes at once (``--only``, same ``--out``); the
table is made of every finished run under ``--out`` (scores are cached in each run
folder, so each run is evaluated once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pyro_vae.config.spec import load_spec
from pyro_vae.evaluation import table
from pyro_vae.training import train
from pyro_vae.training.run import Run

SPECS = ["mnist", "mnist-mog", "mnist-vamp", "mnist-iaf", "mnist-flow-prior", "mnist-conv"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every row (use its own --out)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=SPECS, choices=SPECS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/mnist_table"))
    parser.add_argument("--evaluate-only", action="store_true", help="tabulate the finished runs under --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.evaluate_only:
        for name in args.only:
            spec = load_spec(
                name, [f"train.epochs={args.epochs}", f"train.seed={args.seed}", f"train.device={args.device}"]
            )
            train(spec, args.out / name, force=True)
    finished = [args.out / name for name in SPECS if len(Run(args.out / name).read_metrics()) == args.epochs]
    if not finished:
        print(
            f"mnist_table: no run under {args.out} has {args.epochs} trained epochs; train them first "
            f"(drop --evaluate-only)",
            file=sys.stderr,
        )
        sys.exit(2)
    reference = args.out / "mnist" if args.out / "mnist" in finished else None
    rows = table.build_rows(finished, reference, args.num_samples, seed=0)
    table.write_table(rows, reference, args.out)
    print(table.markdown(rows, reference))


if __name__ == "__main__":
    main()
