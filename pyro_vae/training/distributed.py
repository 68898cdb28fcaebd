"""Data-parallel training with PyTorch's own engine: ``torchrun ... -m pyro_vae train``.

Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address) the trainer joins a ``torch.distributed`` process group:
``gloo`` on CPUs, ``nccl`` on GPUs (rank r uses ``cuda:LOCAL_RANK``). Without
those variables, or with ``WORLD_SIZE=1``, nothing here does anything.

One step with W ranks and the global batch of B indices (``data.batch_size``,
the same B as a single-process run, from the same per-epoch permutation)::

    rank r takes the r-th of W nearly equal slices of the B indices (B_r of them),
        so over an epoch the ranks see disjoint shards of the data;
    it binarizes and draws ε with its own generator (seeded per rank);
    its loss is the estimator's −ELBO of the whole training set from its slice:
        L_r = (N / B_r) Σ_{b ∈ slice r} ℓ_b          (the data plate's N/B_r scaling)
    gradients and loss are weighted by B_r / B and summed over ranks (one all-reduce):
        Σ_r (B_r / B) ∇L_r = (N / B) Σ_{b ∈ batch} ∇ℓ_b

which is exactly the gradient a single process computes on the same B
examples; only the random draws differ, so the two runs agree in distribution
(and test ELBO within noise). A global batch smaller than W (a last partial
batch) is given whole to every rank with weight 1/W: an average of W
unbiased estimates. The all-reduce is one flat buffer: the gradients, the
loss, and a flag for SIGINT/SIGTERM, so every rank stops at the same step.

Rank 0 alone writes the run folder (config, checkpoints, metrics, log,
pictures) and prints; the other ranks are silent. Every rank evaluates the
test ELBO itself (rank 0's is the one logged). Resuming a data-parallel run
works (all ranks load rank 0's checkpoint, ranks > 0 re-derive their
generators from the seed and the step), but is not bit-for-bit.
"""

from __future__ import annotations

import atexit
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pyro_vae.errors import UserInputError

SYNC_EVERY_ON_GPU = 100  # read the stop flag back (a host sync) only every so many steps on a GPU


def environment_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return (
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError:
        raise UserInputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None


def is_main() -> bool:
    """Whether this process writes and prints: rank 0, or the only process."""
    return environment_world()[0] == 0


@dataclass
class Context:
    """This process's place in the job and the per-step bookkeeping of the all-reduce."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    weight: float = 1.0  # B_r / B of the current step
    steps: int = 0
    sync_every: int = 1
    pending: list = field(default_factory=list)  # signals received, not yet agreed on
    stop: list | None = None  # the training loop's stop list

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, batch_size: int, device: torch.device) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return (
            f"data-parallel: {self.world_size} processes ({backend}, {device.type}); each step takes about "
            f"{batch_size / self.world_size:g} of the global batch of {batch_size} per process, gradients "
            f"all-reduced; rank 0 writes the run folder"
        )

    # -- data ---------------------------------------------------------------------
    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch of indices; sets the step's weight B_r / B."""
        if not self.enabled:
            self.weight = 1.0
            return index
        if index.shape[0] < self.world_size:
            self.weight = 1.0 / self.world_size
            return index
        local = torch.tensor_split(index, self.world_size)[self.rank]
        self.weight = local.shape[0] / index.shape[0]
        return local

    # -- generators ---------------------------------------------------------------
    def seed(self, seed: int, step: int = 0) -> None:
        """Ranks > 0 draw from their own generators (binarization, ε); rank 0 keeps the single-process stream."""
        if not self.enabled or self.rank == 0:
            return
        import pyro

        pyro.set_rng_seed((seed * 1_000_003 + 7_919 * self.rank + 104_729 * step) % 2**32)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Every rank starts from rank 0's parameters and buffers."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    # -- signals ------------------------------------------------------------------
    def signal_list(self, stop: list) -> list:
        """The list a signal handler should append to: ``stop`` itself, or a pending list agreed on per step."""
        if not self.enabled:
            return stop
        self.stop, self.pending = stop, []
        return self.pending

    # -- the all-reduce -------------------------------------------------------------
    def all_reduce(self, parameters: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of weight · (gradients, loss) in one collective; returns the global loss.

        Gradients are replaced in place; the loss returned estimates the same
        full-data −ELBO as a single process's loss on the global batch.
        """
        if not self.enabled:
            return loss
        grads = [p.grad for p in parameters if p.grad is not None]
        like = grads[0] if grads else loss
        flag = like.new_tensor([1.0 if self.pending else 0.0])
        flat = torch.cat([*(g.reshape(-1) for g in grads), loss.detach().reshape(1).to(like), flag])
        flat[:-1].mul_(self.weight)
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        self.steps += 1
        if self.stop is not None and not self.stop and self.steps % self.sync_every == 0 and bool(flat[-1] > 0):
            self.stop.append(self.pending[0] if self.pending else signal.SIGTERM)
        return flat[-2]


def setup(device_name: str) -> tuple[Context, str]:
    """Join torchrun's process group if there is one; returns the context and the device to train on.

    ``cuda`` (or ``cuda:N``) becomes ``cuda:LOCAL_RANK`` under torchrun, with ``nccl``; anything else ``gloo``.
    """
    rank, world, local = environment_world()
    if world <= 1:
        return Context(), device_name
    if not dist.is_available():
        raise UserInputError("WORLD_SIZE > 1 but this torch has no torch.distributed; run a single process")
    on_gpu = device_name.startswith("cuda")
    if on_gpu:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise UserInputError(
                f"train.device is {device_name!r} under torchrun with LOCAL_RANK {local}, but this "
                f"machine has {count} CUDA device(s); use --nproc-per-node <= {count} or --device cpu"
            )
        device_name = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device_name != "cpu":
        raise UserInputError(
            f"data-parallel training runs on cpu (gloo) or cuda (nccl); train.device is {device_name!r}"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo", device_id=torch.device(device_name) if on_gpu else None
        )
        atexit.register(_teardown)
    context = Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local,
        sync_every=SYNC_EVERY_ON_GPU if on_gpu else 1,
    )
    return context, device_name


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
