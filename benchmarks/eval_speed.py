"""How fast is the importance-sampled log-likelihood: against the decoder's matrix-multiply floor, and against
another revision.

The protocol of the literature (Burda et al. 2016): log p(x) ≈ log (1/K) Σ_k w_k
with K = 5000 draws z_k ~ q(z|x) for each of the 10,000 MNIST test images, on
the IWAE paper's network 784-200-200-50 (tanh). ``pyro_vae.evaluation.bounds.evaluate``
runs the VAE's Pyro model and guide on passes of (particle, example) pairs and
takes every density from the parts' own distributions.

``--run RUN_DIR`` times a trained run's model (its best checkpoint) on its own
test split instead, e.g. a VampPrior, whose prior density is the larger cost.

Two comparisons, each side by side in interleaved rounds so the ratio holds on a
shared machine whatever its load:

- the floor: the decoder's matrix multiplies alone, 2·(50·200 + 200·200 + 200·784)
  FLOPs per draw, on the same number of draws in the pass shape evaluate() uses;
- ``--against REV``: the same evaluation by the package at git revision REV
  (checked out into a temporary folder), each side in its own process per round.

    PYRO_VAE_DATA=../shared/data python benchmarks/eval_speed.py --num-samples 5000 --examples 40
    PYRO_VAE_DATA=../shared/data python benchmarks/eval_speed.py --against f8fd223 --examples 40 --rounds 5
    PYRO_VAE_DATA=../shared/data python benchmarks/eval_speed.py --examples 0      # all 10,000 images, once
    PYRO_VAE_DATA=../shared/data python benchmarks/eval_speed.py --run runs/binarized-mnist-vamp-paper-… --against REV
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch

REPOSITORY = Path(__file__).resolve().parents[1]


def model_and_data(data_root: str | None, run: str | None = None):
    """The mnist spec's network at its initialization and the test split, or the trained model of ``run`` and its
    test split, through the public API (any revision)."""
    import pyro_vae

    if run:
        _, vae, data = pyro_vae.load_run(run)
        return vae.eval(), data.test
    spec = pyro_vae.load_spec("mnist", [f"data.root={data_root}"] if data_root else [])
    data = pyro_vae.load_dataset(spec.data, spec.train.seed)
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE.from_spec(spec.model, data.data_dim, data.image_shape).eval()
    return vae, data.test


def timed_evaluation(k: int, examples: int, threads: int, data_root: str | None, run: str | None) -> dict:
    """One evaluate() of :func:`model_and_data`'s model on the first ``examples`` test images."""
    from pyro_vae import evaluation

    torch.set_num_threads(threads)
    vae, test = model_and_data(data_root, run)
    subset = test[:examples] if examples else test
    torch.manual_seed(0)
    start = time.perf_counter()
    result = evaluation.evaluate(vae, subset, k)
    return {
        "seconds": time.perf_counter() - start,
        "log_likelihood": result["log_likelihood"],
        "images": subset.shape[0],
    }


def in_process(tree: Path, args) -> dict:
    """:func:`timed_evaluation` in a fresh process importing ``pyro_vae`` from ``tree``."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--num-samples",
        str(args.num_samples),
        "--examples",
        str(args.examples),
        "--threads",
        str(args.threads),
        *(["--run", args.run] if args.run else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def gemm_seconds(vae, rows: int, draws: int) -> float:
    """Time of the decoder's matrix multiplies alone (addmm, no activation) for ``draws`` draws in passes of
    ``rows``."""
    layers = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, layer.in_features) for layer in layers]
    outs = [torch.empty(rows, layer.out_features) for layer in layers]
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(max(1, draws // rows)):
            for layer, x, out in zip(layers, inputs, outs):
                torch.addmm(layer.bias, x, layer.weight.t(), out=out)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=5000, metavar="K")
    parser.add_argument("--examples", type=int, default=40, help="the first N test images (0: all 10,000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", metavar="REV", help="also time the evaluation of git revision REV, side by side")
    parser.add_argument("--data-root", default=os.environ.get("PYRO_VAE_DATA"))
    parser.add_argument("--run", metavar="RUN_DIR", help="time this trained run's model on its test split")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(timed_evaluation(args.num_samples, args.examples, args.threads, args.data_root, args.run)))
        return
    from pyro_vae import evaluation
    from pyro_vae.errors import UserInputError
    from pyro_vae.training.environment import machine

    torch.set_num_threads(args.threads)
    try:
        vae, test = model_and_data(args.data_root, args.run)
    except UserInputError as error:  # a --run that is not a run folder, a missing dataset
        parser.exit(2, f"eval_speed.py: {error}\n")
    subset = test[: args.examples] if args.examples else test
    draws = args.num_samples * subset.shape[0]
    rows = evaluation.rows_per_pass(vae, subset, 512.0, num_samples=args.num_samples)
    print(f"hardware: {machine()}; torch threads {args.threads}; torch {torch.__version__}")
    print(
        f"task: K = {args.num_samples} draws for each of {subset.shape[0]} test images, "
        f"{f'the trained model of {args.run}' if args.run else 'the mnist spec network at its initialization'}; "
        f"passes of {rows} (particle, example) pairs\n",
        flush=True,
    )
    ratios, seconds, floors = [], [], []
    for _ in range(args.rounds):
        torch.manual_seed(0)
        start = time.perf_counter()
        result = evaluation.evaluate(vae, subset, args.num_samples)
        seconds.append(time.perf_counter() - start)
        floors.append(gemm_seconds(vae, rows, draws))
        ratios.append(seconds[-1] / floors[-1])
    print(
        f"evaluate(): {statistics.median(seconds):.2f} s [{min(seconds):.2f}–{max(seconds):.2f}] "
        f"({statistics.median(seconds) / draws * 1e6:.2f} µs per draw), log-likelihood "
        f"{result['log_likelihood']:.3f} nats; against the decoder's GEMMs alone "
        f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}–{max(ratios):.2f}] (median [min–max] of "
        f"{args.rounds} rounds)",
        flush=True,
    )
    if not args.against:
        return
    with tempfile.TemporaryDirectory() as folder:
        other = Path(folder) / "tree"
        subprocess.run(
            ["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", str(other), args.against],
            check=True,
            capture_output=True,
        )
        try:
            pairs = []
            for _ in range(args.rounds):
                now, then = in_process(REPOSITORY, args), in_process(other, args)
                pairs.append((now["seconds"], then["seconds"]))
            ratio = [a / b for a, b in pairs]
            print(
                f"against {args.against}: this tree {statistics.median(a for a, _ in pairs):.2f} s, "
                f"{args.against} {statistics.median(b for _, b in pairs):.2f} s; ratio "
                f"{statistics.median(ratio):.2f} [{min(ratio):.2f}–{max(ratio):.2f}] (median [min–max] of "
                f"{args.rounds} interleaved rounds, each in its own process); log-likelihood "
                f"{now['log_likelihood']:.3f} vs {then['log_likelihood']:.3f} nats"
            )
        finally:
            subprocess.run(
                ["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(other)], capture_output=True
            )


if __name__ == "__main__":
    main()
