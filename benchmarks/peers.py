"""``pyro-vae train``, a hand-written PyTorch loop and a NumPyro VAE with a jit-compiled epoch, on one task.

The common task: MNIST, dynamic binarization, 784-400-20 ReLU encoder and
decoder, batch 128, Adam with learning rate 1e-3, the closed-form KL where the
system has one. Each round runs the systems one after the other, each in a
fresh process at the same thread count and confined to that many CPUs, so a
slow spell of the machine hits all of them; ratios are taken within a round.

- ``pyro-vae train --config mnist`` (no compile setting: the packaged spec's
  ``inference.compile: inductor``, whole steps compiled as one graph), its
  epochs' training seconds from the run's metrics.jsonl, and the path it took;
- ``pyro-vae train --set inference.compile=traced`` (``traced``: the
  bit-for-bit replay of the eager step);
- the hand-written loop of ``benchmarks/train_vs_plain.py`` (``torch.optim.Adam()``);
- NumPyro: the same model and guide written as NumPyro programs (``numpyro.param``
  weights, a subsampled data plate), ``SVI`` with ``Trace_ELBO`` and
  ``numpyro.optim.Adam``, one epoch (permutation, binarization draws and every
  update) compiled as one ``jax.jit`` of a ``lax.fori_loop``; the epoch's last
  partial batch is dropped.

Before the rounds, one short ``inference.compile=inductor`` run fills the
compile cache, so every round starts warm. Reported per round: each system's
epoch seconds, the median of epochs 2+ (epoch 1 holds start-up and compiles),
the process's wall time, its start-up (wall time less the epochs at the steady
rate: launch, imports, data, compiles and, for pyro-vae, the per-epoch test
ELBO), its final test ELBO (nats per example: pyro-vae's own; for NumPyro and
the plain loop one sample per test image on one fixed binarization), the ratios
to the plain loop and pyro-vae's to NumPyro's; then each ratio's median
[min–max] over rounds, and the load average at the start and end.

    pip install -e ".[bench]"
    PYRO_VAE_DATA=../shared/data python benchmarks/peers.py --rounds 2 --epochs 7 --threads 1
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

from machine import cpu_name


def thread_environment(threads: int) -> dict[str, str]:
    """Environment of a child process limited to ``threads`` threads in torch and XLA."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    flags = "--xla_cpu_multi_thread_eigen=" + ("false" if threads == 1 else "true")
    env["XLA_FLAGS"] = f"{flags} intra_op_parallelism_threads={threads}"
    return env


def cpus_for(threads: int) -> set[int] | None:
    """The first ``threads`` CPUs this process may run on, or None where affinity cannot be set.

    A thread count alone does not bound a system: XLA's runtime runs work on threads of its own beside its
    intra-op pool, so a NumPyro run told to use one thread takes a second core when one is idle. Each child is
    therefore confined to as many CPUs as it is given threads.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    return set(sorted(os.sched_getaffinity(0))[:threads])


def run_child(system: str, epochs: int, threads: int) -> dict:
    """One system in a fresh process on :func:`cpus_for` ``threads`` CPUs; its JSON report (epoch seconds, test
    ELBO) plus the wall time."""
    cpus = cpus_for(threads)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", system, "--epochs", str(epochs), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=thread_environment(threads),
        preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)),
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall"] = time.perf_counter() - start
    return report


def child_pyro_vae(epochs: int, threads: int, extra: tuple[str, ...] = ()) -> dict:
    """``pyro-vae train`` on the common task, as a user runs it (``extra``: more ``--set`` items)."""
    from train_vs_plain import NETWORK

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        command = [sys.executable, "-m", "pyro_vae", "train", "--config", "mnist", "--epochs", str(epochs)]
        command += ["--out", str(out), "--quiet", "--threads", str(threads)]
        for item in [*NETWORK, *extra]:
            command += ["--set", item]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        log = (out / "log.txt").read_text().splitlines()
    return {"seconds": [row["seconds"] for row in rows], "test_elbo": rows[-1]["test_elbo"], "path": path_taken(log)}


def path_taken(log: list[str]) -> str | None:
    """The training path a run's log.txt says it took: whole steps, traced, or what ``auto`` chose."""
    for line in log:
        if "cannot compile whole training steps" in line:
            return "traced"
        if "whole training steps" in line and "compiled with TorchInductor" in line:
            return "whole steps"
        if "auto chose " in line:
            return line.split("auto chose ")[1].split(" ")[0]
    return None


