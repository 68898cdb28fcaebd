"""How fast is the importance-sampled log-likelihood, against this machine's matrix-multiply floor?

The protocol of the literature (Burda et al. 2016): log p(x) ≈ log (1/K) Σ_k w_k
with K = 5000 draws z_k ~ q(z|x) for each of the 10,000 MNIST test images, on
the IWAE paper's network 784-200-200-50 (tanh). ``pyro_vae.evaluation.evaluate``
vectorizes the K draws, processes examples in chunks whose largest tensor stays
under ``--memory-mb``, and computes the Bernoulli log-likelihood with
``pyro_vae.fast_likelihood`` (one sigmoid and a product per logit group
instead of an exp and a log1p per logit).

The floor: the decoder's matrix multiplies, 2·(50·200 + 200·200 + 200·784)
FLOPs per draw, at the GEMM rate measured here, now, with the same threads
(a 4096² float32 matmul, and the decoder's own shapes: addmm over a whole
chunk of draws or over the cache-sized blocks evaluate() runs, whichever is
faster, so the floor is the fastest these multiplies go). Reported: seconds,
µs per draw, and the ratio to the floor; also the plain path (the likelihood's
own ``log_prob``) on a subset, for comparison, and the NLL difference of the two.

    PYRO_VAE_DATA=../shared/data python benchmarks/eval_speed.py              # K = 1000 and 5000, all 10,000
    python benchmarks/eval_speed.py --num-samples 5000 --examples 1000        # a subset (says so)
    python benchmarks/eval_speed.py --run runs/mnist-...                      # a trained run's model
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import evaluation, fast_likelihood
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE
from pyro_vae.spec import load_spec
from machine import cpu_name


def gemm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best-of float32 GFLOP/s of an (m×k)·(k×n) product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def decoder_linears(vae: VAE) -> list[torch.nn.Linear]:
    return [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]


def decoder_gemm_seconds(vae: VAE, rows: int, repeats: int = 3) -> float:
    """Time of the decoder's matrix multiplies alone (addmm, no activation) on ``rows`` draws."""
    layers = decoder_linears(vae)
    inputs = [torch.randn(rows, layer.in_features) for layer in layers]
    outs = [torch.empty(rows, layer.out_features) for layer in layers]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for layer, x, out in zip(layers, inputs, outs):
                torch.addmm(layer.bias, x, layer.weight.t(), out=out)
            best = min(best, time.perf_counter() - start)
    return best


def floor_per_draw(vae: VAE, chunk_rows: int, block_rows: int, repeats: int) -> float:
    """Seconds per draw of the decoder's GEMMs in the faster of the two shapes evaluate() could use:
    one product over a whole chunk, or the cache-sized blocks it runs."""
    return min(decoder_gemm_seconds(vae, rows, repeats) / rows for rows in (chunk_rows, block_rows))


