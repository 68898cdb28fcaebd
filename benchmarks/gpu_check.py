"""pyro-vae on one CUDA device, in one call of under ten minutes: agreement with the CPU, then speed against peers.

1. **Agreement**: the same small digits run (static binarization, every ε drawn on
   the CPU from one generator and moved to the device) trained with
   ``train.device=cpu`` and ``=cuda``: each epoch's train and test ELBO and the final
   parameters must agree within float tolerance (``RTOL``, ``ATOL``).
2. **Speed**, on the common task of ``benchmarks/peers.py`` (MNIST, dynamic
   binarization, 784-400-20 ReLU, batch 128, Adam 1e-3; uniform noise of MNIST's
   shape where ``$PYRO_VAE_DATA`` holds no MNIST): the trainer on each
   ``inference.compile`` path (``eager``, ``traced``, ``inductor``: whole steps),
   ``inductor`` with CUDA graphs (Inductor's ``triton.cudagraphs``; the log says when
   Inductor declines them), a hand-written loop with fused Adam, the same loop
   with its step compiled with ``mode="reduce-overhead"`` (CUDA graphs), and
   NumPyro's jitted epoch where JAX sees a GPU. Each: seconds per epoch after the
   first, and per step.

Without a CUDA device it prints one line on stderr and exits with status 2.

    PYRO_VAE_DATA=../shared/data python benchmarks/gpu_check.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RTOL, ATOL = 1e-4, 1e-3
PATHS = ("eager", "traced", "inductor")


def require_cuda() -> None:
    """Exit with status 2 and one line on stderr where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with one",
            file=sys.stderr,
        )
        raise SystemExit(2)


def run_with_cpu_eps(device: str):
    """A small digits run on ``device`` whose ε are drawn on the CPU from one seeded generator."""
    from pyro_vae import training
    from pyro_vae.config.spec import load_spec

    generator = torch.Generator().manual_seed(5)
    original = torch.distributions.normal._standard_normal

    def draw(shape, dtype, device):
        return torch.randn(shape, dtype=dtype, generator=generator).to(device)

    torch.distributions.normal._standard_normal = draw
    try:
        spec = load_spec(
            None,
            [
                "data.train_size=400",
                "data.test_size=100",
                "data.binarize=static",
                "train.epochs=3",
                f"train.device={device}",
                "inference.compile=eager",
            ],
        )
        trainer = training.Trainer(spec, None, show_progress=False)
        trainer.fit()
    finally:
        torch.distributions.normal._standard_normal = original
    return trainer


def agreement() -> bool:
    """CPU and CUDA runs on the same draws: metrics and parameters within RTOL/ATOL; prints what it found."""
    cpu, gpu = run_with_cpu_eps("cpu"), run_with_cpu_eps("cuda")
    worst = 0.0
    ok = True
    for a, b in zip(cpu.progress.metrics, gpu.progress.metrics):
        for key in ("train_elbo", "test_elbo"):
            worst = max(worst, abs(a[key] - b[key]))
            ok &= math.isclose(a[key], b[key], rel_tol=RTOL, abs_tol=ATOL)
    params = max(float((p - q.cpu()).abs().max()) for p, q in zip(cpu.vae.parameters(), gpu.vae.parameters()))
    ok &= all(
        torch.allclose(p, q.cpu(), rtol=1e-3, atol=1e-4) for p, q in zip(cpu.vae.parameters(), gpu.vae.parameters())
    )
    print(
        f"agreement cpu vs cuda: largest ELBO difference {worst:.2e} nats, parameters {params:.2e}: "
        f"{'ok' if ok else 'DIFFERENT'}",
        flush=True,
    )
    return ok