def child_pyro_vae_traced(epochs: int, threads: int) -> dict:
    """``pyro-vae train`` on the traced path (the bit-for-bit replay of the eager step)."""
    return child_pyro_vae(epochs, threads, ("inference.compile=traced",))


def child_warm_cache(epochs: int, threads: int) -> dict:
    """One epoch with ``inference.compile=inductor``: fills the compile cache the rounds then find warm."""
    return child_pyro_vae(1, threads, ("inference.compile=inductor",))


def mnist(split: str):
    """The MNIST pixel intensities in [0, 1], (N, 784) float32, through the package's loader."""
    from pyro_vae.config.spec import load_spec
    from pyro_vae.data import load_dataset

    root = os.environ.get("PYRO_VAE_DATA", "")
    data = load_dataset(load_spec("mnist", [f"data.root={root}"] if root else []).data, 0)
    return getattr(data, split)


def child_plain(epochs: int, threads: int) -> dict:
    """The hand-written loop; its test ELBO with one sample per image on one fixed binarization."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from train_vs_plain import plain_epochs

    torch.set_num_threads(threads)
    train, test = mnist("train"), mnist("test")
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 40))
    decoder = nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 784))
    seconds = plain_epochs(epochs, train, modules=(encoder, decoder))
    with torch.no_grad():
        x = torch.bernoulli(test, generator=torch.Generator().manual_seed(0))
        loc, raw = encoder(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-3
        z = loc + scale * torch.randn_like(loc)
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        kl = (-torch.log(scale) + 0.5 * (scale * scale + loc * loc) - 0.5).sum(-1)
    return {"seconds": seconds, "test_elbo": float((log_lik - kl).mean())}


def child_numpyro(epochs: int, threads: int, batch: int = 128, hidden: int = 400, latent: int = 20) -> dict:
    """A NumPyro VAE on the common task, one ``jit``-compiled epoch per call.

    model: z ~ N(0, I), x ~ Bernoulli(logits = dec(z)); guide: z ~ N(enc_μ(x),
    softplus(enc_σ(x)) + 1e-3); both over a data plate of N subsampled to the
    batch, so ``Trace_ELBO`` estimates the full-data ELBO as the other systems do.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO

    train = jnp.asarray(mnist("train").numpy())
    test = mnist("test").numpy()
    n, d = train.shape

    def dense(key, fan_in: int, fan_out: int) -> tuple:
        bound = 1.0 / np.sqrt(fan_in)
        w_key, b_key = jax.random.split(key)
        weight = jax.random.uniform(w_key, (fan_in, fan_out), minval=-bound, maxval=bound)
        return weight, jax.random.uniform(b_key, (fan_out,), minval=-bound, maxval=bound)

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    start = {
        "enc_in": dense(keys[0], d, hidden),
        "enc_out": dense(keys[1], hidden, 2 * latent),
        "dec_in": dense(keys[2], latent, hidden),
        "dec_out": dense(keys[3], hidden, d),
    }

    def layer(name: str) -> tuple:
        weight, bias = start[name]
        return numpyro.param(f"{name}_w", weight), numpyro.param(f"{name}_b", bias)

    def mlp(first: tuple, second: tuple, inputs):
        return jax.nn.relu(inputs @ first[0] + first[1]) @ second[0] + second[1]

    def model(x, num_data: int):
        first, second = layer("dec_in"), layer("dec_out")
        with numpyro.plate("data", num_data, subsample_size=x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(latent), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=mlp(first, second, z)).to_event(1), obs=x)

    def guide(x, num_data: int):
        first, second = layer("enc_in"), layer("enc_out")
        loc, raw = jnp.split(mlp(first, second, x), 2, axis=-1)
        with numpyro.plate("data", num_data, subsample_size=x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, jax.nn.softplus(raw) + 1e-3).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(1), train[:batch], n)
    steps = n // batch

    @jax.jit
    def epoch(state, key):
        order = jax.random.permutation(key, n)

        def step(i, carry):
            state, total = carry
            index = jax.lax.dynamic_slice(order, (i * batch,), (batch,))
            x = jax.random.bernoulli(jax.random.fold_in(key, i), train[index]).astype(jnp.float32)
            state, loss = svi.update(state, x, n)
            return state, total + loss

        return jax.lax.fori_loop(0, steps, step, (state, 0.0))

    seconds = []
    for e in range(epochs):
        begin = time.perf_counter()
        state, total = epoch(state, jax.random.PRNGKey(100 + e))
        total.block_until_ready()
        seconds.append(time.perf_counter() - begin)
    params = svi.get_params(state)
    x = jnp.asarray(np.random.default_rng(0).random(test.shape) < test, dtype=jnp.float32)
    elbo = Trace_ELBO().loss(jax.random.PRNGKey(2), params, model, guide, x, x.shape[0])
    return {"seconds": seconds, "test_elbo": -float(elbo) / x.shape[0]}


