"""Every random number generator a run draws from, seeded from one seed and saved and restored as one.

Torch's generator (CPU, and each CUDA device once CUDA is initialized) draws the
initialization, the binarization and the guide's ε; numpy's and Python's are
seeded and saved too, so nothing a part might use escapes the checkpoint.
"""

from __future__ import annotations

import random

import numpy as np
import pyro
import torch

from pyro_vae.errors import UserInputError

MAX_SEED = 2**32 - 1  # numpy's limit


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` from one seed."""
    if not 0 <= seed <= MAX_SEED:
        raise UserInputError(f"seed {seed} (train.seed or --seed) is out of range; accepted: 0 to {MAX_SEED}")
    pyro.set_rng_seed(seed)


def rng_state() -> dict:
    """The state of every generator training draws from: torch (and CUDA), numpy, Python.

    The numpy state is kept as plain numbers, so a checkpoint loads with ``weights_only=True``.
    """
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # legacy=True: the tuple form
    kind, keys, position, has_gauss, cached_gaussian = numpy_state
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put every generator back where :func:`rng_state` found it."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fork_torch(device: torch.device):
    """The torch generators a step on ``device`` draws from (CPU, and that CUDA device), as a snapshot."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore_torch(device: torch.device, state) -> None:
    """Put the generators of :func:`fork_torch` back."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
