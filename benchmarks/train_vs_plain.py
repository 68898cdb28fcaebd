"""`pyro-vae train` as a user runs it against a hand-written PyTorch loop, epoch for epoch, in one job.

The project side is the command line itself (a fresh process, no compile
setting unless ``--set inference.compile=…`` is given): MNIST, 784-400-20 ReLU,
batch 128, ``meanfield``, dynamic binarization by default; its per-epoch training
seconds come from the run's metrics.jsonl (the epoch's steps, without the
end-of-epoch test ELBO). The plain side, run right after it in this process at
the same thread count, is the loop people write: ``nn.Sequential`` encoder and
decoder, softplus scale, closed-form KL, Bernoulli log-likelihood,
``torch.optim.Adam()`` with its defaults, a fresh permutation and fresh
binarization draws per epoch. Reported: each side's epochs and the ratio of the
medians over epochs 2 onwards (epoch 1 holds start-up and, for a compiled run,
the compile).

    PYRO_VAE_DATA=../shared/data python benchmarks/train_vs_plain.py
    PYRO_VAE_DATA=../shared/data python benchmarks/train_vs_plain.py --rounds 2 --set inference.compile=true
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name
from torch import nn

NETWORK = [
    "data.name=mnist",
    "data.batch_size=128",
    "model.latent_dim=20",
    "model.encoder.hidden=[400]",
    "model.decoder.hidden=[400]",
    "model.encoder.activation=relu",
    "model.decoder.activation=relu",
    "inference.estimator=meanfield",
]


def project_epochs(epochs: int, extra: list[str], out: Path) -> tuple[list[float], list[str]]:
    """``pyro-vae train`` in a fresh process; its epochs' training seconds and its log lines about the step."""
    command = [
        sys.executable,
        "-m",
        "pyro_vae",
        "train",
        "--config",
        "mnist",
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--no-progress",
    ]
    for item in NETWORK + extra:
        command += ["--set", item]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = (out / "log.txt").read_text().splitlines()
    return [row["seconds"] for row in metrics], [line for line in log if "inference.compile" in line]


def plain_epochs(
    epochs: int, train: torch.Tensor, batch: int = 128, modules: tuple[nn.Module, nn.Module] | None = None
) -> list[float]:
    """The hand-written loop on the same data and network shape; seconds per epoch.

    ``modules``: the (encoder, decoder) to train, kept by the caller; new ones by default.
    """
    if modules is None:
        torch.manual_seed(0)
        modules = (
            nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 40)),
            nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 784)),
        )
    encoder, decoder = modules
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    n = train.shape[0]
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        losses = torch.empty(math.ceil(n / batch))
        for i, index in enumerate(torch.randperm(n).split(batch)):
            x = torch.bernoulli(train[index])
            optimizer.zero_grad()
            loc, raw = encoder(x).chunk(2, -1)
            scale = F.softplus(raw) + 1e-3
            z = loc + scale * torch.randn_like(loc)
            log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
            kl = (-torch.log(scale) + 0.5 * (scale * scale + loc * loc) - 0.5).sum(-1)
            loss = -(n / x.shape[0]) * (log_lik - kl).sum()
            loss.backward()
            optimizer.step()
            losses[i] = loss.detach()
        losses.tolist()
        seconds.append(time.perf_counter() - start)
    return seconds


def mnist_train(root: str) -> torch.Tensor:
    from pyro_vae.config.spec import load_spec
    from pyro_vae.data import load_dataset

    spec = load_spec("mnist", [f"data.root={root}"] if root else [])
    return load_dataset(spec.data, 0).train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="train then plain, this many times")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra spec overrides")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    train = mnist_train(os.environ.get("PYRO_VAE_DATA", ""))
    print(
        f"hardware: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}; overrides: {' '.join(args.set) or 'none'}",
        flush=True,
    )
    ratios = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            ours, lines = project_epochs(args.epochs, args.set, Path(folder) / "run")
        plain = plain_epochs(args.epochs, train)
        ratio = statistics.median(ours[1:]) / statistics.median(plain[1:])
        ratios.append(ratio)
        print(
            f"round {r + 1}: pyro-vae train epochs {' '.join(f'{s:.2f}' for s in ours)} s; plain loop "
            f"{' '.join(f'{s:.2f}' for s in plain)} s; median of epochs 2+ ratio {ratio:.3f}"
        )
        for line in lines:
            print(f"  log: {line.split('inference.compile', 1)[1].strip(': ')}")
    print(
        f"ratio: median {statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] over "
        f"{len(ratios)} round(s)"
    )


if __name__ == "__main__":
    main()