CHILDREN = {
    "pyro-vae": child_pyro_vae,
    "traced": child_pyro_vae_traced,
    "plain": child_plain,
    "numpyro": child_numpyro,
}
HELPERS = {"warm-cache": child_warm_cache}


def steady(seconds: list[float]) -> float:
    """The median epoch after the first."""
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def startup(report: dict) -> float:
    """Wall time less the epochs at the steady rate: launch, imports, data, compiles (and per-epoch evaluation)."""
    return report["wall"] - len(report["seconds"]) * steady(report["seconds"])


def load() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=sorted({**CHILDREN, **HELPERS}), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({**CHILDREN, **HELPERS}[args.child](args.epochs, args.threads)))
        return
    cpus = cpus_for(args.threads)
    where = "any CPU" if cpus is None else f"CPU(s) {sorted(cpus)}"
    print(f"hardware: {cpu_name()}, {os.cpu_count()} CPUs; {args.threads} thread(s) per system on {where}", flush=True)
    print(f"load average at the start: {load()}", flush=True)
    run_child("warm-cache", 1, args.threads)
    ratios: dict[str, list[float]] = {name: [] for name in [*CHILDREN, "pyro-vae/numpyro", "startup/numpyro"]}
    for r in range(args.rounds):
        reports = {name: run_child(name, args.epochs, args.threads) for name in CHILDREN}
        plain = steady(reports["plain"]["seconds"])
        print(f"round {r + 1} (load average {load()}):")
        for name, report in reports.items():
            ratio = steady(report["seconds"]) / plain
            ratios[name].append(ratio)
            epochs = " ".join(f"{s:.2f}" for s in report["seconds"])
            path = f" ({report['path']})" if report.get("path") else ""
            print(
                f"  {name:9s}{path} epochs {epochs} s; steady {steady(report['seconds']):.2f} s; ratio to plain "
                f"{ratio:.2f}; wall {report['wall']:.1f} s; start-up {startup(report):.1f} s; "
                f"test ELBO {report['test_elbo']:.2f}",
                flush=True,
            )
        ours, theirs = reports["pyro-vae"], reports["numpyro"]
        ratios["pyro-vae/numpyro"].append(steady(ours["seconds"]) / steady(theirs["seconds"]))
        ratios["startup/numpyro"].append(startup(ours) / startup(theirs))
    for name in CHILDREN:
        label = f"{name}: steady epoch / plain loop's, median [min–max] over {args.rounds} round(s)"
        print(f"{label}: {spread(ratios[name])}")
    print(f"pyro-vae / numpyro, steady epoch: {spread(ratios['pyro-vae/numpyro'])}")
    print(f"pyro-vae / numpyro, start-up: {spread(ratios['startup/numpyro'])}")
    print(f"load average at the end: {load()}")


if __name__ == "__main__":
    main()