def block_rows(k: int, chunk: int) -> int:
    """The rows of one decoder block of evaluate() (``fast_likelihood.decoded_log_prob``) at K = k."""
    return min(k, max(1, fast_likelihood.CPU_BLOCK_ROWS // chunk)) * chunk


def model_and_data(args):
    if args.run:
        from pyro_vae.training import load_run

        spec, vae, data = load_run(Path(args.run))
        return vae, data.test, f"trained run {args.run}"
    spec = load_spec("mnist", [f"data.root={args.data_root}"] if args.data_root else [])
    data = load_dataset(spec.data, spec.train.seed)
    pyro.set_rng_seed(0)
    vae = VAE.from_spec(spec.model, data.data_dim, data.image_shape).eval()
    return vae, data.test, "the mnist spec's network at its initialization (timing does not depend on the weights)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--examples", type=int, help="evaluate only the first N test images (default: all)")
    parser.add_argument("--plain-examples", type=int, default=200,
                        help="test images for the plain-path comparison (0: skip)")
    parser.add_argument("--ratio-rounds", type=int, default=7,
                        help="interleaved rounds of evaluate() vs the bare decoder GEMMs on a subset (0: skip)")
    parser.add_argument("--ratio-examples", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-mb", type=float, default=512.0)
    parser.add_argument("--run", help="a trained run folder (default: the mnist spec's network, initialized)")
    parser.add_argument("--data-root", default=os.environ.get("PYRO_VAE_DATA"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae, test, what = model_and_data(args)
    if args.examples:
        test = test[:args.examples]
    layers = decoder_linears(vae)
    flops_per_draw = sum(2 * layer.in_features * layer.out_features for layer in layers)
    print(f"hardware: {cpu_name()}, {os.cpu_count()} CPUs visible; torch threads {torch.get_num_threads()}; "
          f"torch {torch.__version__}")
    print(f"model: {what}; decoder {'-'.join([str(layers[0].in_features)] + [str(l.out_features) for l in layers])}, "
          f"{flops_per_draw / 1e6:.3f} MFLOP per draw")
    print(f"data: {test.shape[0]} test images; memory bound --memory-mb {args.memory_mb:g} "
          f"(largest tensor K x chunk x (D + 1024) floats x 3)\n", flush=True)

    rows = []
    for k in args.num_samples:
        chunk = evaluation.chunk_size(k, test.shape[1], 1024, args.memory_mb)
        before = gemm_rate(4096, 4096, 4096, 3)
        shaped = floor_per_draw(vae, k * chunk, block_rows(k, chunk), 3)
        torch.manual_seed(0)
        start = time.perf_counter()
        result = evaluation.evaluate(vae, test, k, memory_mb=args.memory_mb)
        seconds = time.perf_counter() - start
        after = gemm_rate(4096, 4096, 4096, 3)
        draws = k * test.shape[0]
        rate = max(before, after)
        floor = draws * flops_per_draw / (rate * 1e9)
        shaped_floor = shaped * draws
        rows.append((k, test.shape[0], chunk, seconds, draws, rate, floor, shaped_floor, result))
        print(f"K={k}: {seconds:.1f} s for {test.shape[0]} images ({seconds / draws * 1e6:.2f} µs per draw); "
              f"GEMM {before:.0f}/{after:.0f} GFLOP/s before/after; floor {floor:.1f} s (4096² rate), "
              f"{shaped_floor:.1f} s (decoder-shaped GEMMs); log-likelihood {result['log_likelihood']:.3f} "
              f"± {result['log_likelihood_stderr']:.3f} nats", flush=True)

    if args.ratio_rounds:
        # side by side (the README's speed section): evaluate() on a subset against the bare decoder GEMMs of the same
        # number of draws, interleaved, so the ratio holds on a shared machine whatever its load
        k = args.num_samples[-1]
        subset = test[:args.ratio_examples]
        draws = k * subset.shape[0]
        chunk = evaluation.chunk_size(k, test.shape[1], 1024, args.memory_mb)
        ratios, evals, floors = [], [], []
        for _ in range(args.ratio_rounds):
            torch.manual_seed(0)
            start = time.perf_counter()
            evaluation.evaluate(vae, subset, k, memory_mb=args.memory_mb)
            evals.append(time.perf_counter() - start)
            floors.append(floor_per_draw(vae, k * chunk, block_rows(k, chunk), 1) * draws)
            ratios.append(evals[-1] / floors[-1])
        print(f"\nside by side, K={k}, {subset.shape[0]} images, {args.ratio_rounds} interleaved rounds: evaluate() "
              f"{statistics.median(evals):.2f} s vs the decoder's GEMMs alone {statistics.median(floors):.2f} s; "
              f"ratio {statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}] (median [min–max])")

    if args.plain_examples:
        k = args.num_samples[0]
        subset = test[:args.plain_examples]
        timings = {}
        for name in ("fast", "plain"):
            torch.manual_seed(0)
            start = time.perf_counter()
            timings[name] = (evaluation.evaluate(vae, subset, k, memory_mb=args.memory_mb, fast=name == "fast"),
                             time.perf_counter() - start)
        (fast, t_fast), (plain, t_plain) = timings["fast"], timings["plain"]
        print(f"\nplain path (the decoder, then Bernoulli log_prob through binary_cross_entropy_with_logits), K={k}, "
              f"{subset.shape[0]} images: {t_plain:.1f} s vs fast {t_fast:.1f} s ({t_plain / t_fast:.2f}x); "
              f"NLL difference {abs(fast['log_likelihood'] - plain['log_likelihood']):.2e} nats (same draws)")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this benchmark process (data, libraries and the GEMM probes included): "
          f"{peak:.0f} MB\n")
    print("| K | images | chunk | seconds | µs per draw | GEMM GFLOP/s | floor s (4096²) | floor s (decoder shapes) "
          "| seconds / floor | log-likelihood (nats) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for k, n, chunk, seconds, draws, rate, floor, shaped_floor, result in rows:
        print(f"| {k} | {n} | {chunk} | {seconds:.1f} | {seconds / draws * 1e6:.2f} | {rate:.0f} | {floor:.1f} "
              f"| {shaped_floor:.1f} | {seconds / floor:.2f} | {result['log_likelihood']:.3f} ± "
              f"{result['log_likelihood_stderr']:.3f} |")


if __name__ == "__main__":
    main()