def task_spec(path: str, epochs: int):
    from train_vs_plain import NETWORK

    from pyro_vae.config.spec import load_spec

    overrides = [*NETWORK, f"train.epochs={epochs}", "train.device=cuda", f"inference.compile={path}"]
    root = os.environ.get("PYRO_VAE_DATA")
    if not (root and Path(root, "MNIST").exists()):
        overrides = [o for o in overrides if not o.startswith("data.name")] + ["data.name=digits"]
        print("no MNIST under $PYRO_VAE_DATA: the digits data instead (8×8 images)", flush=True)
    return load_spec(None, overrides)


def trainer_epochs(path: str, epochs: int, cudagraphs: bool = False) -> tuple[list[float], int]:
    """Training seconds per epoch of the trainer on ``path`` (and the steps per epoch)."""
    from pyro_vae import training
    from pyro_vae.training import compiled

    options = dict(compiled.INDUCTOR_OPTIONS)
    if cudagraphs:
        compiled.INDUCTOR_OPTIONS["triton.cudagraphs"] = True
    try:
        trainer = training.Trainer(task_spec(path, epochs), None, show_progress=False)
        trainer.fit()
    finally:
        compiled.INDUCTOR_OPTIONS.clear()
        compiled.INDUCTOR_OPTIONS.update(options)
    return [row["seconds"] for row in trainer.progress.metrics], trainer.steps_per_epoch


def plain_epochs(epochs: int, graphs: bool) -> tuple[list[float], int]:
    """A hand-written loop on the GPU (fused Adam); ``graphs``: its step compiled with CUDA graphs."""
    import torch.nn.functional as F
    from torch import nn

    spec = task_spec("eager", epochs)
    from pyro_vae.data import load_dataset

    train = load_dataset(spec.data, 0).train.cuda()
    n, d = train.shape
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(d, 400), nn.ReLU(), nn.Linear(400, 40)).cuda()
    decoder = nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, d)).cuda()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3, fused=True)

    def loss_of(x):
        loc, raw = encoder(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-3
        z = loc + scale * torch.randn_like(loc)
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        kl = (-torch.log(scale) + 0.5 * (scale * scale + loc * loc) - 0.5).sum(-1)
        return -(n / x.shape[0]) * (log_lik - kl).sum()

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    run = torch.compile(step, mode="reduce-overhead") if graphs else step
    batch, seconds = 128, []
    full = n // batch
    for _ in range(epochs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(n, device="cuda")
        losses = torch.empty(full, device="cuda")
        for i in range(full):
            losses[i] = run(torch.bernoulli(train[order[i * batch : (i + 1) * batch]]))
        losses.sum().item()
        seconds.append(time.perf_counter() - start)
    return seconds, full


def numpyro_epochs(epochs: int) -> str:
    """NumPyro's jitted epoch (benchmarks/peers.py) with JAX on the GPU, in a child process; its report or why not."""
    env = dict(os.environ, JAX_PLATFORMS="cuda", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("peers.py")), "--child", "numpyro", "--epochs", str(epochs)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"not run ({last[:160]})"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return describe(report["seconds"], None)


def describe(seconds: list[float], steps: int | None) -> str:
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    per_step = f", {1e3 * steady / steps:.3f} ms per step" if steps else ""
    return f"epochs {' '.join(f'{s:.2f}' for s in seconds)} s; steady {steady:.3f} s per epoch{per_step}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    require_cuda()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    ok = agreement()
    # the uncompiled systems first, so that a call cut short still compares the trainer with its peers
    print(f"plain loop, fused Adam: {describe(*plain_epochs(args.epochs, False))}", flush=True)
    print(f"numpyro: {numpyro_epochs(args.epochs)}", flush=True)
    for path in PATHS:
        print(f"pyro-vae {path}: {describe(*trainer_epochs(path, args.epochs))}", flush=True)
    print(f"pyro-vae inductor, CUDA graphs: {describe(*trainer_epochs('inductor', args.epochs, True))}", flush=True)
    print(f"plain loop, CUDA graphs: {describe(*plain_epochs(args.epochs, True))}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
